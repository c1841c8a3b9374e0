"""A damaged checkpoint or stage artifact is found before it is loaded, and resume falls back to an intact one.

The checkpoints here are real DeepSpeed checkpoints (tests/fixtures/legacy/checkpoint) laid out as Ray
Train stores them: each rank's folder, with the manifest the training loop writes, merged into one
`checkpoint_<time>` folder of the run. Resuming a damaged run through Ray Train end to end (right step
count, same losses as an uninterrupted run) is tests/test_train_stages.py
(test_a_damaged_latest_checkpoint_resumes_from_the_one_before).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import ray.train

from components.errors import ArtifactError
from components.model.artifact import ARTIFACT_WEIGHTS, local_artifact
from components.train.checkpoint_files import (
    checkpoint_problems,
    intact_checkpoint,
    manifest_name,
    write_manifest,
)

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
MODEL_STATES = "state/mp_rank_00_model_states.pt"
OPTIM_STATES = "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_FILES = {0: ["latest", "progress.json", MODEL_STATES], 1: [OPTIM_STATES]}  # what each rank writes


def _write_checkpoint(run: Path, name: str, step: int) -> Path:
    """One checkpoint folder as Ray Train leaves it: every rank's files and manifest, merged."""
    folder = run / name
    for rank, files in RANK_FILES.items():
        part = run / f".rank{rank}"
        for rel in files:
            (part / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(LEGACY / "checkpoint" / rel, part / rel)
        if rank == 0:
            (part / "progress.json").write_text(json.dumps({"step": step}))
        write_manifest(part, rank, len(RANK_FILES), step)
        shutil.copytree(part, folder, dirs_exist_ok=True)
        shutil.rmtree(part)
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run with checkpoints at steps 2, 4 and 6 (names sort by time, as Ray Train's do)."""
    for index, step in enumerate((2, 4, 6)):
        _write_checkpoint(tmp_path, f"checkpoint_2026-12-01_10-00-0{index}.000000", step)
    return tmp_path


def _latest(run: Path) -> Path:
    return max(run.glob("checkpoint_*"))


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), r"bytes, \d+ were written"),
    "zero bytes": (lambda f: f.write_bytes(b""), r"has 0 bytes, \d+ were written"),
    "flipped byte": (_flip_byte, "does not match the sha256 recorded"),
    "missing": (lambda f: f.unlink(), "is missing"),
}


@pytest.mark.parametrize("rel", [MODEL_STATES, OPTIM_STATES, "progress.json"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_each_kind_of_damage_names_the_file(run: Path, rel: str, how: str) -> None:
    folder = _latest(run)
    assert checkpoint_problems(folder) == []
    damage, phrase = DAMAGE[how]
    damage(folder / rel)
    (problem,) = checkpoint_problems(folder)
    assert problem.startswith(rel) and re.search(phrase, problem), problem


def test_a_missing_rank_part_and_an_unreadable_manifest_are_named(run: Path) -> None:
    folder = _latest(run)
    (folder / manifest_name(1)).unlink()
    (folder / OPTIM_STATES).unlink()  # rank 1's part never arrived
    assert checkpoint_problems(folder) == [f"rank 1's part is missing ({manifest_name(1)})"]
    (folder / manifest_name(0)).write_text('{"rank": 0, "world_si')
    assert checkpoint_problems(folder)[0] == f"{manifest_name(0)} is unreadable (JSONDecodeError)"


def _resume(handed_over: Path) -> tuple[str | None, list[str]]:
    """Which checkpoint a worker group handed `handed_over` would load, and the ones it passed over."""
    with intact_checkpoint(ray.train.Checkpoint(str(handed_over))) as resume:
        assert (resume.folder is None) == (resume.name is None)
        return resume.name, [name for name, _ in resume.damaged]


def test_resume_falls_back_to_the_newest_intact_checkpoint(run: Path) -> None:
    names = sorted(p.name for p in run.glob("checkpoint_*"))
    _flip_byte(run / names[2] / MODEL_STATES)
    assert _resume(run / names[2]) == (names[1], [names[2]])
    (run / names[1] / OPTIM_STATES).write_bytes(b"")
    assert _resume(run / names[2]) == (names[0], [names[2], names[1]])
    (run / names[0] / "progress.json").unlink()
    assert _resume(run / names[2]) == (None, names[::-1]), "nothing intact: start from step 0"


def test_an_older_folder_without_manifests_is_not_trusted(run: Path) -> None:
    names = sorted(p.name for p in run.glob("checkpoint_*"))
    for manifest in (run / names[1]).glob("duet-files-rank*.json"):
        manifest.unlink()  # an upload that stopped before the manifests arrived
    _flip_byte(run / names[2] / MODEL_STATES)
    assert _resume(run / names[2]) == (names[0], [names[2], names[1]])


def test_a_checkpoint_from_before_manifests_is_loaded_when_ray_train_hands_it_over(tmp_path: Path) -> None:
    old = tmp_path / "checkpoint_2026-01-01_00-00-00.000000"
    shutil.copytree(LEGACY / "checkpoint", old)
    assert _resume(old) == (old.name, [])


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_stage_artifact_is_refused_naming_the_path_and_the_file(tmp_path: Path, how: str) -> None:
    artifact = tmp_path / "stage1"
    shutil.copytree(LEGACY / "stage1", artifact)
    local_artifact(str(artifact))  # intact: accepted
    DAMAGE[how][0](artifact / ARTIFACT_WEIGHTS)
    with pytest.raises(ArtifactError, match="damaged or incomplete") as err:
        local_artifact(str(artifact))
    assert str(artifact) in str(err.value) and ARTIFACT_WEIGHTS in str(err.value), err.value
