"""Model FLOPs of a training step and MFU: how much of the device's peak the training does useful work with.

Counted from the architecture and each micro-batch, PaLM's convention (Chowdhery et al. 2022, app. B):
a matrix multiply with N weights costs 2N FLOPs per token forward; backward costs 2N for the gradient
of its input and 2N more for the gradient of its weights, so 6N for a trained layer, 4N for a frozen
one that gradients pass through, 2N for a frozen one they do not reach. Attention adds 4·s·d per token
and layer forward (QK^T and AV over the sample's s tokens, no causal discount), 3x that with backward.
Embedding lookups count nothing. Gradient checkpointing's recomputed forward is not counted: model
FLOPs, not hardware FLOPs, as MFU is defined.

In duet's stages:
- the vision tower (CLIP) is frozen and nothing before it trains: forward only, on its patches + CLS;
- VCE + projector: 6N per visual token when trained (stage 1, stage 2 unless `adapter_only`), else 2N
  (VCE's sampling is counted by its weights, an estimate: its bilinear sampling has none);
- the language model is frozen but gradients pass through it to what trains before it: 4N, plus
  attention;
- the adapter trains: 6N per token (every expert of a mixture counted, an upper bound for top-k).

Kept free of DeepSpeed and Ray imports: the benchmarks and the GPU check use it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from components.model.sizes import iter_component_params

# Dense bf16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets (SXM parts where there
# are two). Matched against torch.cuda.get_device_name(); `scaling.peak_tflops` overrides.
PEAK_TFLOPS_BF16 = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "V100": 125.0,  # fp16: V100 has no bf16
}


def device_peak_tflops(override: float | None, device: torch.device | None = None) -> float | None:
    """The per-device peak MFU is measured against: the override, else the table for a known GPU, else None."""
    if override is not None:
        return override
    if device is None or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):  # "L40S" before "L40" before "L4"
        if key in name:
            return PEAK_TFLOPS_BF16[key]
    return None


@dataclass(frozen=True)
class StepFlops:
    """What a micro-batch's model FLOPs depend on, taken from the model once."""

    vision_matmul_params: int
    vision_layers: int
    vision_hidden: int
    vision_tokens: int  # per image: patches + CLS
    bridge_params: int  # VCE + projector
    bridge_trained: bool
    visual_tokens: int  # per image, what the projector outputs
    lm_matmul_params: int
    lm_layers: int
    lm_hidden: int
    adapter_params: int

    @classmethod
    def from_model(cls, model: nn.Module) -> StepFlops:
        """From a LLaVA model with VCE (and adapter) as duet builds it, real or on the meta device."""
        params = dict.fromkeys(("vision_tower", "bridge", "language_model", "adapter"), 0)
        bridge_trained = False
        seen: set[int] = set()
        for component, name, param in iter_component_params(model):
            if id(param) in seen or "embed_tokens" in name or "position_embedding" in name:
                continue  # lookups, not multiplies (tied weights counted once)
            seen.add(id(param))
            key = "bridge" if component in ("vce", "projector") else component
            params[key] += getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions keep the full count
            bridge_trained |= key == "bridge" and param.requires_grad
        config = _llava_config(model)
        vision, text = config.vision_config, config.text_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return cls(
            vision_matmul_params=params["vision_tower"], vision_layers=vision.num_hidden_layers,
            vision_hidden=vision.hidden_size, vision_tokens=patches + 1, bridge_params=params["bridge"],
            bridge_trained=bridge_trained, visual_tokens=patches, lm_matmul_params=params["language_model"],
            lm_layers=text.num_hidden_layers, lm_hidden=text.hidden_size, adapter_params=params["adapter"],
        )

    def per_image(self) -> float:
        """Vision tower forward and VCE + projector (forward, and backward when trained) for one image."""
        tokens = self.vision_tokens
        vision = 2 * self.vision_matmul_params * tokens + 4 * self.vision_layers * self.vision_hidden * tokens**2
        bridge = (6 if self.bridge_trained else 2) * self.bridge_params * self.visual_tokens
        return float(vision + bridge)

    def per_sample(self, tokens: int) -> float:
        """Language model and adapter for one sample of `tokens` tokens (its visual tokens included)."""
        matmul = (4 * self.lm_matmul_params + 6 * self.adapter_params) * tokens
        attention = 3 * 4 * self.lm_layers * self.lm_hidden * tokens**2
        return float(matmul + attention)

    def batch(self, lengths: Sequence[int], images: int) -> float:
        """Model FLOPs of one micro-batch: its samples' real lengths (padding is not useful work, and a packed
        sample attends only to itself) and images."""
        return images * self.per_image() + sum(self.per_sample(int(n)) for n in lengths)


def _llava_config(model: nn.Module):
    """The LlavaConfig under PEFT's and duet's wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def model_tflops_per_s(flops: float, seconds: float, devices: int) -> float:
    """Model TFLOP/s per device: a step's FLOPs over all devices, its wall time, the device count."""
    return flops / max(seconds, 1e-9) / max(devices, 1) / 1e12


def mfu(flops: float, seconds: float, devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the share of the devices' peak that the model's own FLOPs used."""
    return model_tflops_per_s(flops, seconds, devices) / peak_tflops
