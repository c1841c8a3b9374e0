"""What a stage's workers are told and how many steps they take: plain data, no DeepSpeed.

The driver plans a stage with these (steps, the stage's config section, the settings shipped to
every worker) without importing the training stack; components.train.loop runs it in the workers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from components.config import ConfigError, StageSection

# Set in a step's metrics when val_loss was measured at that step (it is carried forward in between).
VAL_MEASURED = "val_measured"


@dataclass
class LoopSettings:
    """Everything a worker needs, shipped as plain data in `train_loop_config`."""

    config: dict[str, Any]
    stage: int
    num_train_samples: int
    artifact_uri: str
    data_digest: str | None = None
    stage1_artifact: str | None = None
    use_gpu: bool = False
    train_dataset: str = "train"
    val_dataset: str | None = None  # datasets are named "{name}_{rank}": one deterministic stream per worker
    metrics_sink: Any = None
    processor_dir: str = ""
    run_id: str | None = None  # the MLflow run of this stage, recorded in the artifact (lineage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def total_steps(stage_cfg: StageSection, num_samples: int) -> int:
    """Optimizer steps: `max_steps`, else epochs over the data (incomplete last global batch dropped)."""
    if stage_cfg.max_steps:
        return stage_cfg.max_steps
    per_epoch = num_samples // stage_cfg.global_batch
    if per_epoch == 0:
        raise ConfigError(
            f"{stage_cfg.name}: {num_samples} training samples do not fill one global batch of "
            f"{stage_cfg.global_batch}; lower {stage_cfg.name}.global_batch or add data"
        )
    return max(1, math.ceil(stage_cfg.epochs * per_epoch))
