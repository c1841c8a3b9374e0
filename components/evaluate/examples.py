"""Held-out examples a person can look at: question, reference and prediction, as text and as a picture.

Averages hide a model that answers the same thing for every image; a few examples per task, the
images beside what the model said about them, do not. The examples are the first evaluated
samples of each task in the split's order, so the same ones are shown run after run.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from components import storage
from components.config import StorageSection
from components.data.shards import IMAGE_EXTENSIONS, read_manifest, shard_uris

PER_TASK = 3
_CELL_CHARS = 38  # characters per line of text under an image in the grid


def example_rows(table: pd.DataFrame, per_task: int = PER_TASK) -> pd.DataFrame:
    """The first `per_task` evaluated (not skipped) samples of each task, in key order."""
    kept = table[table["skipped"].fillna("").eq("")].sort_values("key", kind="stable")
    return kept.groupby("task", sort=True, group_keys=False).head(per_task).reset_index(drop=True)


def examples_text(rows: pd.DataFrame, blind: pd.DataFrame | None = None, width: int = 100) -> str:
    """Each example as a few indented lines: question, reference, prediction (and the blind prediction)."""
    blind_by_key = dict(zip(blind["key"], blind["prediction"])) if blind is not None else {}

    def clip(text: object) -> str:
        one_line = " ".join(str(text).split())
        return one_line if len(one_line) <= width else one_line[: width - 3] + "..."

    lines = []
    for task, group in rows.groupby("task", sort=True):
        lines.append(f"  {task}:")
        for row in group.itertuples(index=False):
            lines.append(f"    question    {clip(row.question)}")
            lines.append(f"    reference   {clip(row.reference)}")
            lines.append(f"    prediction  {clip(row.prediction)}")
            if row.key in blind_by_key:
                lines.append(f"    blind       {clip(blind_by_key[row.key])}")
    return "\n".join(lines)


def read_images(split_uri: str, keys: set[str], cfg: StorageSection | None = None) -> dict[str, bytes]:
    """The first image of each sample in `keys`, read from the split's shards in order (stops once all are found)."""
    manifest = read_manifest(split_uri, cfg)
    found: dict[str, bytes] = {}
    for uri in shard_uris(split_uri, manifest):
        if len(found) == len(keys):
            break
        fs, path = storage.resolve(uri, cfg)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, _, suffix = posixpath.basename(member.name).partition(".")
                if key in keys and key not in found and suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        found[key] = handle.read()
    return found


def example_grid(rows: pd.DataFrame, images: Mapping[str, bytes], path: str | Path, title: str) -> str:
    """A PNG grid: one column per example of a task, one row per task, the answers under each image."""
    tasks = sorted(rows["task"].unique())
    columns = max(len(rows[rows["task"] == t]) for t in tasks)
    fig = Figure(figsize=(3.2 * columns, 4.0 * len(tasks)), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for r, task in enumerate(tasks):
        for c, row in enumerate(rows[rows["task"] == task].itertuples(index=False)):
            ax = fig.add_subplot(len(tasks), columns, r * columns + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row.key in images:
                ax.imshow(Image.open(io.BytesIO(images[row.key])).convert("RGB"))
            ax.set_title(f"{task} #{row.key}", fontsize=8)
            text = "\n".join(
                textwrap.shorten(f"{label}: {value}", width=3 * _CELL_CHARS, placeholder=" ...")
                for label, value in (("ref", row.reference), ("pred", row.prediction))
            )
            ax.set_xlabel("\n".join(textwrap.fill(line, _CELL_CHARS) for line in text.split("\n")), fontsize=7,
                          loc="left")
    fig.tight_layout(h_pad=2.0)  # room for the answers under each image above the next row's titles
    fig.savefig(path)
    return str(path)
