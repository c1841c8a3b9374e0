"""What each training stage trains and the model it starts from (paper section 3.5).

Stage 1 trains {projector, VCE} on captions; stage 2 adds the adapter on instruction data,
starting from the stage-1 weights. The vision tower and the LLM weights stay frozen. The
optimizer sees two learning-rate groups: the adapter's and the projector's + VCE's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from components.config import DuetConfig, StageSection
from components.model.adapters.apply import apply_adapter, is_adapter_param
from components.model.artifact import load_projector_weights, local_artifact
from components.model.llava import attach_vce, load_base_model, projector_module


def set_trainable(model: nn.Module, stage: int, trainable: str = "all") -> None:
    """Freeze everything, then unfreeze the stage's set: projector + VCE, plus the adapter in stage 2.

    `trainable="adapter_only"` (stage 2) leaves the projector and VCE frozen at their stage-1 weights,
    as the paper's rank study (Table 5) trains them.
    """
    for name, param in model.named_parameters():
        param.requires_grad = stage == 2 and is_adapter_param(name)
    if stage == 2 and trainable == "adapter_only":
        return
    for param in projector_module(model).parameters():
        param.requires_grad = True


def build_model(cfg: DuetConfig, stage: int, stage1_artifact: str | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """The model for one stage: base + VCE (+ stage-1 weights and the adapter in stage 2)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    model = attach_vce(load_base_model(cfg, dtype), cfg.vce)
    if stage == 2:
        if stage1_artifact is not None:
            folder, _ = local_artifact(stage1_artifact, cfg.storage)
            load_projector_weights(model, folder, stage1_artifact)
        model = apply_adapter(model, cfg.adapter)
    set_trainable(model, stage, cfg.stage(stage).trainable)
    if cfg.model.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inner.enable_input_require_grads()
    return model


def parameter_groups(model: nn.Module, stage_cfg: StageSection) -> list[dict[str, Any]]:
    """AdamW groups: adapter at `adapter_lr`, projector + VCE at `lr` (paper section 4.1)."""
    adapter, bridge = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (adapter if is_adapter_param(name) else bridge).append(param)
    groups = []
    if bridge:  # empty when stage 2 trains the adapter alone (stage2.trainable: adapter_only)
        groups.append({"name": "projector_vce", "params": bridge, "lr": stage_cfg.lr,
                       "weight_decay": stage_cfg.weight_decay})
    if adapter:
        if stage_cfg.adapter_lr is None:
            raise ValueError(f"{stage_cfg.name}.adapter_lr is required when an adapter is trained (e.g. 2e-4)")
        groups.append(
            {"name": "adapter", "params": adapter, "lr": stage_cfg.adapter_lr, "weight_decay": stage_cfg.weight_decay}
        )
    return groups
