"""The one place that builds DeepSpeed configs.

The configured global batch is the paper's (256 in stage 1, 128 in stage 2) whatever
the worker count: micro-batch x workers x gradient accumulation must equal it, and
accumulation is derived here. Precision follows the hardware unless pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from components.config import DeepSpeedSection, StageSection


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is laid out over workers and micro-batches."""

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int


def plan_batch(stage: StageSection, world_size: int) -> BatchPlan:
    """Derive gradient accumulation; shrink the micro-batch if it does not divide the per-worker share."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if stage.global_batch % world_size:
        raise ValueError(
            f"{stage.name}.global_batch ({stage.global_batch}) is not divisible by the {world_size} workers "
            f"(scaling.num_workers): choose a global batch that is a multiple of the worker count"
        )
    per_worker = stage.global_batch // world_size
    micro = min(stage.micro_batch, per_worker)
    while per_worker % micro:
        micro -= 1
    return BatchPlan(stage.global_batch, micro, world_size, per_worker // micro)


def resolve_precision(cfg: DeepSpeedSection, use_gpu: bool) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if cfg.precision != "auto":
        if cfg.precision in ("bf16", "fp16") and not use_gpu:
            raise ValueError(
                f"deepspeed.precision={cfg.precision} needs GPUs; on CPU use fp32 or auto (scaling.use_gpu is off)"
            )
        return cfg.precision
    if not use_gpu:
        return "fp32"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def build_deepspeed_config(cfg: DeepSpeedSection, plan: BatchPlan, precision: str) -> dict[str, Any]:
    """A DeepSpeed config dict for `deepspeed.initialize` (optimizer and scheduler are passed as objects)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if cfg.zero_stage == 3:
        # Gather the full weights when saving, so stage artifacts are complete, never empty shards.
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if cfg.offload_optimizer and cfg.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # The optimizer is our own AdamW with two parameter groups (adapter lr, projector + VCE lr).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
