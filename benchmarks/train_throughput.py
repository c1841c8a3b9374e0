"""Stage-2 training throughput: the Ray Data -> Ray Train -> DeepSpeed path against a bare PyTorch loop, twice.

    .venv/bin/python benchmarks/train_throughput.py [--steps 24] [--workers 2] [--set KEY=VALUE] [--json PATH]

Same tiny LLaVA (Dual-LoRA + VCE), same records, same global batch, same machine, four paths:

- bare loop, in-memory batches: one process, one torch thread, micro-batches decoded, tokenised,
  transformed and collated beforehand: the model alone on one core;
- bare loop, inline preprocessing: the same loop, but each micro-batch is parsed, tokenised,
  decoded and CLIP-transformed (duet's own preprocessors) from the raw shard rows inside the step;
- Ray path over preprocessed data: Ray Train (`--workers` workers, one thread each, gloo) and
  DeepSpeed over per-worker datasets preprocessed and materialised in Ray's object store first;
- Ray path streaming: the pipeline as users run it, Ray Data decoding and transforming the shards
  while the workers train.

A fifth run puts `--workers` in-memory bare loops on the machine at once (one process each): what one
core delivers while every core computes, against one loop alone. That part of any gap is the
machine's (shared caches and memory bandwidth, a host's other tenants), not the pipeline's.

(a) orchestration overhead = Ray over preprocessed data per worker / bare in-memory (what Ray Train,
DeepSpeed and the gradient reduction cost each core); (b) end to end = Ray streaming per worker /
bare inline (what the whole path costs against doing the same work in one loop). All four count the
same tokens (real, not padding) over the steps after `--skip` warm-up steps. Goal: 0.85 per core for
both. One thread per core is the fair baseline: on a small shared CPU, two torch threads in one
process run this model 3-4x slower than one (measured), which would flatter the pipeline.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch

from benchmarks.common import format_table, machine, write_json
from components.cluster import init_ray
from components.config import DuetConfig, config_from_dict, load_config
from components.data.dataset import build_dataset, make_collate, preprocessing_inputs
from components.data.packing import sample_lengths
from components.data.preprocessors import ImagePreprocessor, TextPreprocessor
from components.model.artifact import save_stage_artifact
from components.model.stages import build_model, parameter_groups
from components.quiet import quiet_driver
from components.train.flops import StepFlops, model_tflops_per_s
from components.train.loop import forward_loss
from components.train.stage import StageData, run_stage, worker_datasets
from components.train.step_time import PHASE_LABELS, PHASES, StepClock, mean_breakdown
from components.workflow.startup import ensure_base_model, ensure_dataset, stage_data

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("input_ids", "labels", "pixel_values")


def bench_config(work: Path, args: argparse.Namespace) -> DuetConfig:
    return load_config(REPO / "pipelines/configs/demo.yaml", [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
        "run.name=throughput", f"data.num_records={args.records}", "data.caption_records=50",
        "data.records_per_shard=200", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0", "data.val_fraction=0",
        "data.test_fraction=0.02", f"scaling.num_workers={args.workers}", f"stage2.global_batch={args.global_batch}",
        f"stage2.micro_batch={args.micro_batch}", f"stage2.max_steps={args.steps}",
        f"stage2.checkpoint_every={args.steps}", *args.set,
    ])


@dataclass
class PathResult:
    tokens_per_s: float
    tflops_per_s_per_core: float  # model FLOPs (components.train.flops)
    breakdown: dict[str, float]  # mean seconds per step of each phase (components.train.step_time)


def pipeline_rates(cfg: DuetConfig, data: StageData, stage1: str, skip: int, preprocessed: bool) -> PathResult:
    """The whole training path, from its step metrics; `preprocessed`: over materialised worker datasets."""
    datasets = None
    if preprocessed:
        datasets = {name: ds.materialize() for name, ds in worker_datasets(cfg, data, cfg.scaling.num_workers).items()}
    name = "preprocessed" if preprocessed else "streaming"
    result = run_stage(cfg, 2, data, stage1_artifact=stage1, artifact=str(Path(cfg.run.work_dir) / f"s2-{name}"),
                       run_name=f"throughput-{name}", datasets=datasets)
    rows = [r for r in result.history if r["step"] > skip]
    seconds = sum(r["step_time_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    tflops = sum(r["model_tflops_per_s"] * r["step_time_s"] for r in rows)
    return PathResult(tokens / seconds, tflops / seconds, mean_breakdown(rows))


def raw_micro_batches(cfg: DuetConfig, data: StageData, needed: int) -> list[list[dict]]:
    """The first `needed` raw shard rows (bytes as stored), in micro-batches."""
    inputs = preprocessing_inputs(data.train_uri, cfg, data.processor_dir, data.num_visual_tokens)
    rows = ray.data.read_webdataset(inputs.paths, filesystem=inputs.filesystem, decoder=None).take(needed)
    size = cfg.stage2.micro_batch
    return [rows[i:i + size] for i in range(0, needed, size)]


MicroBatch = Callable[[int], dict[str, torch.Tensor]]


def in_memory_batches(cfg: DuetConfig, data: StageData, needed: int) -> list[dict[str, torch.Tensor]]:
    """The first `needed` training samples preprocessed and collated into micro-batches, before any clock."""
    size = cfg.stage2.micro_batch
    collate = make_collate(data.processor_dir, cfg.storage, cfg.model.max_length if cfg.data.packing else None)
    rows = build_dataset(data.train_uri, cfg, data.processor_dir, data.num_visual_tokens).take(needed)
    return [collate({k: [r[k] for r in rows[i:i + size]] for k in FIELDS}) for i in range(0, needed, size)]


def inline_batches(cfg: DuetConfig, data: StageData, needed: int) -> MicroBatch:
    """Micro-batch i preprocessed on demand from raw shard rows, by the pipeline's own preprocessors."""
    collate = make_collate(data.processor_dir, cfg.storage, cfg.model.max_length if cfg.data.packing else None)
    inputs = preprocessing_inputs(data.train_uri, cfg, data.processor_dir, data.num_visual_tokens)
    text = TextPreprocessor(inputs.encoder, cfg.data.caption_template, inputs.monitor)
    images = ImagePreprocessor(inputs.image_spec, cfg.data.max_image_pixels, inputs.monitor)
    raw = raw_micro_batches(cfg, data, needed)
    return lambda index: collate(images(text(pd.DataFrame(raw[index]))))


