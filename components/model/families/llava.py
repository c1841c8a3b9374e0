"""The LLaVA families: LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (one projector after a CLIP/SigLIP tower).

VCE plugs into Hugging Face's own image path: the model's `vision_feature_layer`
becomes the list [anchor, references...], so `get_image_features` hands the
projector those maps concatenated on the feature axis (CLS dropped where the
family drops it), and the projector is replaced by `VCEProjector`, which splits
them, runs VCE and then the original two-layer MLP. NeXT and OneVision cut an image
into tiles before the tower, so the projector sees one square grid per tile and VCE
runs per tile; the tiles' arrangement, the newline tokens, generation and caching
stay transformers' code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from components.config import VCESection
from components.model.families.base import Family
from components.model.vce import VisualCueEnhancer


class VCEProjector(nn.Module):
    """VCE (paper eq. 7) followed by LLaVA's projector (eq. 8), fed the concatenated selected maps.

    Input: [B, N, d * (1 + R)] = anchor map then R reference maps, as HF's
    `get_image_features` concatenates them for a list-valued `vision_feature_layer`
    (B images, or B tiles for NeXT and OneVision).
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
            raise ValueError(f"VCE needs a square patch grid per image or tile, got {anchor.shape[1]} patches")
        enhanced = self.vce(anchor, references, (side, side))
        return self.projector(enhanced)


@dataclass(frozen=True)
class LlavaStyleFamily(Family):
    """A vision tower, then `multi_modal_projector`; `vision_feature_layer` picks the tower's layers."""

    def vision_layers(self, config: PretrainedConfig) -> int:
        return int(self.vision_config(config).num_hidden_layers)

    def vision_dim(self, config: PretrainedConfig) -> int:
        return int(self.vision_config(config).hidden_size)

    def is_core(self, module: nn.Module) -> bool:
        return hasattr(module, "multi_modal_projector") and hasattr(module, "vision_tower")

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.core(model).vision_tower

    def bridge(self, model: nn.Module) -> nn.Module:
        return self.core(model).multi_modal_projector

    def attach_vce(self, model: nn.Module, vce_cfg: VCESection) -> nn.Module:
        if not vce_cfg.enabled:
            return model
        core = self.core(model)
        if isinstance(core.multi_modal_projector, VCEProjector):
            return model
        dim = self.vision_dim(model.config)
        model.config.vision_feature_layer = [vce_cfg.anchor_layer, *vce_cfg.reference_layers]
        vce = VisualCueEnhancer.from_config(vce_cfg, dim)
        reference = next(core.multi_modal_projector.parameters())
        vce.to(device=reference.device, dtype=reference.dtype)
        core.multi_modal_projector = VCEProjector(vce, core.multi_modal_projector, dim, vce_cfg)
        return model


LLAVA = LlavaStyleFamily("llava", "LLaVA-1.5", LlavaForConditionalGeneration, LlavaConfig, trains=True,
                         vce_site="multi_modal_projector")
LLAVA_NEXT = LlavaStyleFamily("llava_next", "LLaVA-NeXT", LlavaNextForConditionalGeneration, LlavaNextConfig,
                              trains=False, vce_site="multi_modal_projector (per tile)")
LLAVA_ONEVISION = LlavaStyleFamily("llava_onevision", "LLaVA-OneVision", LlavaOnevisionForConditionalGeneration,
                                   LlavaOnevisionConfig, trains=False, vce_site="multi_modal_projector (per tile)")


def _vicuna_7b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def _clip_vit_l_336() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )


def llava_15_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Vicuna-7B), as published with llava-hf's checkpoint."""
    return LlavaConfig(
        vision_config=_clip_vit_l_336(), text_config=_vicuna_7b(), image_token_id=32000, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=32001, tie_word_embeddings=False,
    )


def llava_next_7b_config() -> LlavaNextConfig:
    """LLaVA-NeXT (v1.6) Vicuna-7B: LLaVA-1.5's towers, any-resolution tiles of 336 px up to 672 x 672."""
    return LlavaNextConfig(
        vision_config=_clip_vit_l_336(), text_config=_vicuna_7b(), image_token_id=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=32001, tie_word_embeddings=False,
    )


def llava_onevision_7b_config() -> LlavaOnevisionConfig:
    """LLaVA-OneVision Qwen2-7B: SigLIP so400m/14-384 (26 layers, no CLS) + Qwen2-7B, tiles up to 2304 px."""
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
        image_size=384, patch_size=14,
    )
    text = Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=False,
    )
    pinpoints = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=151646, video_token_id=151647,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=False,
    )
