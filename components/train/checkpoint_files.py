"""Checkpoint manifests: each rank records the size and sha256 of the files it wrote, resume checks them.

Ray Train merges every rank's checkpoint folder into one `checkpoint_<time>` folder in storage, so each
rank writes its own manifest (`duet-files-rank{r}.json`, also saying how many ranks wrote the checkpoint).
Before a checkpoint is loaded, every manifest must be there and every file must match: a truncated,
emptied or bit-flipped file, or a rank's missing part, makes the checkpoint damaged, and resume falls back
to the newest older checkpoint of the run that is intact (Ray Train keeps `num_to_keep` of them).
Checkpoints written before manifests existed have none and load unchecked when Ray Train hands them over.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import ray.train

from components.checksums import file_records, mismatches

PROGRESS_FILE = "progress.json"  # {"step": N}, written by rank 0
MANIFEST_PREFIX = "duet-files-rank"
Damaged = list[tuple[str, list[str]]]  # (checkpoint folder name, what is wrong with it)
CHECKPOINT_DIR_PREFIX = "checkpoint_"  # how Ray Train names the checkpoint folders of a run


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def write_manifest(folder: Path, rank: int, world_size: int, step: int) -> None:
    """Record what this rank wrote into `folder`; call it last, after every other file is written."""
    manifest = {"rank": rank, "world_size": world_size, "step": step,
                "files": file_records(folder, skip=[manifest_name(rank)])}
    (folder / manifest_name(rank)).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def has_manifests(folder: Path) -> bool:
    return any(folder.glob(f"{MANIFEST_PREFIX}*.json"))


def checkpoint_problems(folder: Path) -> list[str]:
    """Why the checkpoint in `folder` must not be loaded (empty when every rank's files are intact)."""
    manifests = sorted(folder.glob(f"{MANIFEST_PREFIX}*.json"))
    problems: list[str] = []
    world_sizes, ranks = set(), set()
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            world_sizes.add(int(manifest["world_size"]))
            ranks.add(int(manifest["rank"]))
            files = dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name} is unreadable ({type(exc).__name__})")
            continue
        problems += mismatches(folder, files)
    if len(world_sizes) > 1:
        problems.append(f"its manifests disagree on the number of ranks ({sorted(world_sizes)})")
    elif world_sizes:
        missing = sorted(set(range(world_sizes.pop())) - ranks)
        problems += [f"rank {rank}'s part is missing ({manifest_name(rank)})" for rank in missing]
    return problems


def newest_intact(run_folder: Path) -> tuple[Path, int] | None:
    """The newest checkpoint folder of a run on local storage whose manifests all match, with its step."""
    for folder in sorted(run_folder.glob(f"{CHECKPOINT_DIR_PREFIX}*"), reverse=True):  # names hold the time
        if folder.is_dir() and has_manifests(folder) and not checkpoint_problems(folder):
            try:
                return folder, int(json.loads((folder / PROGRESS_FILE).read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


@dataclass
class Resume:
    """Which checkpoint a restarted worker group loads, and the damaged ones it passed over."""

    folder: Path | None = None  # the local folder of the checkpoint to load; None: start from step 0
    name: str | None = None
    damaged: Damaged = field(default_factory=list)


def run_checkpoints(fs: pafs.FileSystem, run_path: str, before: str | None = None) -> list[ray.train.Checkpoint]:
    """The run's checkpoint folders (all, or those written before the one named `before`), newest first:
    their names hold the time."""
    infos = fs.get_file_info(pafs.FileSelector(run_path.rstrip("/"), allow_not_found=True))
    names = sorted((info.base_name for info in infos if info.type == pafs.FileType.Directory
                    and info.base_name.startswith(CHECKPOINT_DIR_PREFIX)
                    and (before is None or info.base_name < before)), reverse=True)
    return [ray.train.Checkpoint(posixpath.join(run_path.rstrip("/"), name), filesystem=fs) for name in names]


@contextmanager
def intact_checkpoint(
    checkpoint: ray.train.Checkpoint | None, unregistered: list[ray.train.Checkpoint] | None = None
) -> Iterator[Resume]:
    """The newest intact checkpoint, starting with the one Ray Train hands over, as a local folder.

    Without one, the `unregistered` folders of the run are tried, newest first (Ray Train's record of
    them was set aside as damaged: components.train.stage). An older or unregistered folder counts only
    when it has manifests: one without them may be an upload that stopped part-way (a full disk).
    """
    resume = Resume()
    if checkpoint is None:
        candidates = list(unregistered or [])
    else:
        parent, name = posixpath.split(checkpoint.path.rstrip("/"))
        candidates = [checkpoint, *run_checkpoints(checkpoint.filesystem, parent, before=name)]
    for index, candidate in enumerate(candidates):
        name = posixpath.basename(candidate.path.rstrip("/"))
        with candidate.as_directory() as local:
            folder = Path(local)
            if not has_manifests(folder):
                if index == 0 and checkpoint is not None:  # before manifests existed: Ray Train's latest
                    resume.folder, resume.name = folder, name
                    yield resume
                    return
                resume.damaged.append((name, ["it has no manifest (an incomplete upload?)"]))
                continue
            problems = checkpoint_problems(folder)
            if not problems:
                resume.folder, resume.name = folder, name
                yield resume
                return
            resume.damaged.append((name, problems))
    yield resume
