"""The base checkpoint: where it is, which family it is, loading it, and VCE attached to it.

Where VCE sits and what it reads is each family's business (components/model/families);
this module finds the checkpoint, checks it before minutes of loading, and dispatches.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from components import storage
from components.config import ARCH_FAMILIES, DuetConfig, StorageSection, VCESection
from components.errors import ArtifactError
from components.model.families import Family, family_for_model_type, family_named, family_of
from components.model.families.llava import VCEProjector, llava_15_7b_config

__all__ = ["VCEProjector", "attach_vce", "llava_15_7b_config", "load_base_model", "local_checkpoint",
           "projector_module"]


def llava_core(model: nn.Module) -> nn.Module:
    """The inner transformers model (vision tower, bridge, LM) under any PEFT wrapping."""
    return family_of(model).core(model)


def projector_module(model: nn.Module) -> nn.Module:
    """The trainable vision-to-language bridge: VCE + the family's projector (or the projector alone)."""
    return family_of(model).bridge(model)


def local_checkpoint(uri: str, storage_cfg: StorageSection | None = None) -> str:
    """A local directory for a checkpoint URI (an object-store checkpoint is downloaded once per machine)."""
    if not storage.is_remote(uri):
        path = storage.resolve(uri)[1]
        if not (Path(path) / "config.json").is_file():
            raise ArtifactError(
                f"model.checkpoint {uri!r} has no config.json: point it at a checkpoint directory of one of "
                "duet's model families (save_pretrained layout, e.g. a llava-hf LLaVA-1.5)"
            )
        checkpoint_family(uri, Path(path))
        return path
    try:
        local = storage.local_copy(uri, storage_cfg, kind="checkpoints")
    except FileNotFoundError:
        raise ArtifactError(f"model.checkpoint {uri!r}: nothing is stored there (check the URI)") from None
    if not (local / "config.json").is_file():
        raise ArtifactError(f"model.checkpoint {uri!r} has no config.json: it is not a save_pretrained checkpoint")
    checkpoint_family(uri, local)
    return str(local)


def checkpoint_family(uri: str, folder: Path) -> Family:
    """The family a checkpoint's config.json names, refused before loading if duet has none for it.

    Loaded with the wrong class, transformers warns, then fails on an attribute the other config
    lacks (a Qwen2.5-VL one in LlavaForConditionalGeneration: "no attribute 'tie_word_embeddings'")
    or, where the configs look alike, loads it with every weight whose name differs left at random.
    """
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"model.checkpoint {uri!r}: config.json does not parse ({exc})") from None
    try:
        return family_for_model_type(model_type, f"model.checkpoint {uri!r}")
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


def stated_family(cfg: DuetConfig) -> Family | None:
    """The family the config itself names: model.family, else the one of model.arch's preset (tiny: LLaVA)."""
    if cfg.model.family != "auto":
        return family_named(cfg.model.family)
    preset = "llava" if cfg.model.arch == "tiny" else ARCH_FAMILIES.get(cfg.model.arch)
    return family_named(preset) if preset is not None else None


def configured_family(cfg: DuetConfig) -> Family:
    """The family the config builds on: the one it names, else the checkpoint's config.json model_type."""
    stated = stated_family(cfg)
    if stated is not None:
        return stated
    uri = storage.join(cfg.model.checkpoint or "", "config.json")
    try:
        model_type = json.loads(storage.read_text(uri, cfg.storage)).get("model_type")
    except FileNotFoundError:
        raise ArtifactError(f"model.checkpoint {cfg.model.checkpoint!r} has no config.json (check the path)") from None
    except (ValueError, AttributeError) as exc:
        raise ArtifactError(f"model.checkpoint {cfg.model.checkpoint!r}: config.json does not parse ({exc})") from None
    try:
        return family_for_model_type(model_type, f"model.checkpoint {cfg.model.checkpoint!r}")
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


def check_family(cfg: DuetConfig, family: Family, uri: str) -> None:
    """A checkpoint of another family than model.family says, or one duet cannot train yet, is refused."""
    stated = stated_family(cfg)
    if stated is not None and stated is not family:
        named = (f"model.family is {cfg.model.family!r}" if cfg.model.family != "auto"
                 else f"model.arch {cfg.model.arch!r} is a {stated.label} architecture")
        raise ArtifactError(
            f"model.checkpoint {uri!r} is a {family.label} checkpoint (model_type {family.name!r}) but {named}: "
            f"set model.arch: checkpoint and model.family: {family.name} (or auto), or point model.checkpoint "
            f"at a {stated.label} checkpoint"
        )
    if not family.trains:
        raise ArtifactError(
            f"model.checkpoint {uri!r} is a {family.label} checkpoint: duet attaches VCE and the adapter to it "
            "and sizes it (pipelines/inspect_model.py), but its processor and chat template are not in the "
            "data path yet, so it cannot be trained, evaluated or served; use a LLaVA-1.5 checkpoint (model_type "
            "'llava') for those"
        )


def load_base_model(cfg: DuetConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The pretrained base from `model.checkpoint` (a local path or object-store URI), in its family's class."""
    if not cfg.model.checkpoint:
        raise ValueError(
            "model.checkpoint is not set: give the LLaVA checkpoint directory or URI "
            "(the demo builds a tiny one: see pipelines/full.py)"
        )
    path = local_checkpoint(cfg.model.checkpoint, cfg.storage)
    family = checkpoint_family(cfg.model.checkpoint, Path(path))
    check_family(cfg, family, cfg.model.checkpoint)
    check_attn_implementation(cfg.model.attn_implementation)
    # One string sets every sub-config: the vision tower and the language model get the same kernel.
    return family.model_class.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=cfg.model.attn_implementation
    )


def check_attn_implementation(name: str) -> None:
    """Refuse flash_attention_2 where it cannot run, before minutes of loading (transformers' own error comes late)."""
    if name != "flash_attention_2":
        return
    missing = []
    if importlib.util.find_spec("flash_attn") is None:
        missing.append("the flash-attn package is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is visible")
    if missing:
        raise ValueError(
            f"model.attn_implementation 'flash_attention_2': {' and '.join(missing)}; "
            "install flash-attn on the GPU workers, or set model.attn_implementation: sdpa"
        )


def attach_vce(model: nn.Module, vce_cfg: VCESection) -> nn.Module:
    """Put VCE in front of the model's bridge, where its family says (idempotent; off when vce.enabled is false)."""
    return family_of(model).attach_vce(model, vce_cfg)
