"""Qwen2.5-VL: a native-resolution ViT with window attention, then a 2x2 patch merger into the LM.

Where VCE sits differs from LLaVA. The vision tower reorders its patch sequence before its
blocks: the image processor already lays patches out merge unit by merge unit (2x2 patches
together, units in raster order), and the tower then permutes the units into window order
(`window_index`) so that windowed attention reads contiguous runs; it undoes that only after the
merger. So `VCEMerger`, in front of the merger, takes the last block's output (the anchor) and the
outputs of the reference blocks (caught by forward hooks), inverts the window permutation, lays
each image's patches out as its own (H, W) grid (every frame of a video is one map), runs VCE per
grid, restores window order and hands the result to the original merger. Images of different
sizes and aspect ratios are separate maps; maps of the same grid share one VCE call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from components.config import VCESection
from components.model.families.base import Family
from components.model.vce import VisualCueEnhancer


def window_unit_order(grid_thw: Tensor, merge: int, window_size: int, patch_size: int) -> Tensor:
    """The tower's permutation of merge units into window order (transformers' own function)."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=window_size,
                                       patch_size=patch_size)
    return index.to(grid_thw.device)


def units_to_grids(natural: Tensor, grid_thw: Sequence[Sequence[int]], merge: int) -> list[Tensor]:
    """[units, merge*merge, d] in the processor's unit order -> one [t, H*W, d] raster map per image."""
    maps, start = [], 0
    for t, h, w in grid_thw:
        count = t * (h // merge) * (w // merge)
        units = natural[start:start + count].view(t, h // merge, w // merge, merge, merge, -1)
        maps.append(units.permute(0, 1, 3, 2, 4, 5).reshape(t, h * w, -1))
        start += count
    return maps


def grids_to_units(maps: Sequence[Tensor], grid_thw: Sequence[Sequence[int]], merge: int) -> Tensor:
    """The inverse of `units_to_grids`: raster maps back to [units, merge*merge, d]."""
    units = []
    for grid, (t, h, w) in zip(maps, grid_thw):
        cells = grid.view(t, h // merge, merge, w // merge, merge, -1).permute(0, 1, 3, 2, 4, 5)
        units.append(cells.reshape(-1, merge * merge, grid.shape[-1]))
    return torch.cat(units)


class VCEMerger(nn.Module):
    """VCE (paper eq. 7) on each image's patch grid, then Qwen2.5-VL's patch merger (its projector)."""

    def __init__(self, vce: VisualCueEnhancer, merger: nn.Module, vision_config: PretrainedConfig,
                 reference_blocks: list[int], include_anchor_level: bool) -> None:
        super().__init__()
        self.vce = vce
        self.merger = merger
        self.merge = int(vision_config.spatial_merge_size)
        self.window_size = int(vision_config.window_size)
        self.patch_size = int(vision_config.patch_size)
        self.reference_blocks = reference_blocks  # 0-based block indices whose outputs are the levels
        self.include_anchor_level = include_anchor_level
        # Filled during one forward of the tower by its hooks, emptied by forward() below.
        self.grid_thw: Tensor | None = None
        self.block_outputs: dict[int, Tensor] = {}

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.grid_thw is None or len(self.block_outputs) != len(self.reference_blocks):
            raise RuntimeError("VCEMerger runs inside the Qwen2.5-VL vision tower's forward (attach_vce's hooks)")
        grid_thw, outputs = self.grid_thw, self.block_outputs
        self.grid_thw, self.block_outputs = None, {}
        window = window_unit_order(grid_thw, self.merge, self.window_size, self.patch_size)
        natural = torch.argsort(window)
        grids = grid_thw.tolist()

        def as_maps(states: Tensor) -> list[Tensor]:
            units = states.view(-1, self.merge * self.merge, states.shape[-1])[natural]
            return units_to_grids(units, grids, self.merge)

        anchors = as_maps(hidden_states)
        levels = [as_maps(outputs[block]) for block in self.reference_blocks]
        enhanced = enhance_grids(self.vce, anchors, levels, [(h, w) for _, h, w in grids], self.include_anchor_level)
        units = grids_to_units(enhanced, grids, self.merge)[window]
        return self.merger(units.reshape(hidden_states.shape))


def enhance_grids(vce: VisualCueEnhancer, anchors: list[Tensor], levels: list[list[Tensor]],
                  shapes: list[tuple[int, int]], include_anchor_level: bool) -> list[Tensor]:
    """VCE over per-image maps [t, H*W, d] of varying grids: one call per distinct (H, W)."""
    out: dict[int, Tensor] = {}
    for shape in dict.fromkeys(shapes):
        members = [i for i, s in enumerate(shapes) if s == shape]
        anchor = torch.cat([anchors[i] for i in members])
        references = [torch.cat([level[i] for i in members]) for level in levels]
        if include_anchor_level:
            references = [anchor, *references]
        enhanced = vce(anchor, references, shape)
        out.update(zip(members, enhanced.split([anchors[i].shape[0] for i in members])))
    return [out[i] for i in range(len(anchors))]


@dataclass(frozen=True)
class Qwen25VLFamily(Family):
    """VCE in front of `visual.merger`; the anchor is the last block, references are earlier blocks."""

    def vision_layers(self, config: PretrainedConfig) -> int:
        return int(self.vision_config(config).depth)

    def vision_dim(self, config: PretrainedConfig) -> int:
        return int(self.vision_config(config).hidden_size)

    def is_core(self, module: nn.Module) -> bool:
        return hasattr(module, "visual") and hasattr(module, "language_model")

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.core(model).visual

    def bridge(self, model: nn.Module) -> nn.Module:
        return self.core(model).visual.merger

    def check_vce(self, config: PretrainedConfig, vce_cfg: VCESection, where: str = "") -> None:
        super().check_vce(config, vce_cfg, where)
        depth = self.vision_layers(config)
        if vce_cfg.enabled and vce_cfg.anchor_layer not in (-1, depth):
            raise ValueError(
                f"vce.anchor_layer = {vce_cfg.anchor_layer}: Qwen2.5-VL's merger reads the last block's output, "
                f"so VCE's anchor is that block; set vce.anchor_layer: -1 (the references may be any of "
                f"-{depth} .. -2)"
            )

    def attach_vce(self, model: nn.Module, vce_cfg: VCESection) -> nn.Module:
        if not vce_cfg.enabled:
            return model
        visual = self.vision_tower(model)
        if isinstance(visual.merger, VCEMerger):
            return model
        config = self.vision_config(model.config)
        self.check_vce(model.config, vce_cfg)
        depth = self.vision_layers(model.config)
        # hidden_states indexing as in LLaVA: k >= 1 is block k-1's output, -1 the last block's.
        blocks = [(index if index > 0 else depth + 1 + index) - 1 for index in vce_cfg.reference_layers]
        vce = VisualCueEnhancer.from_config(vce_cfg, self.vision_dim(model.config))
        reference = next(visual.merger.parameters())
        vce.to(device=reference.device, dtype=reference.dtype)
        merger = VCEMerger(vce, visual.merger, config, blocks, vce_cfg.include_anchor_level)
        visual.merger = merger

        def keep_grid(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            merger.grid_thw, merger.block_outputs = grid, {}

        visual.register_forward_pre_hook(keep_grid, with_kwargs=True)
        for block in set(blocks):
            def keep_output(_module: nn.Module, _args: tuple, output: Tensor, block: int = block) -> None:
                merger.block_outputs[block] = output[0] if isinstance(output, tuple) else output

            visual.blocks[block].register_forward_hook(keep_output)
        return model


QWEN2_5_VL = Qwen25VLFamily("qwen2_5_vl", "Qwen2.5-VL", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig,
                            trains=False, vce_site="visual.merger (per image grid, window order undone)")


def qwen2_5_vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's architecture: a 32-block ViT (window 112 px, full attention in blocks
    7/15/23/31) with a 2x2 merger into Qwen2.5-7B."""
    vision = {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu",
    }
    text = {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1_000_000.0,
    }
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)