def bare_rates(cfg: DuetConfig, stage1: str, micro_batch: MicroBatch, steps: int, skip: int) -> PathResult:
    """Plain PyTorch AdamW on one thread: the model's own speed on this machine, and where its step time goes.

    `micro_batch(i)` is the i-th micro-batch: taken from memory, or preprocessed inside the step (booked as
    data wait).
    """
    stage = cfg.stage2
    accumulation = stage.global_batch // stage.micro_batch
    torch.set_num_threads(1)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, 2, stage1)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, stage))
    counts = StepFlops.from_model(model)
    tokens, elapsed, flops = 0, 0.0, 0.0
    clock, taken_rows = StepClock(), []
    for step in range(steps):
        started = time.perf_counter()
        step_tokens, step_flops = 0, 0.0
        for index in range(step * accumulation, (step + 1) * accumulation):
            with clock.phase("data_wait"):
                batch = micro_batch(index)
            with clock.phase("forward"):
                loss = forward_loss(model, batch)[0] / accumulation
            with clock.phase("backward"):
                loss.backward()
            lengths = sample_lengths(batch)
            step_tokens += sum(lengths)
            step_flops += counts.batch(lengths, batch["pixel_values"].shape[0])
        with clock.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        taken = clock.take()
        if step >= skip:
            tokens += step_tokens
            flops += step_flops
            elapsed += time.perf_counter() - started
            taken_rows.append(taken)
    return PathResult(tokens / elapsed, model_tflops_per_s(flops, elapsed, 1), mean_breakdown(taken_rows))


def _bare_in_process(config: dict[str, Any], stage1: str, batches: list[dict[str, torch.Tensor]], steps: int,
                     skip: int) -> PathResult:
    quiet_driver()  # a fresh process: no progress bars of its own
    return bare_rates(config_from_dict(config), stage1, batches.__getitem__, steps, skip)


