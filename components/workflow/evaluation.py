"""Evaluations as steps of the pipeline: zero-shot, fine-tuned and blind, each a reusable child run with
its per-sample table, an example grid, and the part of each score that comes from the pictures."""

from __future__ import annotations

import os
import tempfile

import pandas as pd

from components.config import DuetConfig
from components.console import CountProgress, say
from components.data.prepare import SplitResult
from components.evaluate.examples import example_grid, example_rows, read_images
from components.evaluate.report import write_table
from components.evaluate.run import evaluate
from components.evaluate.score import EvalResult
from components.layout import (
    evaluation_table_path,
)
from components.model.artifact import artifact_identity
from components.tracking.tags import (
    TAG_BLIND,
    TAG_EVALUATED_MODEL,
    TAG_EVALUATED_STAGE_RUN,
    TAG_STEP,
    TAG_STEP_HASH,
)
from components.tracking.tracker import Tracker
from components.workflow.steps import StepOutcome, step_hash

# The evaluations of the full pipeline: (name, which stage's model, images blanked).
EVALUATIONS = (("zero-shot", 1, False), ("fine-tuned", 2, False), ("blind", 2, True))


COUNT_PREFIX = "count/"


def tracked_evaluation(
    cfg: DuetConfig, tracker: Tracker, parent_run_id: str, name: str, model_uri: str, base_dir: str,
    test: SplitResult, lineage: StepOutcome, blind: bool = False,
) -> tuple[str, EvalResult, bool]:
    """Evaluate one model on the test split as a child run; reused when the same model and data were scored.

    A reused evaluation gives back its metrics, counts and (when the local copy is still there) its
    per-sample table; `blind` blanks every image (the blind baseline).
    """
    digest = step_hash(cfg, "evaluate", model=artifact_identity(model_uri, cfg.storage), data=test.manifest.digest,
                       blind=blind)
    table_path = evaluation_table_path(cfg, name, digest)
    done = tracker.find_run({TAG_STEP: f"evaluate-{name}", TAG_STEP_HASH: digest})
    if done is not None:
        say(f"evaluate {name}: reused run {done.info.run_id}")
        logged = done.data.metrics
        metrics = {k: v for k, v in logged.items() if not k.startswith(COUNT_PREFIX)}
        counts = {k.removeprefix(COUNT_PREFIX): int(v) for k, v in logged.items() if k.startswith(COUNT_PREFIX)}
        table = (pd.read_csv(table_path, keep_default_na=False, dtype={"key": str, "id": str, "prediction": str})
                 if os.path.isfile(table_path) else None)
        return done.info.run_id, EvalResult(metrics, table, counts), True  # type: ignore[arg-type]
    with tracker.child_run("evaluation", f"evaluate-{name}", parent_run_id, tags={TAG_STEP_HASH: digest}) as run_id:
        tracker.log_dataset(run_id, f"{cfg.data.name}/test", test.uri, test.manifest.digest, context="evaluation")
        tags = {TAG_EVALUATED_MODEL: model_uri, TAG_BLIND: str(blind).lower()}
        if lineage.run_id:
            tags[TAG_EVALUATED_STAGE_RUN] = lineage.run_id
        tracker.set_tags(run_id, tags)
        total = min(test.manifest.count, cfg.eval.max_samples or test.manifest.count)
        what = "every image blanked, " if blind else ""
        say(f"evaluate {name}: generating on {total} test samples ({what}{cfg.eval.num_replicas} replica(s))")
        result = evaluate(cfg, model_uri, test.uri, base_dir, blind=blind,
                          progress=CountProgress(f"evaluate {name}", total).update)
        tracker.log_metrics(run_id, result.metrics)
        tracker.log_metrics(run_id, {f"{COUNT_PREFIX}{k}": float(v) for k, v in result.counts.items()})
        os.makedirs(os.path.dirname(table_path), exist_ok=True)
        write_table(result.per_sample, table_path)
        tracker.client.log_artifact(run_id, table_path, "predictions")
        if not blind:
            _log_examples(cfg, tracker, run_id, name, test, result.per_sample)
        return run_id, result, False


def _log_examples(cfg: DuetConfig, tracker: Tracker, run_id: str, name: str, test: SplitResult,
                  table: pd.DataFrame) -> None:
    """A PNG grid of held-out images with their reference and predicted answers, on the evaluation's run."""
    rows = example_rows(table)
    if rows.empty:
        return
    images = read_images(test.uri, set(rows["key"]), cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        path = example_grid(rows, images, os.path.join(tmp, "examples.png"),
                            f"{name}: held-out test examples ({cfg.data.name})")
        tracker.client.log_artifact(run_id, path, "examples")


def vision_metrics(fine_tuned: EvalResult, blind: EvalResult) -> dict[str, float]:
    """Fine-tuned minus blind for every metric both have (`vision/score`, ...): what comes from the pictures.

    Registered with the model version, so `registry.metric: vision/score` can gate on it.
    """
    return {f"vision/{k}": v - blind.metrics[k] for k, v in fine_tuned.metrics.items() if k in blind.metrics}
