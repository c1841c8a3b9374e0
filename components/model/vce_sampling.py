"""How VCE reads its reference maps: duet's `grid_sample` reference, or Deformable DETR's maintained module.

Both compute the same multi-scale deformable sampling: per head, bilinear reads (zero padding,
align_corners=False) at normalised (x, y) locations on every level, weighted and summed over levels
and points, in float32 (in bf16 a normalised coordinate keeps 8 bits, about 0.05 of a patch on a
24 x 24 grid).

- `pytorch`: duet's own loop, one `grid_sample` per level with the heads folded into the batch. The
  reference: it runs on any device and is what the tests compare against.
- `deformable_detr`: the same tensors through transformers' `MultiScaleDeformableAttention`
  (`models/deformable_detr`). Its forward is pure PyTorch too, until the model is kernelized: on CUDA
  with the `kernels` package, `use_fused_kernel` swaps in the fused kernel kernels-community publishes
  for it (fetched once into the Hugging Face cache), so the GPU gets a maintained kernel with no code
  of ours to keep in step with CUDA.

Choosing one or the other changes no weight: the module has no parameters, so stage artifacts move
between samplers freely.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.console import warn

Shape = tuple[int, int]
SAMPLERS = ("pytorch", "deformable_detr")


def sample_reference(values: Sequence[Tensor], shapes: Sequence[Shape], locations: Tensor, weights: Tensor) -> Tensor:
    """Weighted bilinear reads, [B, N, heads * head_dim] float32.

    `values`: per level [B, H_l*W_l, heads, head_dim]; `locations` [B, N, heads, L, P, 2] in [0, 1];
    `weights` [B, N, heads, L, P].
    """
    batch, num_queries, heads, _, points, _ = locations.shape
    head_dim = values[0].shape[-1]
    folded = batch * heads
    # grid_sample's grid spans [-1, 1] over the outer cell edges (align_corners=False).
    grids = (2 * locations - 1).permute(0, 2, 3, 1, 4, 5)  # [B, heads, L, N, P, 2]
    weights = weights.permute(0, 2, 3, 1, 4).float()  # [B, heads, L, N, P]
    total = None
    for level, (value, (height, width)) in enumerate(zip(values, shapes)):
        value = value.permute(0, 2, 3, 1).reshape(folded, head_dim, height, width).float()
        grid = grids[:, :, level].reshape(folded, num_queries, points, 2)
        read = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        level_sum = (read * weights[:, :, level].reshape(folded, 1, num_queries, points)).sum(-1)
        total = level_sum if total is None else total + level_sum  # [B*heads, head_dim, N]
    return total.view(batch, heads * head_dim, num_queries).transpose(1, 2)


def deformable_detr_module() -> nn.Module:
    """A fresh transformers `MultiScaleDeformableAttention` (no parameters)."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    return MultiScaleDeformableAttention()


def sample_deformable_detr(
    module: nn.Module, values: Sequence[Tensor], shapes: Sequence[Shape], locations: Tensor, weights: Tensor
) -> Tensor:
    """The same reads through Deformable DETR's module: levels concatenated, with their shapes and offsets."""
    value = torch.cat([v.float() for v in values], dim=1)  # [B, sum H*W, heads, head_dim]
    spatial = torch.tensor(list(shapes), dtype=torch.long, device=value.device)
    starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    return module(
        value, spatial, [tuple(s) for s in shapes], starts, locations.float(), weights.float(), im2col_step=64
    )


def use_fused_kernel(model: nn.Module, device: torch.device) -> str:
    """Kernelize VCE's Deformable DETR module for `device`; returns the path VCE now samples with.

    Only on CUDA with the `kernels` package, and only modules built with `vce.sampler: deformable_detr`.
    When the kernel cannot be had (no network to fetch it, no build for this GPU), VCE keeps the
    PyTorch forward, and the user is told once why.
    """
    modules = [m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"]
    if not modules:
        return "pytorch"
    if device.type != "cuda":
        return "deformable_detr (PyTorch forward: no CUDA device)"
    if importlib.util.find_spec("kernels") is None:
        return "deformable_detr (PyTorch forward: install the kernels package for the fused CUDA kernel)"
    from kernels import Mode, kernelize
    from transformers.integrations.hub_kernels import register_kernel_mapping_transformers

    try:
        register_kernel_mapping_transformers()
        for module in modules:
            kernelize(module, device="cuda", mode=Mode.TRAINING)
    except Exception as exc:  # noqa: BLE001 - a missing kernel must not stop training; the user is told
        warn(f"VCE: the fused deformable-attention kernel is unavailable ({type(exc).__name__}: {str(exc)[:160]}); "
             "sampling with the PyTorch forward")
        return "deformable_detr (PyTorch forward: kernel unavailable)"
    return "deformable_detr (fused CUDA kernel)"
