"""Running a short stage-1 pipeline in its own process, for fault tests that kill or starve it (test helper).

The run trains `STEPS` stage-1 steps on the demo config with a checkpoint every 2 steps, small enough
to finish in about a minute on 2 cores. Its Ray instance lives under a temp dir of the test's own, so
`end_leftovers` can stop exactly the processes the test started.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
STEPS = 12


def pretrain_command(work: Path) -> list[str]:
    """`pipelines/pretrain.py` on the demo config, with everything it writes under `work`."""
    return [
        sys.executable, str(REPO / "pipelines/pretrain.py"), "--config", str(REPO / "pipelines/configs/demo.yaml"),
        *[f"--set={o}" for o in (
            f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
            f"scaling.storage_path={work}/runs", "data.num_records=80", "data.caption_records=64",
            "data.records_per_shard=32", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0",
            "stage1.global_batch=8", "stage1.micro_batch=4", f"stage1.max_steps={STEPS}", "stage1.checkpoint_every=2",
            "stage1.log_every=1",  # the tests read every step's progress line
            "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "data.preprocess_num_cpus=0.25",
        )],
    ]


def trainer_folder(runs: Path, trainer_run: str = "demo-stage1") -> Path | None:
    """Ray Train's folder of the stage: `{run name}-{stage}-{step hash}` (the newest, if a test changed the
    config between runs); None before the stage started."""
    folders = sorted(runs.glob(f"{trainer_run}-*"), key=lambda p: p.stat().st_mtime)
    return folders[-1] if folders else None


def _registered(runs: Path, trainer_run: str) -> list[dict]:
    """Checkpoints Ray Train has registered and keeps (its snapshot is written once a checkpoint is stored)."""
    folder = trainer_folder(runs, trainer_run)
    try:
        return list(json.loads((folder / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def checkpoints(runs: Path, trainer_run: str = "demo-stage1") -> int:
    """How many checkpoints Ray Train keeps for the run (at most the stage's num_to_keep, 2)."""
    return len(_registered(runs, trainer_run))


def last_checkpoint_step(runs: Path, trainer_run: str = "demo-stage1") -> int:
    """The step of the newest checkpoint Ray Train has registered; 0 when there is none."""
    return max((int(c["metrics"]["step"]) for c in _registered(runs, trainer_run)), default=0)


def end_leftovers(marker: str) -> None:
    """End the Ray processes this test's drivers started (found by their temp dir), by pid."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and (marker in " ".join(proc.info["cmdline"] or [])
                                            or proc.environ().get("RAY_TMPDIR") == marker):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
