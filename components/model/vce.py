"""Visual Cue Enhancement (VCE, paper section 3.3, eq. 5-8).

The projector of LLaVA sees only one high-level CLIP map (the anchor). VCE lets
every anchor patch gather local detail from several other CLIP layers with one
multi-scale deformable cross-attention, then adds it back:

    f_vision = LN( f_a + DeformAttn(query = f_a, values = [f_ref_1 .. f_ref_L]) )

DeformAttn is the multi-scale deformable attention of Deformable DETR
(Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021), with one level per reference map: each query predicts,
per head, `points` sampling offsets on every level around its own patch centre
and a softmax weight over levels x points; the values there are read by
bilinear interpolation (zero padding, align_corners=False). This pure-PyTorch
`grid_sample` version is the reference and runs on any device; `sampler="deformable_detr"` reads
through transformers' Deformable DETR module instead, which a fused CUDA kernel can replace
(components/model/vce_sampling.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from components.config import VCESection
from components.model.vce_sampling import (
    SAMPLERS,
    deformable_detr_module,
    sample_deformable_detr,
    sample_reference,
)

Shape = tuple[int, int]


class VisualCueEnhancer(nn.Module):
    """Deformable cross-attention from the anchor map to L reference maps, residual, optional LayerNorm.

    Parameters are named as in Deformable DETR's `MSDeformAttn` (`sampling_offsets`,
    `attention_weights`, `value_proj`, `output_proj`) so that its checkpoints and
    its init map across one to one.
    """

    def __init__(
        self,
        dim: int,
        num_levels: int,
        heads: int = 16,
        points: int = 4,
        final_norm: bool = True,
        eps: float = 1e-6,
        sampler: str = "pytorch",
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"vce.sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        for name, value in (("dim", dim), ("num_levels", num_levels), ("vce.heads", heads), ("vce.points", points)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dim % heads:
            divisors = [h for h in (1, 2, 4, 8, 16, 32) if dim % h == 0]
            raise ValueError(
                f"vce.heads ({heads}) must divide the vision feature size dim ({dim}); "
                f"choose vce.heads among the divisors of {dim}, e.g. {divisors}"
            )
        self.dim = dim
        self.num_levels = num_levels
        self.heads = heads
        self.points = points
        self.head_dim = dim // heads
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.value_norm = nn.LayerNorm(dim, eps=eps)
        self.sampling_offsets = nn.Linear(dim, heads * num_levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * num_levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        # The authors' code skips this LayerNorm; eq. 7 of the paper has it.
        self.norm = nn.LayerNorm(dim, eps=eps) if final_norm else None
        self.sampler = sampler
        # No parameters: state dicts are the same under either sampler.
        self.deformable_attention = deformable_detr_module() if sampler == "deformable_detr" else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: VCESection, dim: int) -> VisualCueEnhancer:
        """One level per reference layer, plus the anchor's own map when `include_anchor_level`."""
        num_levels = len(cfg.reference_layers) + (1 if cfg.include_anchor_level else 0)
        return cls(dim, num_levels, heads=cfg.heads, points=cfg.points, final_norm=cfg.final_norm,
                   sampler=cfg.sampler)

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a radial pattern, attention starts uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(radial_offset_bias(self.heads, self.num_levels, self.points))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        for norm in (self.query_norm, self.value_norm, self.norm):
            if norm is not None:
                norm.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_levels={self.num_levels}, heads={self.heads}, points={self.points}, "
            f"final_norm={self.norm is not None}, sampler={self.sampler}"
        )

    def forward(
        self,
        anchor: Tensor,
        references: Sequence[Tensor],
        spatial_shapes: Sequence[Shape] | Shape,
        anchor_shape: Shape | None = None,
    ) -> Tensor:
        """Enhance `anchor` [B, N, d] with `references` (L tensors [B, H_l*W_l, d]); returns [B, N, d].

        `spatial_shapes` is one (H, W) shared by the anchor and every level, or a
        list of L per-level (H_l, W_l). The anchor's own grid, which places the
        reference points, is `anchor_shape` or else the first level's grid.
        """
        shapes, anchor_hw = self._check_inputs(anchor, references, spatial_shapes, anchor_shape)
        batch, num_queries, _ = anchor.shape
        query = self.query_norm(anchor)
        locations = self._sampling_locations(query, anchor_hw, shapes)
        weights = self.attention_weights(query).view(batch, num_queries, self.heads, -1).softmax(-1)
        weights = weights.view(batch, num_queries, self.heads, self.num_levels, self.points)
        sampled = self._sample_and_weigh(references, shapes, locations, weights)
        enhanced = anchor + self.output_proj(sampled.to(anchor.dtype))
        return self.norm(enhanced) if self.norm is not None else enhanced

    # ------------------------------------------------------------ internals

    def _sampling_locations(self, query: Tensor, anchor_hw: Shape, shapes: list[Shape]) -> Tensor:
        """Normalised (x, y) sampling points [B, N, heads, L, P, 2], in float32.

        Float32 because in bf16 a normalised coordinate keeps 8 bits, which is
        about 0.05 of a patch on a 24x24 grid.
        """
        batch, num_queries, _ = query.shape
        offsets = self.sampling_offsets(query).float()
        offsets = offsets.view(batch, num_queries, self.heads, self.num_levels, self.points, 2)
        # Offsets are in units of each level's cells: divide by (W_l, H_l).
        cells = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
        centres = patch_centres(*anchor_hw, device=query.device)
        return centres[None, :, None, None, None, :] + offsets / cells[None, None, None, :, None, :]

    def _sample_and_weigh(
        self, references: Sequence[Tensor], shapes: list[Shape], locations: Tensor, weights: Tensor
    ) -> Tensor:
        """Project every level's values, then read them at `locations` with the configured sampler."""
        batch = locations.shape[0]
        values = [
            self.value_proj(self.value_norm(reference)).view(batch, height * width, self.heads, self.head_dim)
            for reference, (height, width) in zip(references, shapes)
        ]
        if self.deformable_attention is not None:
            return sample_deformable_detr(self.deformable_attention, values, shapes, locations, weights)
        return sample_reference(values, shapes, locations, weights)

    def _check_inputs(
        self,
        anchor: Tensor,
        references: Sequence[Tensor],
        spatial_shapes: Sequence[Shape] | Shape,
        anchor_shape: Shape | None,
    ) -> tuple[list[Shape], Shape]:
        """Refuse mismatched shapes with a message that names the argument and the fix."""
        if anchor.dim() != 3 or anchor.shape[-1] != self.dim:
            raise ValueError(f"anchor must be [batch, patches, {self.dim}], got {list(anchor.shape)}")
        if isinstance(references, Tensor) or len(references) != self.num_levels:
            got = "a single tensor" if isinstance(references, Tensor) else f"{len(references)}"
            raise ValueError(
                f"references must be a list of {self.num_levels} maps (num_levels), got {got}; "
                "build the module with num_levels = number of reference maps (VisualCueEnhancer.from_config)"
            )
        shapes = _level_shapes(spatial_shapes, self.num_levels)
        for level, (reference, (height, width)) in enumerate(zip(references, shapes)):
            expected = [anchor.shape[0], height * width, self.dim]
            if list(reference.shape) != expected:
                raise ValueError(
                    f"references[{level}] must be {expected} (batch, H*W of spatial_shapes {(height, width)}, "
                    f"dim), got {list(reference.shape)}"
                )
        anchor_hw = shapes[0] if anchor_shape is None else _as_shape(anchor_shape, "anchor_shape")
        if anchor_hw[0] * anchor_hw[1] != anchor.shape[1]:
            raise ValueError(
                f"anchor has {anchor.shape[1]} patches but its grid {anchor_hw} holds {anchor_hw[0] * anchor_hw[1]}; "
                "pass anchor_shape=(H, W) of the anchor's own patch grid"
            )
        return shapes, anchor_hw


