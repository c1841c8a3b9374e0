"""Storage that fills up while a dataset split or a stage artifact is written (a small tmpfs of the test's own).

Each write ends in one `StorageFullError` naming the path and the free space, after no retries (a full
disk does not empty itself), leaves nothing that claims to be complete (no manifest, no artifact.json),
and the same write succeeds once there is room. A checkpoint written onto a full disk mid-stage is
tests/test_train_stages.py (test_a_full_disk_mid_stage_keeps_the_last_checkpoint_and_a_rerun_resumes).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from conftest import resize_mount

from components.data.shards import read_manifest, write_shards
from components.data.synthetic import SyntheticShapes
from components.errors import StorageFullError
from components.model.artifact import ARTIFACT_META, local_artifact, save_stage_artifact

FREE = re.compile(r"\((\d+(\.\d)? (bytes|KiB)) free of \d+\.\d (KiB|MiB)\)")


def test_a_split_written_onto_a_full_disk_fails_naming_the_path_and_is_written_once_there_is_room(
    small_disk: Path,
) -> None:
    records = list(SyntheticShapes(0, 64).records(0, 200))
    split = small_disk / "datasets" / "demo" / "train"
    resize_mount(small_disk, 256 * 1024)
    started = time.monotonic()
    with pytest.raises(StorageFullError) as err:
        write_shards(iter(records), str(split), split="train", source={"kind": "test"}, inputs_digest="x",
                     records_per_shard=20)
    assert time.monotonic() - started < 10, "not retried"
    message = str(err.value)
    assert f"no space left on the filesystem of {split}" in message and FREE.search(message), message
    assert not (split / "manifest.json").exists(), "no manifest over an incomplete split"

    resize_mount(small_disk, 64 * 2**20)
    manifest = write_shards(iter(records), str(split), split="train", source={"kind": "test"}, inputs_digest="x",
                            records_per_shard=20)
    assert manifest.count == 200 and read_manifest(str(split)).count == 200


class _Projector(torch.nn.Module):
    """Just enough of a LLaVA model for the artifact writer: a projector with 4 MiB of weights."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = torch.nn.Identity()
        self.multi_modal_projector = torch.nn.Linear(1024, 1024)


def test_a_stage_artifact_written_onto_a_full_disk_fails_and_leaves_no_artifact_json(small_disk: Path) -> None:
    from components.config import load_config

    cfg = load_config(None, [])
    uri = small_disk / "runs" / "demo" / "stage1" / "artifact"
    resize_mount(small_disk, 1024 * 1024)  # the weights are 4 MiB
    with pytest.raises(StorageFullError) as err:
        save_stage_artifact(_Projector(), cfg, 1, str(uri), "digest")
    message = str(err.value)
    assert f"no space left on the filesystem of {uri}" in message and FREE.search(message), message
    assert not (uri / ARTIFACT_META).exists(), "an incomplete artifact never looks complete"

    resize_mount(small_disk, 64 * 2**20)
    save_stage_artifact(_Projector(), cfg, 1, str(uri), "digest")
    local_artifact(str(uri))  # complete and its checksums match
