"""A bare stage-2 training step loop on one device: tokens/s, MFU, peak memory, Dual-LoRA against LoRA.

The step is what a stage-2 worker does per optimizer step without the cluster around it: forward and
backward of a LLaVA with VCE and the adapter on q_proj/v_proj (projector, VCE and adapter trained,
vision tower and language model frozen), then AdamW. No Ray, DeepSpeed or MLflow, so it runs where
only torch, transformers and peft are installed (benchmarks/gpu_check.sh). Weights are random: the
numbers are timing, not quality. The base, VCE and projector are in the preset's dtype (bf16 on the
GPU, as DeepSpeed's bf16 mode computes; its fp32 master weights are left out); PEFT keeps the adapter's
weights in fp32 (`autocast_adapter_dtype`), as in training.

LoRA and Dual-LoRA share one set of base weights (weight-sharing copies, benchmarks/adapters.py) and
are timed interleaved, so their ratio isolates the adapter. Model FLOPs and MFU follow
components/train/flops.py, the same count the training loop logs; MFU needs the device's peak (a
table for known GPUs, or --peak-tflops).

    .venv/bin/python benchmarks/step_loop.py --preset quick
    python benchmarks/step_loop.py --preset gpu --json step_loop.json     # one GPU, LLaVA-1.5-7B shapes
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from benchmarks.adapters import adapter_config, build_config, model_inputs, share_weights
from benchmarks.common import (
    default_clock,
    format_table,
    machine,
    measure_interleaved,
    resolve_dtype,
    seconds,
    write_json,
)
from components.config import VCESection
from components.model.adapters.apply import apply_adapter
from components.model.llava import attach_vce
from components.model.stages import set_trainable
from components.train.flops import StepFlops, device_peak_tflops, mfu, model_tflops_per_s

METHODS = ("lora", "dual_lora")
BASELINE = "lora"
TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class StepPreset:
    """Model, batch and repetitions of one run (`arch` and `tiny` as in benchmarks/adapters.py)."""

    device: str
    dtype: str
    arch: str  # "tiny" or "llava-1.5-7b"
    rank: int
    batch: int
    text_tokens: int  # per sample, after BOS and the image's tokens
    repeats: int
    warmup: int = 2
    threads: int = 0
    tiny: dict[str, int] = field(default_factory=dict)


PRESETS: dict[str, StepPreset] = {
    # Seconds on a CPU: every code path at toy sizes (the GPU check's --dry-run).
    "quick": StepPreset(
        device="cpu", dtype="float32", arch="tiny", rank=8, batch=2, text_tokens=16, repeats=3, warmup=1, threads=1,
        tiny=dict(vision_hidden=32, vision_layers=20, vision_heads=2, image_size=32, patch_size=8,
                  text_hidden=64, text_layers=2, text_heads=4, text_intermediate=172),
    ),
    # LLaVA-1.5-7B in bf16, the paper's r = 64, two 2,048-token samples (576 image tokens each).
    "gpu": StepPreset(device="cuda", dtype="bfloat16", arch="llava-1.5-7b", rank=64, batch=2, text_tokens=1471,
                      repeats=10, warmup=3),
}


def build_base(preset: StepPreset, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any, int]:
    """The random-weight LLaVA with VCE, made directly on the device in the dtype (a 7B never touches fp32)."""
    config, bos = build_config(preset)  # reads only .arch and .tiny
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return attach_vce(base, VCESection()), config, bos


def run(preset_name: str, device: str | None = None, peak_tflops: float | None = None,
        json_path: str | None = None) -> dict[str, Any]:
    preset = PRESETS[preset_name]
    if preset.threads > 0:
        torch.set_num_threads(preset.threads)
    dev = torch.device(device or preset.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset_name!r} needs a CUDA device; none is available (try --preset quick)")
    dtype = resolve_dtype(preset.dtype)
    base, config, bos = build_base(preset, dev, dtype)
    models = {}
    for method in METHODS:
        torch.manual_seed(1)
        models[method] = apply_adapter(share_weights(base), adapter_config(method, preset.rank, TARGETS))
    for model in models.values():  # PEFT froze the shared tensors it wrapped: the stage's set back on
        set_trainable(model, 2)
        model.train()
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                  for m, model in models.items()}
    batch = model_inputs(config, bos, preset.batch, preset.text_tokens, dev, dtype, labels=True)

    def step(method: str):
        def call() -> None:
            optimizers[method].zero_grad(set_to_none=True)
            models[method](**batch).loss.backward()
            optimizers[method].step()
        return call

    timing = measure_interleaved({m: step(m) for m in METHODS}, preset.repeats, preset.warmup, 1, dev,
                                 "step loop", default_clock(dev))
    peak_memory = {m: _peak_bytes(step(m), dev) for m in METHODS}
    tokens = int(batch["attention_mask"].sum())
    peak = device_peak_tflops(peak_tflops, dev)
    results: dict[str, dict[str, Any]] = {}
    for method, model in models.items():
        flops = StepFlops.from_model(model).batch(batch["attention_mask"].sum(dim=1).tolist(), images=preset.batch)
        step_s = timing.median(method)
        results[method] = {
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "model_tflops_per_s": model_tflops_per_s(flops, step_s, 1),
            "mfu": mfu(flops, step_s, 1, peak) if peak else None,
            "peak_memory_gib": peak_memory[method] / 2**30 if peak_memory[method] is not None else None,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_flops": flops,
        }
    payload = {
        "methods": results,
        "dual_lora/lora_step": timing.ratios(BASELINE)["dual_lora"],
        "dual_lora/lora_step_iqr": list(timing.ratio_spread(BASELINE)["dual_lora"]),
        "settings": {"preset": preset_name, "device": str(dev), "dtype": preset.dtype, "peak_tflops": peak,
                     "tokens_per_step": tokens, "sequence": batch["input_ids"].shape[1],
                     "base_params": sum(p.numel() for p in base.parameters()), "clock": default_clock(dev),
                     "threads": torch.get_num_threads(),
                     **{k: v for k, v in asdict(preset).items() if k not in ("device", "dtype", "tiny")}},
        "machine": machine(),
    }
    write_json(json_path, payload)
    return payload


def _peak_bytes(step: Any, device: torch.device) -> int | None:
    """Peak CUDA memory of one step, everything resident included (base weights, optimizer states)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def print_report(payload: dict[str, Any]) -> None:
    rows = []
    for method, res in payload["methods"].items():
        rows.append([method, seconds(res["step_s"]), f"{res['tokens_per_s']:.0f}", f"{res['model_tflops_per_s']:.3f}",
                     "-" if res["mfu"] is None else f"{100 * res['mfu']:.1f} %",
                     "-" if res["peak_memory_gib"] is None else f"{res['peak_memory_gib']:.1f}",
                     f"{res['trainable_params'] / 1e6:.2f} M"])
    s = payload["settings"]
    print(f"\nStage-2 step loop ({s['preset']}: {s['device']}, {s['dtype']}, {s['batch']} x {s['sequence']} tokens)")
    print(format_table(["method", "step", "tokens/s", "model TFLOP/s", "MFU", "peak GiB", "trained"], rows))
    low, high = payload["dual_lora/lora_step_iqr"]
    print(f"dual_lora / lora step time: {payload['dual_lora/lora_step']:.3f} (IQR {low:.3f}-{high:.3f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    print_report(run(args.preset, args.device, args.peak_tflops, args.json))


if __name__ == "__main__":
    main()