def radial_offset_bias(heads: int, levels: int, points: int) -> Tensor:
    """Deformable DETR's offset bias: head h looks along angle 2*pi*h/heads, point k at k+1 cells."""
    angles = torch.arange(heads, dtype=torch.float64) * (2.0 * math.pi / heads)
    directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
    directions = directions / directions.abs().max(dim=-1, keepdim=True).values
    steps = torch.arange(1, points + 1, dtype=torch.float64)
    bias = directions[:, None, None, :] * steps[None, None, :, None]  # [heads, 1, points, 2]
    return bias.expand(heads, levels, points, 2).reshape(-1).float()


def patch_centres(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Normalised (x, y) centres ((i + 0.5) / W, (j + 0.5) / H) of a row-major patch grid, [H*W, 2]."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def _as_shape(value: object, name: str) -> Shape:
    """A (H, W) pair of positive ints, or a clear error naming the argument."""
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}")


def _level_shapes(spatial_shapes: Sequence[Shape] | Shape, num_levels: int) -> list[Shape]:
    """One (H, W) for all levels, or one per level."""
    if isinstance(spatial_shapes, Sequence) and len(spatial_shapes) == 2 and all(
        isinstance(v, int) for v in spatial_shapes
    ):
        return [_as_shape(spatial_shapes, "spatial_shapes")] * num_levels
    if not isinstance(spatial_shapes, Sequence) or len(spatial_shapes) != num_levels:
        raise ValueError(
            f"spatial_shapes must be one (H, W) for all levels or a list of {num_levels} (H, W) pairs, "
            f"got {spatial_shapes!r}"
        )
    return [_as_shape(shape, f"spatial_shapes[{i}]") for i, shape in enumerate(spatial_shapes)]


