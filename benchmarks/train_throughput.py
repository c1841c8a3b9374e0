"""Stage-2 training throughput: the full Ray Data -> Ray Train -> DeepSpeed path against a bare PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py [--steps 24] [--workers 2] [--json PATH] [--quick]

Same tiny LLaVA (Dual-LoRA + VCE), same data, same global batch, same machine. The
bare loop trains in one process with one torch thread on micro-batches that were
preprocessed and collated into memory beforehand, so it measures the model alone on
one core. The pipeline streams the shards through decoding, tokenisation and the CLIP
transform on Ray Data while DeepSpeed trains on `--workers` Ray Train workers (one
thread each), gradients reduced over gloo. Both count the same tokens (attention-mask
ones) over the steps after `--skip` warm-up steps.

Overhead = 1 - (pipeline tokens/s per worker) / (bare tokens/s on one core): what the
data pipeline, Ray Train and DeepSpeed's communication cost each core. One thread per
core is the fair baseline: on a small shared CPU, two torch threads in one process run
this model 3-4x slower than one (measured), which would flatter the pipeline.
The target is <= 15% with 2 CPU workers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from benchmarks.common import format_table, machine, write_json
from components.cluster import init_ray
from components.config import DuetConfig, load_config
from components.data.dataset import build_dataset, make_collate
from components.model.artifact import save_stage_artifact
from components.model.stages import build_model, parameter_groups
from components.quiet import quiet_driver
from components.train.flops import StepFlops, model_tflops_per_s
from components.train.loop import per_sample_loss
from components.train.stage import StageData, run_stage
from components.train.step_time import PHASE_LABELS, PHASES, StepClock, mean_breakdown
from components.workflow.startup import ensure_base_model, ensure_dataset, stage_data

REPO = Path(__file__).resolve().parents[1]


def bench_config(work: Path, args: argparse.Namespace) -> DuetConfig:
    return load_config(REPO / "pipelines/configs/demo.yaml", [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
        "run.name=throughput", f"data.num_records={args.records}", "data.caption_records=50",
        "data.records_per_shard=200", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "data.val_fraction=0",
        "data.test_fraction=0.02", f"scaling.num_workers={args.workers}", f"stage2.global_batch={args.global_batch}",
        f"stage2.micro_batch={args.micro_batch}", f"stage2.max_steps={args.steps}",
        f"stage2.checkpoint_every={args.steps}",
    ])


@dataclass
class PathResult:
    tokens_per_s: float
    tflops_per_s_per_core: float  # model FLOPs (components.train.flops)
    breakdown: dict[str, float]  # mean seconds per step of each phase (components.train.step_time)


def pipeline_rates(cfg: DuetConfig, data: StageData, stage1: str, skip: int) -> PathResult:
    """The whole training path, from its step metrics."""
    result = run_stage(cfg, 2, data, stage1_artifact=stage1, artifact=str(Path(cfg.run.work_dir) / "s2"))
    rows = [r for r in result.history if r["step"] > skip]
    seconds = sum(r["step_time_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    tflops = sum(r["model_tflops_per_s"] * r["step_time_s"] for r in rows)
    return PathResult(tokens / seconds, tflops / seconds, mean_breakdown(rows))


def bare_rates(cfg: DuetConfig, data: StageData, stage1: str, steps: int, skip: int) -> PathResult:
    """Plain PyTorch AdamW on pre-collated micro-batches: the model's own speed on this machine, and where
    its step time goes (no data wait, communication or reporting: there is none)."""
    stage = cfg.stage2
    accumulation = stage.global_batch // stage.micro_batch
    needed = steps * stage.global_batch
    rows = build_dataset(data.train_uri, cfg, data.processor_dir, data.num_visual_tokens).take(needed)
    collate = make_collate(data.processor_dir, cfg.storage)
    batches = []
    for start in range(0, needed, stage.micro_batch):
        chunk = rows[start:start + stage.micro_batch]
        batches.append(collate({k: [r[k] for r in chunk] for k in ("input_ids", "labels", "pixel_values")}))
    torch.set_num_threads(1)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, 2, stage1)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, stage))
    counts = StepFlops.from_model(model)
    tokens, elapsed, flops = 0, 0.0, 0.0
    clock, rows = StepClock(), []
    for step in range(steps):
        started = time.perf_counter()
        step_tokens, step_flops = 0, 0.0
        for batch in batches[step * accumulation:(step + 1) * accumulation]:
            with clock.phase("forward"):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"])
                loss = per_sample_loss(out.logits, batch["labels"])[0] / accumulation
            with clock.phase("backward"):
                loss.backward()
            step_tokens += int(batch["attention_mask"].sum())
            step_flops += counts.batch(batch["attention_mask"], batch["pixel_values"].shape[0])
        with clock.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        taken = clock.take()
        if step >= skip:
            tokens += step_tokens
            flops += step_flops
            elapsed += time.perf_counter() - started
            rows.append(taken)
    return PathResult(tokens / elapsed, model_tflops_per_s(flops, elapsed, 1), mean_breakdown(rows))


def matmul_peak_tflops(size: int = 1024, repeats: int = 20) -> float:
    """What one torch thread of this CPU reaches on a large fp32 matrix multiply: the CPU's practical peak,
    the denominator of MFU where no data-sheet peak applies."""
    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out of the rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--records", type=int, default=1200)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.skip, args.records = 4, 1, 200
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as tmp:
        work = Path(tmp)
        cfg = bench_config(work, args).with_absolute_paths()
        quiet_driver()  # what a pipeline driver prints: no progress bars between the tables
        init_ray(cfg)
        base, _ = ensure_base_model(cfg, ensure_dataset(cfg))
        data = stage_data(cfg, 2, base)
        stage1 = str(work / "stage1")
        torch.manual_seed(0)
        save_stage_artifact(build_model(cfg, 1), cfg, 1, stage1, data_digest=None)
        peak = matmul_peak_tflops()
        bare_path = bare_rates(cfg, data, stage1, args.steps, args.skip)
        ray_path = pipeline_rates(cfg, data, stage1, args.skip)
        ray.shutdown()
    bare, piped = bare_path.tokens_per_s, ray_path.tokens_per_s
    bare_phases, piped_phases = bare_path.breakdown, ray_path.breakdown
    per_worker = piped / args.workers
    overhead = 1 - per_worker / bare
    print(format_table(
        ["path", "tokens/s", "tokens/s per core", "relative per core"],
        [["bare PyTorch loop (in-memory batches, 1 thread)", round(bare, 1), round(bare, 1), 1.0],
         [f"Ray Data -> Ray Train ({args.workers} workers) -> DeepSpeed", round(piped, 1), round(per_worker, 1),
          round(per_worker / bare, 3)]],
    ))
    print(f"pipeline overhead per core: {overhead:.1%} (target <= 15%)")
    print(f"model TFLOP/s per core: bare {bare_path.tflops_per_s_per_core:.4f}, Ray path "
          f"{ray_path.tflops_per_s_per_core:.4f}; MFU against one thread's fp32 matmul peak ({peak:.4f} TFLOP/s): "
          f"{bare_path.tflops_per_s_per_core / peak:.1%} and {ray_path.tflops_per_s_per_core / peak:.1%}")
    print("\nseconds per step (mean over the steps measured):")
    print(format_table(
        ["phase", "bare loop", "Ray path"],
        [*[[PHASE_LABELS.get(p, p), round(bare_phases[p], 4), round(piped_phases[p], 4)] for p in PHASES],
         ["total", round(sum(bare_phases.values()), 4), round(sum(piped_phases.values()), 4)]],
    ))
    write_json(args.json, {
        "bare_tokens_per_s": bare, "pipeline_tokens_per_s": piped, "pipeline_tokens_per_s_per_worker": per_worker,
        "overhead": overhead, "breakdown_s": {"bare": bare_phases, "pipeline": piped_phases},
        "model_tflops_per_s_per_core": {"bare": bare_path.tflops_per_s_per_core,
                                        "pipeline": ray_path.tflops_per_s_per_core},
        "matmul_peak_tflops_per_core": peak,
        "mfu": {"bare": bare_path.tflops_per_s_per_core / peak, "pipeline": ray_path.tflops_per_s_per_core / peak},
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine(),
    })


if __name__ == "__main__":
    main()
