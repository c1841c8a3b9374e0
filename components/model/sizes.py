"""Parameter counts and fp16 sizes per component (vision tower, VCE, projector, language model, adapter).

`build_meta_model` builds the configured architecture on the `meta` device, so the sizes of a
7B model come without reading or allocating any weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from components.config import DuetConfig
from components.model.adapters.apply import apply_adapter, is_adapter_param
from components.model.llava import (
    VCEProjector,
    attach_vce,
    llava_15_7b_config,
    llava_core,
    local_checkpoint,
    projector_module,
)
from components.model.stages import set_trainable


def build_meta_model(cfg: DuetConfig, stage: int = 2) -> nn.Module:
    """The configured architecture with adapter and VCE on the `meta` device: sizes without weights."""
    if cfg.model.arch == "llava-1.5-7b":
        config = llava_15_7b_config()
    elif cfg.model.arch == "checkpoint":
        config = LlavaConfig.from_pretrained(local_checkpoint(cfg.model.checkpoint or "", cfg.storage))
    else:
        if not cfg.model.checkpoint:
            raise ValueError("model.arch 'tiny' needs model.checkpoint for its tokenizer size; use the demo config")
        config = LlavaConfig.from_pretrained(local_checkpoint(cfg.model.checkpoint, cfg.storage))
    with torch.device("meta"):
        model = attach_vce(LlavaForConditionalGeneration(config), cfg.vce)
        if stage == 2:
            model = apply_adapter(model, cfg.adapter)
    set_trainable(model, stage, cfg.stage(stage).trainable)
    return model


def iter_component_params(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(component, name, param) for vision_tower, vce, projector, language_model and adapter."""
    core = llava_core(model)
    vision = {id(p) for p in core.vision_tower.parameters()}
    bridge = projector_module(model)
    vce = {id(p) for p in bridge.vce.parameters()} if isinstance(bridge, VCEProjector) else set()
    proj = {id(p) for p in bridge.parameters()} - vce
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            component = "adapter"
        elif id(param) in vision:
            component = "vision_tower"
        elif id(param) in vce:
            component = "vce"
        elif id(param) in proj:
            component = "projector"
        else:
            component = "language_model"
        yield component, name, param


COMPONENTS = ("vision_tower", "vce", "projector", "language_model", "adapter")


def component_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per component: parameter count, whether any of it trains, and its size in fp16 MiB."""
    sizes: dict[str, dict[str, Any]] = {c: {"params": 0, "trainable": False} for c in COMPONENTS}
    seen: set[int] = set()
    for component, _, param in iter_component_params(model):
        if id(param) in seen:
            continue
        seen.add(id(param))
        sizes[component]["params"] += param.numel()
        sizes[component]["trainable"] |= param.requires_grad
    for row in sizes.values():
        row["mib_fp16"] = round(row["params"] * 2 / 2**20, 2)
    return sizes
