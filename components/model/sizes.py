"""Parameter counts and fp16 sizes per component (vision tower, VCE, projector, language model, adapter).

For every family; Qwen2.5-VL's projector is its patch merger.

`build_meta_model` builds the configured architecture on the `meta` device, so the sizes of a
7B model come without reading or allocating any weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from components.config import DuetConfig
from components.model.adapters.apply import apply_adapter, is_adapter_param
from components.model.families import family_for_model_type, family_of
from components.model.families.llava import (
    VCEProjector,
    llava_15_7b_config,
    llava_next_7b_config,
    llava_onevision_7b_config,
)
from components.model.families.qwen2_5_vl import VCEMerger, qwen2_5_vl_7b_config
from components.model.llava import local_checkpoint, projector_module
from components.model.stages import set_trainable

# model.arch presets: the published architecture of each family's 7B checkpoint.
PRESETS = {
    "llava-1.5-7b": llava_15_7b_config, "llava-next-7b": llava_next_7b_config,
    "llava-onevision-7b": llava_onevision_7b_config, "qwen2.5-vl-7b": qwen2_5_vl_7b_config,
}


def architecture_config(cfg: DuetConfig) -> PretrainedConfig:
    """The configured architecture's config: a preset, or the checkpoint's config.json (no weights read)."""
    if cfg.model.arch in PRESETS:
        return PRESETS[cfg.model.arch]()
    if not cfg.model.checkpoint:
        raise ValueError(f"model.arch {cfg.model.arch!r} needs model.checkpoint for its config (the demo config sets it)")
    return AutoConfig.from_pretrained(local_checkpoint(cfg.model.checkpoint, cfg.storage))


def build_meta_model(cfg: DuetConfig, stage: int = 2) -> nn.Module:
    """The configured architecture with adapter and VCE on the `meta` device: sizes without weights."""
    config = architecture_config(cfg)
    family = family_for_model_type(config.model_type, f"model.arch {cfg.model.arch!r}")
    if cfg.model.family not in ("auto", family.name):
        raise ValueError(f"model.family {cfg.model.family!r} but the architecture is {family.label} ({family.name})")
    family.check_vce(config, cfg.vce, f" of {family.label}")
    with torch.device("meta"):
        model = family.attach_vce(family.model_class(config), cfg.vce)
        if stage == 2:
            model = apply_adapter(model, cfg.adapter)
    set_trainable(model, stage, cfg.stage(stage).trainable)
    return model


def iter_component_params(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(component, name, param) for vision_tower, vce, projector, language_model and adapter."""
    bridge = projector_module(model)
    vce = {id(p) for p in bridge.vce.parameters()} if isinstance(bridge, VCEProjector | VCEMerger) else set()
    proj = {id(p) for p in bridge.parameters()} - vce
    # Qwen2.5-VL's merger (the bridge) lives inside its vision tower.
    vision = {id(p) for p in family_of(model).vision_tower(model).parameters()} - vce - proj
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
