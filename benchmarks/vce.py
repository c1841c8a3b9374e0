"""Cost of Visual Cue Enhancement next to the projector and the CLIP vision tower.

For each size (the tiny test model and CLIP ViT-L/14-336 as in LLaVA-1.5: d = 1024, 24 x 24
patches, 4 levels, 16 heads, 4 points) this measures, side by side in one run:

- forward time of VCE, of LLaVA's two-layer projector, of both chained, and of the vision tower
  (with every hidden state returned, as LLaVA calls it);
- forward+backward time of VCE, the projector and both: in training the tower is frozen and
  nothing before it is trained, so it only ever runs forward;
- parameters, and activation memory: the bytes autograd keeps for backward (saved tensors,
  counted once per storage, weights excluded), plus the peak CUDA allocation on a GPU;
- analytic forward FLOPs, to set each measured ratio beside the arithmetic one.

VCE is timed on both sampling paths side by side: `vce`, duet's pure-PyTorch `grid_sample`
reference, and `vce_detr`, the same weights sampling through transformers' Deformable DETR module
(`vce.sampler: deformable_detr`), which on a GPU with the `kernels` package runs its fused CUDA kernel.

    .venv/bin/python benchmarks/vce.py --json .duet/bench/vce.json
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from benchmarks.common import (
    default_clock,
    format_table,
    machine,
    measure_interleaved,
    mib,
    resolve_dtype,
    seconds,
    write_json,
)
from components.config import TinyModelSection, VCESection
from components.model.llava import llava_15_7b_config
from components.model.tiny import build_tokenizer, tiny_llava_config
from components.model.vce import VisualCueEnhancer
from components.model.vce_sampling import use_fused_kernel

FORWARD_CASES = ("vce", "projector", "vce+projector", "vision_tower", "vce_detr")
TRAIN_CASES = ("vce", "projector", "vce+projector", "vce_detr")


@dataclass(frozen=True)
class SizeRun:
    """One model size and how often to time it (calls per sample differ: the tower is slow)."""

    arch: str  # "tiny" or "llava-1.5-7b" (CLIP ViT-L/14-336 + a 4096-wide projector)
    forward_repeats: int
    train_repeats: int
    forward_number: dict[str, int]
    train_number: int


SIZES: dict[str, SizeRun] = {
    "tiny": SizeRun("tiny", forward_repeats=15, train_repeats=15,
                    forward_number={"vce": 20, "projector": 20, "vce+projector": 20, "vision_tower": 5},
                    train_number=10),
    "vit-l": SizeRun("llava-1.5-7b", forward_repeats=3, train_repeats=3,
                     forward_number={"vce": 3, "projector": 3, "vce+projector": 2, "vision_tower": 1},
                     train_number=1),
}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"sizes": ["tiny"], "repeat_scale": 0.2, "device": "cpu", "dtype": "float32", "threads": 1},
    "cpu": {"sizes": ["tiny", "vit-l"], "repeat_scale": 1.0, "device": "cpu", "dtype": "float32", "threads": 1},
    "gpu": {"sizes": ["tiny", "vit-l"], "repeat_scale": 3.0, "device": "cuda", "dtype": "bfloat16", "threads": 0},
}


# ---------------------------------------------------------------- analytic FLOPs (forward)


def vision_tower_flops(vc: CLIPVisionConfig) -> float:
    """CLIP forward for one image: patch embedding + every layer (all run for hidden_states)."""
    patches = (vc.image_size // vc.patch_size) ** 2
    n, d = patches + 1, vc.hidden_size
    per_layer = 2 * n * (4 * d * d + 2 * d * vc.intermediate_size) + 4 * n * n * d
    return vc.num_hidden_layers * per_layer + 2 * patches * 3 * vc.patch_size**2 * d


def vce_flops(dim: int, patches: int, levels: int, heads: int, points: int) -> float:
    """Deformable cross-attention: offsets/weights from the query, value projection per level,
    bilinear reads (4 taps + a weight per sampled channel), output projection."""
    samples = heads * levels * points
    per_query = 2 * dim * samples * 3 + 2 * dim * dim + 10 * levels * points * dim
    return patches * per_query + levels * patches * 2 * dim * dim


def projector_flops(vision_dim: int, text_dim: int, patches: int) -> float:
    return 2 * patches * (vision_dim * text_dim + text_dim * text_dim)


# ---------------------------------------------------------------- memory


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while `fn` runs a forward: what training holds per step.

    Each storage counts once (views share it); parameters (weights saved for the input gradient)
    are excluded, being no activation.
    """
    excluded = {p.untyped_storage().data_ptr() for p in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA memory allocated by `fn` above what was allocated before (None off GPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


# ---------------------------------------------------------------- one size


def build_parts(
    arch: str, device: torch.device, dtype: torch.dtype
) -> tuple[LlavaConfig, VisualCueEnhancer, nn.Module, CLIPVisionModel]:
    """The LLaVA config, VCE (default config: anchor + 3 references), projector and vision tower."""
    if arch == "tiny":
        config = tiny_llava_config(TinyModelSection(warmup_steps=0), build_tokenizer(TinyModelSection().vocab_size))
    else:
        config = llava_15_7b_config()
    torch.manual_seed(0)
    vce = VisualCueEnhancer.from_config(VCESection(), config.vision_config.hidden_size)
    projector = LlavaMultiModalProjector(config)
    tower = CLIPVisionModel(config.vision_config).requires_grad_(False).eval()
    return (config, vce.to(device=device, dtype=dtype), projector.to(device=device, dtype=dtype),
            tower.to(device=device, dtype=dtype))


def bench_size(name: str, run: SizeRun, scale: float, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    config, vce, projector, tower = build_parts(run.arch, device, dtype)
    vce_detr = VisualCueEnhancer.from_config(VCESection(sampler="deformable_detr"), config.vision_config.hidden_size)
    vce_detr.load_state_dict(vce.state_dict())
    vce_detr.to(device=device, dtype=dtype)
    detr_path = use_fused_kernel(vce_detr, device)
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    patches, dim = side * side, vc.hidden_size
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
    cfg = VCESection()
    anchor = hidden[cfg.anchor_layer][:, 1:].contiguous()
    references = [anchor] + [hidden[i][:, 1:].contiguous() for i in cfg.reference_layers]
    grad_vce = torch.randn(1, patches, dim, generator=gen).to(device=device, dtype=dtype)
    grad_proj = torch.randn(1, patches, config.text_config.hidden_size, generator=gen).to(device=device, dtype=dtype)

    def run_vce() -> torch.Tensor:
        return vce(anchor, references, (side, side))

    def run_projector() -> torch.Tensor:
        return projector(anchor)

    def run_both() -> torch.Tensor:
        return projector(vce(anchor, references, (side, side)))

    def run_vce_detr() -> torch.Tensor:
        return vce_detr(anchor, references, (side, side))

    forward_fns = {"vce": run_vce, "projector": run_projector, "vce+projector": run_both,
                   "vision_tower": lambda: tower(pixels, output_hidden_states=True), "vce_detr": run_vce_detr}

    def inference(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn()
        return call

    def train(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            for module in (vce, vce_detr, projector):
                module.zero_grad(set_to_none=True)
            fn().backward(grad)
        return call

    repeats = max(2, round(run.forward_repeats * scale))
    for case in ("vce", "projector", "vce+projector", "vce_detr"):  # the tower was warmed up by the call above
        inference(forward_fns[case])()
    forward = measure_interleaved({k: inference(forward_fns[k]) for k in FORWARD_CASES}, repeats, 0,
                                  run.forward_number, device, f"vce {name} forward", default_clock(device))
    for module in (vce, vce_detr, projector):
        module.train()
    train_cases = {"vce": train(run_vce, grad_vce), "projector": train(run_projector, grad_proj),
                   "vce+projector": train(run_both, grad_proj), "vce_detr": train(run_vce_detr, grad_vce)}
    repeats = max(2, round(run.train_repeats * scale))
    backward = measure_interleaved(train_cases, repeats, 1, run.train_number, device, f"vce {name} fwd+bwd",
                                  default_clock(device))

    def paired(timing: Any, num: str, den: str) -> float:
        return statistics.median(r[num] / r[den] for r in timing.repetitions())

    # Vision side of a stage-1 step: tower forward, then the trained bridge forward+backward. The
    # two phases are timed separately, so this one is a ratio of medians, not paired.
    tower_seconds = forward.median("vision_tower")
    overhead = (tower_seconds + backward.median("vce+projector")) / (tower_seconds + backward.median("projector"))
    flops = {
        "vce": vce_flops(dim, patches, vce.num_levels, vce.heads, vce.points),
        "projector": projector_flops(dim, config.text_config.hidden_size, patches),
        "vision_tower": vision_tower_flops(vc),
    }
    params = {"vce": _count(vce), "projector": _count(projector), "vision_tower": _count(tower)}
    weights = [*vce.parameters(), *projector.parameters()]
    activations = {
        "vce": saved_tensor_bytes(run_vce, weights),
        "projector": saved_tensor_bytes(run_projector, weights),
        "vce+projector": saved_tensor_bytes(run_both, weights),
        "vce_detr": saved_tensor_bytes(run_vce_detr, [*weights, *vce_detr.parameters()]),
    }
    peak = {k: cuda_peak_bytes(forward_fns[k], device) for k in TRAIN_CASES}
    return {
        "shape": {"dim": dim, "grid": [side, side], "levels": vce.num_levels, "heads": vce.heads,
                  "points": vce.points, "text_dim": config.text_config.hidden_size, "batch": 1,
                  "vision_layers": vc.num_hidden_layers, "image_size": vc.image_size},
        "params": params,
        "params_mib_fp16": {k: mib(2 * v) for k, v in params.items()},
        "seconds": {
            "forward": {k: forward.median(k) for k in FORWARD_CASES},
            "forward_backward": {k: backward.median(k) for k in TRAIN_CASES},
        },
        "wall_seconds": {
            "forward": {k: statistics.median(forward.wall[k]) for k in FORWARD_CASES},
            "forward_backward": {k: statistics.median(backward.wall[k]) for k in TRAIN_CASES},
        },
        "ratios": {
            "forward": {
                "vce/projector": paired(forward, "vce", "projector"),
                "vce/vision_tower": paired(forward, "vce", "vision_tower"),
                "vce+projector/projector": paired(forward, "vce+projector", "projector"),
                "vce_detr/vce": paired(forward, "vce_detr", "vce"),
            },
            "forward_backward": {
                "vce/projector": paired(backward, "vce", "projector"),
                "vce+projector/projector": paired(backward, "vce+projector", "projector"),
                "vce/vision_tower_forward": backward.median("vce") / forward.median("vision_tower"),
                "vce_detr/vce": paired(backward, "vce_detr", "vce"),
            },
            "stage1_vision_side": overhead,
        },
        "flop_ratio": {
            "vce/projector": flops["vce"] / flops["projector"],
            "vce/vision_tower": flops["vce"] / flops["vision_tower"],
            "vce+projector/projector": (flops["vce"] + flops["projector"]) / flops["projector"],
        },
        "flops": flops,
        "activation_bytes": activations,
        "activation_mib": {k: mib(v) for k, v in activations.items()},
        "cuda_peak_forward_bytes": peak if device.type == "cuda" else None,
        "vce_detr_path": detr_path,
    }


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- report


def print_report(payload: dict[str, Any]) -> None:
    rows = []
    for name, res in payload["sizes"].items():
        fwd, bwd, flop = res["ratios"]["forward"], res["ratios"]["forward_backward"], res["flop_ratio"]
        rows.append([name, fwd["vce/projector"], flop["vce/projector"], bwd["vce/projector"],
                     fwd["vce/vision_tower"], flop["vce/vision_tower"], bwd["vce/vision_tower_forward"],
                     fwd["vce+projector/projector"], res["ratios"]["stage1_vision_side"]])
    print("\nVCE cost ratios (forward paired per repetition; FLOPs analytic)")
    print(format_table(["size", "fwd VCE/proj", "FLOPs", "fwd+bwd VCE/proj", "fwd VCE/tower", "FLOPs",
                        "fwd+bwd VCE/tower fwd", "fwd (VCE+proj)/proj", "stage-1 vision side"], rows))
    rows = []
    for name, res in payload["sizes"].items():
        for part in ("vce", "vce_detr", "projector", "vce+projector", "vision_tower"):
            params = res["params"].get(part.removesuffix("_detr"), res["params"]["vce"] + res["params"]["projector"])
            act = res["activation_mib"].get(part)
            rows.append([name, part, f"{params / 1e6:.3f} M", f"{mib(2 * params):.2f}",
                         seconds(res["seconds"]["forward"][part]),
                         seconds(res["seconds"]["forward_backward"][part]) if part in TRAIN_CASES else "frozen",
                         f"{act:.2f}" if act is not None else "-"])
    print("\nSizes and times (medians)")
    print(format_table(["size", "part", "params", "MiB fp16", "forward", "fwd+bwd", "saved activations MiB"],
                       rows))
    print("\nVCE sampling paths (vce_detr / vce, paired per repetition)")
    rows = [[name, res["vce_detr_path"], res["ratios"]["forward"]["vce_detr/vce"],
             res["ratios"]["forward_backward"]["vce_detr/vce"]] for name, res in payload["sizes"].items()]
    print(format_table(["size", "vce_detr path", "forward", "fwd+bwd"], rows))


def run(preset_name: str, sizes: list[str] | None = None, device: str | None = None, dtype: str | None = None,
        threads: int | None = None, json_path: str | None = None) -> dict[str, Any]:
    preset = PRESETS[preset_name]
    threads = preset["threads"] if threads is None else threads
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device or preset["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset_name!r} needs a CUDA device; none is available (try --preset cpu)")
    torch_dtype = resolve_dtype(dtype or preset["dtype"])
    chosen = sizes or preset["sizes"]
    unknown = sorted(set(chosen) - set(SIZES))
    if unknown:
        raise SystemExit(f"unknown --sizes {unknown}; choose from {sorted(SIZES)}")
    payload = {
        "sizes": {name: bench_size(name, SIZES[name], preset["repeat_scale"], dev, torch_dtype) for name in chosen},
        "machine": machine(),
        "settings": {"preset": preset_name, "device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."),
                     "threads": torch.get_num_threads(), "clock": default_clock(dev),
                     "vce_path": "grid_sample reference; vce_detr: Deformable DETR module"},
    }
    write_json(json_path, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (tiny size, few repetitions)")
    parser.add_argument("--sizes", help=f"comma-separated subset of {sorted(SIZES)}")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--dtype", help="override the preset's dtype (float32, bfloat16, float16)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",") if args.sizes else None
    payload = run("quick" if args.quick else args.preset, sizes, args.device, args.dtype, args.threads, args.json)
    print_report(payload)


if __name__ == "__main__":
    main()
