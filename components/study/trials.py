"""One study trial as a Ray Tune trial: stage 2 of one variant and seed from its shared stage-1 artifact, then
the fine-tuned evaluation on the study's held-out split, all inside one MLflow child run of the study.

A trial is recognised as done by its trial hash (the stage-2 step hash plus the evaluation settings and
the test split's digest): a finished trial run with that hash is reused, never trained again, so an
interrupted study resumes where it stopped and a new seed trains only the new trials. The stage-2 and
evaluation runs nested in a trial keep the full pipeline's own reuse rule, so a trial killed between
training and evaluation only evaluates when it runs again.

Trial processes talk to MLflow themselves (the sweep's trials do not): `trial_resources` pins them to
the study driver's node, which reaches the tracking store; their training workers go anywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from components.config import DuetConfig, config_from_dict
from components.data.prepare import SplitResult
from components.model.artifact import artifact_identity
from components.model.sizes import build_meta_model, component_sizes
from components.quiet import PEFT_DEPRECATION, quiet_driver
from components.study.results import Trial
from components.tracking.tags import (
    TAG_STEP,
    TAG_STEP_HASH,
    TAG_STUDY,
    TAG_STUDY_SEED,
    TAG_STUDY_VARIANT,
)
from components.tracking.tracker import Tracker
from components.train.stage import StageData
from components.workflow.evaluation import COUNT_PREFIX, tracked_evaluation
from components.workflow.steps import StepOutcome, step_hash
from components.workflow.tracked_stage import tracked_stage

TRIAL_STEP = "study-trial"
ADAPTER_MIB = "adapter_mib"  # a trial run's metric beside the evaluation's: trainable adapter size


@dataclass(frozen=True)
class TrialPlan:
    """Everything one trial needs, computed on the driver: its config, stage-1 artifact, data and hash."""

    study: str
    variant: str
    seed: int
    config: dict[str, Any]  # the variant's config with this seed (JSON form: Tune ships it to the trial)
    stage1: StepOutcome
    data: StageData
    test: SplitResult
    base_dir: str
    trial_hash: str
    adapter_mib: float

    @property
    def name(self) -> str:
        return f"{self.study}/{self.variant}/seed{self.seed}"


def trial_hash(cfg: DuetConfig, data: StageData, stage1_artifact: str, test: SplitResult) -> str:
    """What decides a trial's result: its stage 2 (same inputs as the pipeline's stage-2 step hash), the
    evaluation settings and the held-out split."""
    stage2 = step_hash(cfg, "stage2", data=data.digest, stage1=artifact_identity(stage1_artifact, cfg.storage))
    return step_hash(cfg, TRIAL_STEP, stage2=stage2, eval=cfg.eval.model_dump(mode="json"),
                     test=test.manifest.digest)


def adapter_mib(cfg: DuetConfig) -> float:
    """Trainable adapter size in fp16 MiB, counted as `pipelines/inspect_model.py` counts it (meta device)."""
    with warnings.catch_warnings():  # PEFT's use of a deprecated transformers attribute, nothing to act on
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        return float(component_sizes(build_meta_model(cfg, stage=2))["adapter"]["mib_fp16"])


def find_finished(tracker: Tracker, plan: TrialPlan) -> Any:
    """The newest finished trial run with this plan's hash, or None."""
    return tracker.find_run({TAG_STEP: TRIAL_STEP, TAG_STEP_HASH: plan.trial_hash})


def trial_from_run(plan: TrialPlan, run: Any) -> Trial:
    """A finished trial run as a row of the study's results: its evaluation metrics and adapter size."""
    metrics = {k: float(v) for k, v in run.data.metrics.items() if k != ADAPTER_MIB and not k.startswith(COUNT_PREFIX)}
    cfg = plan.config["adapter"]
    return Trial(plan.variant, plan.seed, metrics, float(run.data.metrics.get(ADAPTER_MIB, plan.adapter_mib)),
                 method=str(cfg["type"]), rank=int(cfg["r"]))


def trial_resources(cfg_cpus: float) -> dict[str, float]:
    """A trial process's own resources: its CPU share, on the study driver's node (it reaches MLflow)."""
    return {"CPU": cfg_cpus, f"node:{ray.util.get_node_ip_address()}": 0.001}


def run_study_trial(config: dict[str, Any], *, plans: list[TrialPlan], parent_run_id: str) -> None:
    """The Tune trainable: plan `config["trial"]` trained and evaluated in the study's child run."""
    quiet_driver()  # this process builds datasets and models as a pipeline driver does
    plan = plans[config["trial"]]
    cfg = config_from_dict(plan.config)
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    tags = {TAG_STEP_HASH: plan.trial_hash, TAG_STUDY: plan.study, TAG_STUDY_VARIANT: plan.variant,
            TAG_STUDY_SEED: str(plan.seed)}
    with tracker.child_run("trial", TRIAL_STEP, parent_run_id, tags=tags) as run_id:
        tracker.client.set_tag(run_id, "mlflow.runName", plan.name)
        tracker.client.log_param(run_id, "study.variant", plan.variant)
        tracker.client.log_param(run_id, "study.seed", plan.seed)
        tracker.log_config(run_id, cfg)
        stage2 = tracked_stage(cfg, tracker, run_id, 2, plan.data, stage1=plan.stage1)
        _, evaluated, _ = tracked_evaluation(cfg, tracker, run_id, "fine-tuned", stage2.artifact_uri, plan.base_dir,
                                             plan.test, stage2)
        metrics = {k: float(v) for k, v in evaluated.metrics.items()}
        tracker.log_metrics(run_id, {**metrics, ADAPTER_MIB: plan.adapter_mib})
    tune.report({**metrics, "trial_run_id": run_id})

