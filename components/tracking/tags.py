"""Every `duet.*` MLflow tag name the project writes or reads, in one place.

Runs carry the step name and a step hash so a later invocation can find work already done;
stage 2, trials and model versions carry lineage (the stage-1 run and artifact, the data digest).
"""

from __future__ import annotations

from typing import Literal

# What a run is and which step of the pipeline.
TAG_KIND = "duet.kind"  # pipeline, stage, trial, evaluation, data
TAG_STEP = "duet.step"  # stage1, stage2, evaluate-fine-tuned, ...
TAG_STEP_HASH = "duet.step_hash"  # what determines a step's output: a finished run with the same hash is reused
TAG_CONFIG_HASH = "duet.config_hash"
TAG_GIT_COMMIT = "duet.git_commit"
TAG_CONTINUES_RUN = "duet.continues_run"  # a stage run that carries on an attempt a tracking outage interrupted

# Lineage.
TAG_PARENT_STAGE_RUN = "duet.parent_stage_run_id"  # the stage-1 run a stage-2 run or trial started from
TAG_STAGE1_ARTIFACT = "duet.stage1_artifact_uri"
TAG_DATASET_DIGEST = "duet.dataset_digest"
TAG_STAGE1_DATASET_DIGEST = "duet.stage1_dataset_digest"
TAG_STAGE1_RUN = "duet.stage1_run_id"  # on the pipeline's parent run
TAG_STAGE2_RUN = "duet.stage2_run_id"  # on the pipeline's parent run

# Artifacts stored outside MLflow, pointed at by URI.
TAG_ARTIFACT_PREFIX = "duet.artifact."
TAG_ARTIFACT = "duet.artifact.stage"  # the stage artifact URI a stage or trial run wrote
TAG_MODEL_URI = "duet.artifact.model"  # the packaged pyfunc model of a stage-2 run

# Evaluations.
TAG_EVALUATED_MODEL = "duet.evaluated_model"
TAG_EVALUATED_STAGE_RUN = "duet.model_stage_run_id"
TAG_BLIND = "duet.blind"  # true for the blind baseline (images blanked)

# Sweeps and their trials.
TAG_TRIAL_ID = "duet.trial_id"
TAG_SWEEP = "duet.sweep"
TAG_SEARCH_PREFIX = "duet.search."
TAG_EARLY_STOPPED = "duet.early_stopped"
TAG_SWEEP_BEST_TRIAL = "duet.sweep.best_trial"
TAG_SWEEP_BEST_RUN = "duet.sweep.best_run_id"
TAG_SWEEP_EXPERIMENT_PATH = "duet.sweep.experiment_path"

# Method studies (pipelines/study.py): on the study's parent run and on each trial run.
TAG_STUDY = "duet.study"
TAG_STUDY_RUN = "duet.study.run_name"  # the run.name a study ran under: with TAG_STUDY, finds its parent run
TAG_STUDY_VARIANT = "duet.study.variant"
TAG_STUDY_SEED = "duet.study.seed"

# Model versions in the registry.
TAG_SOURCE_RUN = "duet.source_run_id"
TAG_FORCED = "duet.forced"
TAG_GATE = "duet.gate"
TAG_PROMOTED_OVER = "duet.promoted_over"
METRIC_TAG_PREFIX = "metric."  # a version's metrics, as tags the gate reads
LINEAGE_TAGS = (TAG_PARENT_STAGE_RUN, TAG_STAGE1_ARTIFACT, TAG_DATASET_DIGEST, TAG_CONFIG_HASH, TAG_GIT_COMMIT)

ChildKind = Literal["stage", "trial", "evaluation", "data"]
CHILD_KINDS: tuple[str, ...] = ("stage", "trial", "evaluation", "data")
PIPELINE_KIND = "pipeline"
