"""LLaVA assembly: the base checkpoint, VCE in front of the projector, and where the parts are.

VCE plugs into Hugging Face's own image path: the model's `vision_feature_layer`
becomes the list [anchor, references...], so `get_image_features` hands the
projector those maps concatenated on the feature axis (CLS dropped), and the
projector is replaced by `VCEProjector`, which splits them, runs VCE and then the
original two-layer MLP. Generation, caching and the image-token merge stay
transformers' code.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from components import storage
from components.config import DuetConfig, StorageSection, VCESection
from components.errors import ArtifactError
from components.model.vce import VisualCueEnhancer


class VCEProjector(nn.Module):
    """VCE (paper eq. 7) followed by LLaVA's projector (eq. 8), fed the concatenated selected maps.

    Input: [B, N, d * (1 + R)] = anchor map then R reference maps, as HF's
    `get_image_features` concatenates them for a list-valued `vision_feature_layer`.
    """

    def __init__(self, vce: VisualCueEnhancer, projector: nn.Module, dim: int, vce_cfg: VCESection):
        super().__init__()
        self.vce = vce
        self.projector = projector
        self.dim = dim
        self.include_anchor_level = vce_cfg.include_anchor_level
        self.num_references = len(vce_cfg.reference_layers)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        maps = image_features.split(self.dim, dim=-1)
        if len(maps) != 1 + self.num_references:
            raise ValueError(
                f"VCEProjector expected {1 + self.num_references} feature maps of width {self.dim}, got "
                f"{len(maps)}: the model's vision_feature_layer does not match vce.reference_layers"
            )
        anchor, references = maps[0], list(maps[1:])
        if self.include_anchor_level:
            references = [anchor, *references]
        side = math.isqrt(anchor.shape[1])
        if side * side != anchor.shape[1]:
            raise ValueError(f"VCE needs a square patch grid from CLIP, got {anchor.shape[1]} patches")
        enhanced = self.vce(anchor, references, (side, side))
        return self.projector(enhanced)


def llava_15_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Vicuna-7B), as published with llava-hf's checkpoint."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=32001, tie_word_embeddings=False,
    )


def llava_core(model: nn.Module) -> nn.Module:
    """The inner `LlavaModel` (vision tower, projector, LM) under any PEFT wrapping."""
    for module in model.modules():
        if hasattr(module, "multi_modal_projector") and hasattr(module, "vision_tower"):
            return module
    raise TypeError(f"{type(model).__name__} is not a LLaVA model (no vision_tower/multi_modal_projector)")


def projector_module(model: nn.Module) -> nn.Module:
    """The trainable vision-to-language bridge: VCEProjector (or the plain projector when VCE is off)."""
    return llava_core(model).multi_modal_projector


def local_checkpoint(uri: str, storage_cfg: StorageSection | None = None) -> str:
    """A local directory for a checkpoint URI (an object-store checkpoint is downloaded once per machine)."""
    if not storage.is_remote(uri):
        path = storage.resolve(uri)[1]
        if not (Path(path) / "config.json").is_file():
            raise ArtifactError(
                f"model.checkpoint {uri!r} has no config.json: point it at a LlavaForConditionalGeneration "
                "checkpoint directory (save_pretrained layout)"
            )
        check_llava_checkpoint(uri, Path(path))
        return path
    try:
        local = storage.local_copy(uri, storage_cfg, kind="checkpoints")
    except FileNotFoundError:
        raise ArtifactError(f"model.checkpoint {uri!r}: nothing is stored there (check the URI)") from None
    if not (local / "config.json").is_file():
        raise ArtifactError(f"model.checkpoint {uri!r} has no config.json: it is not a save_pretrained checkpoint")
    check_llava_checkpoint(uri, local)
    return str(local)


# Families a checkpoint's config.json can name that duet does not train yet: what they are, for the message.
OTHER_FAMILIES = {
    "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision", "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "idefics3": "Idefics3", "paligemma": "PaliGemma",
}


def check_llava_checkpoint(uri: str, folder: Path) -> None:
    """Refuse a checkpoint of another architecture before it is loaded.

    Given another family's checkpoint, LlavaForConditionalGeneration.from_pretrained warns, then fails
    on an attribute the other config lacks (a Qwen2.5-VL one: "no attribute 'tie_word_embeddings'") or,
    where the configs look alike, loads it with every weight whose name differs left at random values.
    """
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"model.checkpoint {uri!r}: config.json does not parse ({exc})") from None
    if model_type == "llava":
        return
    what = OTHER_FAMILIES.get(str(model_type), f"model_type {model_type!r}")
    raise ArtifactError(
        f"model.checkpoint {uri!r} is a {what} checkpoint (config.json model_type {model_type!r}); duet trains "
        "LLaVA-1.5-style checkpoints (LlavaForConditionalGeneration, model_type 'llava') only: convert it, or "
        "point model.checkpoint at a llava-hf checkpoint"
    )


def load_base_model(cfg: DuetConfig, dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """The pretrained LLaVA from `model.checkpoint` (a local path or object-store URI)."""
    if not cfg.model.checkpoint:
        raise ValueError(
            "model.checkpoint is not set: give the LLaVA checkpoint directory or URI "
            "(the demo builds a tiny one: see pipelines/full.py)"
        )
    path = local_checkpoint(cfg.model.checkpoint, cfg.storage)
    check_attn_implementation(cfg.model.attn_implementation)
    # One string sets every sub-config: the CLIP tower and the language model get the same kernel.
    return LlavaForConditionalGeneration.from_pretrained(
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


def attach_vce(model: LlavaForConditionalGeneration, vce_cfg: VCESection) -> LlavaForConditionalGeneration:
    """Wrap the projector with VCE and make the vision path hand it the anchor and reference maps."""
    if not vce_cfg.enabled:
        return model
    core = llava_core(model)
    if isinstance(core.multi_modal_projector, VCEProjector):
        return model
    dim = model.config.vision_config.hidden_size
    layers = [vce_cfg.anchor_layer, *vce_cfg.reference_layers]
    model.config.vision_feature_layer = layers
    vce = VisualCueEnhancer.from_config(vce_cfg, dim)
    device = next(core.multi_modal_projector.parameters()).device
    vce.to(device=device, dtype=next(core.multi_modal_projector.parameters()).dtype)
    core.multi_modal_projector = VCEProjector(vce, core.multi_modal_projector, dim, vce_cfg)
    return model
