"""The GPU check: one command on one GPU, one JSON summary on standard output.

Three parts, each timed and each allowed to fail without losing the others:

- adapters: Dual-LoRA against LoRA and the mixture baselines at the paper's shapes (d = 4096, r = 64,
  4 experts x 16), whole-model inference and a train step (benchmarks/adapters.py, preset gpu);
- vce: VCE at CLIP ViT-L/14-336 on both sampling paths (benchmarks/vce.py, preset gpu, size vit-l);
- step_loop: a stage-2 step loop on LLaVA-1.5-7B's architecture with random weights in bf16: tokens/s,
  MFU, peak memory, Dual-LoRA vs LoRA step time (benchmarks/step_loop.py, preset gpu).

Needs torch, transformers, peft and safetensors, plus pydantic, PyYAML and Pillow (wheels next to
it: see benchmarks/gpu_check.sh); never Ray, MLflow or DeepSpeed. `--dry-run` runs the same code at
tiny sizes on the CPU. Each part's tables go to standard error, its full JSON under --out.

    bash benchmarks/gpu_check.sh                 # on the GPU machine
    bash benchmarks/gpu_check.sh --dry-run       # anywhere, in about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What the parts import beyond the standard library, and the wheel that provides each.
REQUIRED = {"torch": "torch", "transformers": "transformers", "peft": "peft", "safetensors": "safetensors",
            "pydantic": "pydantic (with pydantic-core, annotated-types, typing-inspection)", "yaml": "PyYAML",
            "PIL": "pillow", "numpy": "numpy"}
PARTS = ("adapters", "vce", "step_loop")


def missing_modules() -> list[str]:
    """The wheels whose modules cannot be imported here."""
    return [wheel for module, wheel in REQUIRED.items() if importlib.util.find_spec(module) is None]


def run_part(name: str, dry_run: bool, out: Path, peak_tflops: float | None) -> dict[str, Any]:
    """One part's key figures (the full payload goes to out/NAME.json)."""
    path = str(out / f"{name}.json")
    if name == "adapters":
        from benchmarks import adapters

        payload = adapters.run("quick" if dry_run else "gpu", json_path=path)
        adapters.print_report(payload)
        return {"whole_model": payload["whole_model"], "targets": payload["targets"],
                "layer_forward": payload["layer"]["forward"]}
    if name == "vce":
        from benchmarks import vce

        size = "tiny" if dry_run else "vit-l"
        payload = vce.run("quick" if dry_run else "gpu", sizes=[size], json_path=path)
        vce.print_report(payload)
        result = payload["sizes"][size]
        return {"size": size, "seconds": result["seconds"], "ratios": result["ratios"],
                "vce_detr_path": result["vce_detr_path"], "cuda_peak_forward_bytes": result["cuda_peak_forward_bytes"]}
    from benchmarks import step_loop

    payload = step_loop.run("quick" if dry_run else "gpu", peak_tflops=peak_tflops, json_path=path)
    step_loop.print_report(payload)
    keys = ("step_s", "tokens_per_s", "model_tflops_per_s", "mfu", "peak_memory_gib")
    return {"methods": {m: {k: r[k] for k in keys} for m, r in payload["methods"].items()},
            "dual_lora/lora_step": payload["dual_lora/lora_step"], "settings": payload["settings"]}


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn's result with its wall seconds, or the error that stopped it (its traceback to stderr)."""
    start = time.perf_counter()
    try:
        result = {"status": "ok", **fn()}
    except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: imports and arguments")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", help="folder for each part's full JSON (default: $OUT, else .duet/gpu_check)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak TFLOP/s for MFU (default: known GPUs)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        parser.error(f"--only {args.only!r}: choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        print(f"gpu_check: cannot import {', '.join(missing)}: put their wheels in benchmarks/wheels "
              "(`make gpu-wheels` downloads them) and run benchmarks/gpu_check.sh", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run it on the GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or ".duet/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "dry_run": args.dry_run, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu",
    }
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the tables; standard output carries only the summary
        for name in args.parts:
            summary[name] = timed(lambda name=name: run_part(name, args.dry_run, out, args.peak_tflops))
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0 if all(summary[name]["status"] == "ok" for name in args.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