def concurrent_bare_rates(cfg: DuetConfig, stage1: str, batches: list[dict[str, torch.Tensor]], steps: int,
                          skip: int, processes: int) -> list[PathResult]:
    """`processes` in-memory bare loops at once, one process and one thread each: what each core of this
    machine delivers while every core computes (shared caches, memory bandwidth, a host's other tenants),
    the baseline for workers that share the machine the same way."""
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_bare_in_process, cfg.model_dump(mode="json"), stage1, batches, steps, skip)
                   for _ in range(processes)]
        return [future.result() for future in futures]


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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every path, e.g. deepspeed.zero_stage=0 or data.packing=true")
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
        needed = args.steps * cfg.stage2.global_batch
        batches = in_memory_batches(cfg, data, needed)
        concurrent = concurrent_bare_rates(cfg, stage1, batches, args.steps, args.skip, args.workers)
        paths = {
            "bare": bare_rates(cfg, stage1, batches.__getitem__, args.steps, args.skip),
            "bare_inline": bare_rates(cfg, stage1, inline_batches(cfg, data, needed), args.steps, args.skip),
            "ray_preprocessed": pipeline_rates(cfg, data, stage1, args.skip, preprocessed=True),
            "ray_streaming": pipeline_rates(cfg, data, stage1, args.skip, preprocessed=False),
        }
        ray.shutdown()
    workers = args.workers
    per_core = {name: path.tokens_per_s / (workers if name.startswith("ray") else 1) for name, path in paths.items()}
    orchestration = per_core["ray_preprocessed"] / per_core["bare"]
    end_to_end = per_core["ray_streaming"] / per_core["bare_inline"]
    busy_core = statistics.mean(path.tokens_per_s for path in concurrent)  # per core, every core computing
    machine_bound = busy_core / per_core["bare"]
    labels = {
        "bare": "bare loop, in-memory batches (1 thread)",
        "bare_inline": "bare loop, preprocessing inline (1 thread)",
        "ray_preprocessed": f"Ray Train ({workers} workers) + DeepSpeed, preprocessed data",
        "ray_streaming": f"Ray Data -> Ray Train ({workers} workers) + DeepSpeed, streaming",
    }
    print(format_table(
        ["path", "tokens/s", "tokens/s per core"],
        [[labels[name], round(path.tokens_per_s, 1), round(per_core[name], 1)] for name, path in paths.items()],
    ))
    print(f"(a) orchestration: Ray over preprocessed data / bare in-memory, per core: {orchestration:.3f} "
          f"(goal >= 0.85)")
    print(f"(b) end to end: Ray streaming / bare inline, per core: {end_to_end:.3f} (goal >= 0.85)")
    print(f"machine: {args.workers} bare loops at once deliver {busy_core:.1f} tokens/s each, {machine_bound:.3f} of one "
          f"alone; Ray over preprocessed data against that: {per_core['ray_preprocessed'] / busy_core:.3f} per core")
    tflops = {name: path.tflops_per_s_per_core for name, path in paths.items()}
    print("model TFLOP/s per core: " + ", ".join(f"{name} {value:.4f}" for name, value in tflops.items())
          + f"; one thread's fp32 matmul peak {peak:.4f} TFLOP/s")
    print("\nseconds per step (mean over the steps measured):")
    print(format_table(
        ["phase", *paths],
        [*[[PHASE_LABELS.get(p, p), *[round(path.breakdown[p], 4) for path in paths.values()]] for p in PHASES],
         ["total", *[round(sum(path.breakdown.values()), 4) for path in paths.values()]]],
    ))
    write_json(args.json, {
        "tokens_per_s": {name: path.tokens_per_s for name, path in paths.items()},
        "tokens_per_s_per_core": per_core,
        "orchestration_ratio": orchestration, "end_to_end_ratio": end_to_end,
        "concurrent_bare_tokens_per_s_per_core": busy_core, "concurrent_over_alone": machine_bound,
        "orchestration_over_concurrent_bare": per_core["ray_preprocessed"] / busy_core,
        "breakdown_s": {name: path.breakdown for name, path in paths.items()},
        "model_tflops_per_s_per_core": tflops, "matmul_peak_tflops_per_core": peak,
        "mfu": {name: value / peak for name, value in tflops.items()},
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine(),
    })


if __name__ == "__main__":
    main()