def patch_grid(num_patches: int, grid: Shape | None = None) -> Shape:
    """The (H, W) patch grid: the given one if it fits, else the square one."""
    if grid is not None:
        height, width = _as_shape(grid, "grid")
        if height * width != num_patches:
            raise ValueError(f"grid {grid} holds {height * width} patches but the maps have {num_patches}")
        return height, width
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; pass grid=(H, W) for a non-square one")
    return side, side


def select_vision_features(
    hidden_states: Sequence[Tensor], cfg: VCESection, grid: Shape | None = None
) -> tuple[Tensor, list[Tensor], Shape]:
    """Anchor, reference maps and patch grid from a CLIP tower's `hidden_states` (CLS token first).

    `hidden_states` holds the embeddings and then one entry per layer, each
    [B, 1 + N, d], so layer indices follow Hugging Face's `vision_feature_layer`.
    With `cfg.include_anchor_level` the anchor's own map is the first level.
    """
    if isinstance(hidden_states, Tensor) or len(hidden_states) == 0:
        raise ValueError(
            "hidden_states must be the vision tower's tuple of per-layer outputs: "
            "call it with output_hidden_states=True"
        )
    count = len(hidden_states)

    def pick(key: str, index: int) -> Tensor:
        if not -count <= index < count:
            raise ValueError(
                f"{key} = {index} is outside hidden_states ({count} entries: embeddings + {count - 1} layers); "
                f"use -{count - 1} .. -1"
            )
        states = hidden_states[index]
        if states.dim() != 3 or states.shape[1] < 2:
            raise ValueError(f"hidden_states[{index}] must be [batch, 1 + patches, dim], got {list(states.shape)}")
        return states[:, 1:]

    anchor = pick("vce.anchor_layer", cfg.anchor_layer)
    references = [pick(f"vce.reference_layers[{i}]", layer) for i, layer in enumerate(cfg.reference_layers)]
    if cfg.include_anchor_level:
        references = [anchor, *references]
    return anchor, references, patch_grid(anchor.shape[1], grid)
