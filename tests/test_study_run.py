"""A method study end to end: two variants x two seeds as Ray Tune trials, killed and resumed, published.

The first invocation runs `pipelines/study.py` in its own process and is killed once its first trial has
finished; the second runs what the CLI runs, in this process, and must train only the trials that had not
finished. The table it writes is checked against the trial runs read back from MLflow, and Figure 5
against the parent run's artifacts.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from components.config import ConfigError, load_config
from components.model.artifact import ARTIFACT_WEIGHTS
from components.tracking.tags import (
    TAG_ARTIFACT,
    TAG_KIND,
    TAG_STEP,
    TAG_STEP_HASH,
    TAG_STUDY,
    TAG_STUDY_SEED,
    TAG_STUDY_VARIANT,
)
from components.tracking.tracker import Tracker

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from pipeline_runs import end_leftovers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines/configs/demo.yaml"
STUDY = ("study.studies.mini={seeds: 2, reference: lora, trainable: adapter_only, figure: true, variants: {"
         "lora: {adapter.type: lora, adapter.r: 4, adapter.alpha: 8}, "
         "dual_lora: {adapter.type: dual_lora, adapter.r: 4, adapter.alpha: 8}}}")


def _overrides(work: Path) -> list[str]:
    return [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base", "run.name=st",
        "data.num_records=100", "data.caption_records=40", "data.records_per_shard=50",
        "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0", "scaling.num_workers=1",
        "scaling.cpus_per_worker=0.5", "data.preprocess_num_cpus=0.25",
        "stage1.global_batch=8", "stage1.micro_batch=2", "stage1.max_steps=1", "stage1.checkpoint_every=1",
        "stage2.global_batch=8", "stage2.micro_batch=2", "stage2.max_steps=2", "stage2.checkpoint_every=2",
        "eval.max_samples=4", "eval.max_new_tokens=8", STUDY,
        # A store of its own (a tracking URI another test left in the environment must not count here).
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
    ]


def _study_runs(tracker: Tracker, kind: str, step: str | None = None) -> list:
    where = f"tags.`{TAG_KIND}` = '{kind}'" + (f" and tags.`{TAG_STEP}` = '{step}'" if step else "")
    return tracker.client.search_runs([tracker.experiment_id], where, max_results=1000)


def test_a_study_config_error_is_named_before_anything_is_written(tmp_path: Path) -> None:
    from components.workflow.study import run_study

    work = tmp_path / "work"
    bad = [*_overrides(work), "study.studies.mini.variants.lora={adapter.rnk: 4}"]
    with pytest.raises(ConfigError, match=r"(?s)study 'mini', variant 'lora': .*adapter.rnk: unknown key"):
        run_study(load_config(DEMO, bad), "mini")
    assert not work.exists(), "nothing may be written before the study is resolved"


@pytest.mark.slow
def test_a_killed_study_resumes_without_retraining_and_publishes_its_table(tmp_path: Path) -> None:
    work = tmp_path / "work"
    command = [sys.executable, str(REPO / "pipelines/study.py"), "--config", str(DEMO), "--study", "mini",
               *[f"--set={o}" for o in _overrides(work)]]
    ray_tmp = tempfile.mkdtemp(prefix="duet-study-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cfg = load_config(DEMO, _overrides(work))
    tracker = Tracker(cfg.tracking, str(work))
    try:
        with open(tmp_path / "first.log", "wb") as log:
            first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            deadline = time.monotonic() + 600
            done: list = []
            while not done and first.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
                done = [r for r in _study_runs(tracker, "trial", "study-trial") if r.info.status == "FINISHED"]
            assert done, "no trial finished within 10 minutes"
            assert first.poll() is None, "the study ended before it could be killed after its first trial"
            os.killpg(first.pid, signal.SIGKILL)  # the driver and its session, no clean-up
            first.wait(timeout=30)
        end_leftovers(ray_tmp)
    finally:
        end_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    finished_before = {r.data.tags[TAG_STEP_HASH]: r.info.run_id for r in _study_runs(tracker, "trial", "study-trial")
                       if r.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 4

    import ray

    from components.workflow.study import run_study

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_study(cfg, "mini")  # what pipelines/study.py runs
    finally:
        ray.shutdown()

    # Resume: the trials finished before the kill are reused as they were, only the others trained.
    assert len(outcome.reused) == len(finished_before) and len(outcome.trained) == 4 - len(finished_before)
    trials = [r for r in _study_runs(tracker, "trial", "study-trial") if r.info.status == "FINISHED"]
    by_hash = {r.data.tags[TAG_STEP_HASH]: r for r in trials}
    assert len(trials) == len(by_hash) == 4, "each trial finished exactly once"
    assert all(by_hash[h].info.run_id == run_id for h, run_id in finished_before.items())
    stage2 = [r for r in _study_runs(tracker, "stage", "stage2") if r.info.status == "FINISHED"]
    assert len(stage2) == 4 and len({r.data.tags[TAG_STEP_HASH] for r in stage2}) == 4, "no stage 2 trained twice"
    stage1 = [r for r in _study_runs(tracker, "stage", "stage1") if r.info.status == "FINISHED"]
    assert len(stage1) == 2, "one stage 1 per seed, shared by both variants"

    # One parent run per study, re-opened by the second invocation; the trials are its children.
    parents = [r for r in _study_runs(tracker, "pipeline") if r.data.tags.get(TAG_STUDY) == "mini"]
    assert len(parents) == 1 and parents[0].info.run_id == outcome.parent_run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {outcome.parent_run_id}
    assert sorted((r.data.tags[TAG_STUDY_VARIANT], r.data.params["study.seed"]) for r in trials) == [
        ("dual_lora", "0"), ("dual_lora", "1"), ("lora", "0"), ("lora", "1")]
    assert all(r.data.tags[TAG_STUDY_SEED] == r.data.params["run.seed"] for r in trials)

    # adapter_only: the projector and VCE of every trial's stage-2 artifact are its stage-1 weights.
    stage1_weights = {r.info.run_id: load_file(os.path.join(r.data.tags[TAG_ARTIFACT], ARTIFACT_WEIGHTS))
                      for r in stage1}
    for run in stage2:
        after = load_file(os.path.join(run.data.tags[TAG_ARTIFACT], ARTIFACT_WEIGHTS))
        before = stage1_weights[run.data.tags["duet.parent_stage_run_id"]]
        assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)

    # The table: each variant's mean and standard deviation are those of its trial runs' metrics.
    with open(outcome.csv_path) as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"lora", "dual_lora"}
    for variant, row in rows.items():
        runs = [r for r in trials if r.data.tags[TAG_STUDY_VARIANT] == variant]
        for metric in ("score", "numeric/pmae"):
            values = [r.data.metrics[metric] for r in runs]
            assert float(row[f"{metric}:mean"]) == pytest.approx(np.mean(values), abs=1e-6)
            assert float(row[f"{metric}:std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        assert float(row["adapter_mib"]) > 0
    markdown = Path(outcome.markdown_path).read_text()
    assert "| **lora** (ref) |" in markdown and "| dual_lora |" in markdown

    # Logged to the parent run: table, CSV and Figure 5.
    logged = {a.path for a in tracker.client.list_artifacts(outcome.parent_run_id, "study")}
    assert logged == {"study/table.md", "study/table.csv", "study/figure5.png"}
    assert Path(outcome.figure_path or "").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
