"""Sequence packing (`data.packing`): padding efficiency with and without it, and what it does to a training step.

    .venv/bin/python benchmarks/packing.py [--records 800] [--repeats 7] [--json PATH] [--quick]

Padding efficiency is real tokens / computed tokens (rows x row length), per micro-batch, over
micro-batches taken in training order:

- the demo data: both stages' training splits streamed through the real Ray Data preprocessing (chat
  template, tokenizer, image tokens), micro-batches of the demo config (8), rows up to
  model.max_length (256);
- a LLaVA-1.5-like length spread at LLaVA-1.5's sizes (576 image tokens, rows up to 2048, micro-batches
  of 8 and 16): samples drawn from the sources of the 665K instruction mix in their proportions, each
  with a text length drawn log-uniformly from a range per source. The ranges are assumptions about
  that mix (LLAVA_MIX below), not lengths measured on the file.

Then the demo model's training step (forward + backward of stage 1, where packing changes the
layout, one thread, on the same micro-batches padded and packed, interleaved repetitions): real
tokens per second of both and their ratio. On a CPU with SDPA a packed row's attention is computed densely under a block-diagonal
mask, so the gain is what the linear layers save on padding, less the attention over longer rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.common import format_table, machine, measure_interleaved, write_json
from components.cluster import init_ray
from components.config import DuetConfig, load_config
from components.data.dataset import build_dataset, make_collate
from components.data.packing import plan_rows
from components.model.stages import build_model
from components.quiet import quiet_driver
from components.train.loop import forward_loss
from components.workflow.startup import ensure_base_model, ensure_dataset, stage_data

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("input_ids", "labels", "pixel_values")

# (source of LLaVA-1.5's 665K mix, samples in thousands, has an image, text tokens low-high).
# VQA-style sources are merged into multi-turn conversations per image in that mix, hence their range.
LLAVA_MIX = (
    ("LLaVA-Instruct (conversation, detail, reasoning)", 158, True, (120, 700)),
    ("ShareGPT (text only)", 40, False, (150, 2048)),
    ("VQAv2", 83, True, (40, 400)),
    ("GQA", 72, True, (40, 400)),
    ("OKVQA", 9, True, (30, 120)),
    ("OCR-VQA", 80, True, (60, 300)),
    ("A-OKVQA", 66, True, (40, 200)),
    ("TextCaps", 22, True, (30, 80)),
    ("RefCOCO", 48, True, (80, 500)),
    ("Visual Genome", 86, True, (80, 500)),
)
LLAVA_IMAGE_TOKENS, LLAVA_MAX_LENGTH = 576, 2048


def llava_like_lengths(count: int, seed: int = 0) -> list[int]:
    """Token lengths of `count` samples drawn from LLAVA_MIX (image tokens included, cut at 2048)."""
    rng = np.random.default_rng(seed)
    shares = np.array([thousands for _, thousands, _, _ in LLAVA_MIX], dtype=float)
    sources = rng.choice(len(LLAVA_MIX), size=count, p=shares / shares.sum())
    lengths = []
    for source in sources:
        _, _, has_image, (low, high) = LLAVA_MIX[source]
        text = int(np.exp(rng.uniform(np.log(low), np.log(high))))
        lengths.append(min(LLAVA_MAX_LENGTH, text + (LLAVA_IMAGE_TOKENS if has_image else 0)))
    return lengths


def efficiency_of_lengths(lengths: list[int], micro_batch: int, max_length: int) -> dict[str, float]:
    """Mean padding efficiency and rows per micro-batch, padded to the longest sample and packed."""
    padded, packed, rows = [], [], []
    for start in range(0, len(lengths) - micro_batch + 1, micro_batch):
        batch = lengths[start:start + micro_batch]
        padded.append(sum(batch) / (len(batch) * max(batch)))
        plan = plan_rows(batch, max_length)
        width = max(sum(batch[i] for i in row) for row in plan)
        packed.append(sum(batch) / (len(plan) * width))
        rows.append(len(plan))
    return {"padded": statistics.mean(padded), "packed": statistics.mean(packed),
            "rows_packed": statistics.mean(rows), "rows_padded": float(micro_batch), "micro_batches": len(padded)}


def bench_config(work: Path, records: int) -> DuetConfig:
    return load_config(REPO / "pipelines/configs/demo.yaml", [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
        "run.name=packing", f"data.num_records={records}", f"data.caption_records={records}",
        "data.records_per_shard=400", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0",
        "data.val_fraction=0", "data.test_fraction=0.02",
    ])


def demo_rows(cfg: DuetConfig, stage: int, base: str, count: int) -> tuple[list[dict], str]:
    data = stage_data(cfg, stage, base)
    rows = build_dataset(data.train_uri, cfg, data.processor_dir, data.num_visual_tokens).take(count)
    return rows, data.processor_dir


def micro_batches(rows: list[dict], size: int) -> list[dict[str, list]]:
    return [{k: [r[k] for r in rows[i:i + size]] for k in FIELDS} for i in range(0, len(rows) - size + 1, size)]


def step_cases(cfg: DuetConfig, stage: int, batches: list[dict], processor_dir: str):
    """Forward + backward over every micro-batch, padded and packed (the same samples)."""
    padded_collate = make_collate(processor_dir, cfg.storage)
    packed_collate = make_collate(processor_dir, cfg.storage, cfg.model.max_length)
    padded = [padded_collate(b) for b in batches]
    packed = [packed_collate(b) for b in batches]
    torch.set_num_threads(1)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, stage)
    model.train()

    def run(layout: list[dict[str, torch.Tensor]]):
        def step() -> None:
            for batch in layout:
                loss, _ = forward_loss(model, batch)
                loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    tokens = sum(int(b["attention_mask"].sum()) for b in padded)
    return {"padded": run(padded), "packed": run(packed)}, tokens, padded, packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=800, help="demo records per split (both stages)")
    parser.add_argument("--step-batches", type=int, default=6, help="micro-batches per timed training case")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    args = parser.parse_args()
    if args.quick:
        args.records, args.step_batches, args.repeats = 120, 2, 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    efficiency: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as tmp:
        work = Path(tmp)
        cfg = bench_config(work, args.records).with_absolute_paths()
        quiet_driver()
        init_ray(cfg)
        base, _ = ensure_base_model(cfg, ensure_dataset(cfg))
        stage_rows: dict[int, list[dict]] = {}
        for stage in (1, 2):
            stage_rows[stage], processor_dir = demo_rows(cfg, stage, base, args.records * 9 // 10)
            lengths = [len(r["input_ids"]) for r in stage_rows[stage]]
            efficiency[f"demo stage {stage}"] = efficiency_of_lengths(lengths, cfg.stage(stage).micro_batch,
                                                                      cfg.model.max_length)
        ray.shutdown()
        # Timed where packing changes the layout: stage 1's captions (stage 2's samples pair up in no row of
        # the demo's 256 tokens, so both layouts are the same there).
        batches = micro_batches(stage_rows[1], cfg.stage1.micro_batch)[:args.step_batches]
        cases, tokens, padded, packed = step_cases(cfg, 1, batches, processor_dir)
        computed = {"padded": sum(b["input_ids"].numel() for b in padded),
                    "packed": sum(b["input_ids"].numel() for b in packed)}
        timing = measure_interleaved(cases, repeats=args.repeats, warmup=1, clock="process",
                                     progress="training step")
    lengths = llava_like_lengths(4096)
    for micro_batch in (8, 16):
        efficiency[f"LLaVA-1.5-like mix, micro-batch {micro_batch}"] = efficiency_of_lengths(
            lengths, micro_batch, LLAVA_MAX_LENGTH)
    print(format_table(
        ["data", "padded", "packed", "rows per micro-batch (packed)"],
        [[name, round(e["padded"], 3), round(e["packed"], 3), f"{e['rows_padded']:g} -> {e['rows_packed']:.2f}"]
         for name, e in efficiency.items()],
    ))
    ratio = timing.ratios("padded")["packed"]
    low, high = timing.ratio_spread("padded")["packed"]
    rates = {name: tokens / timing.median(name) for name in cases}
    print(f"\ndemo stage-1 training step ({len(batches)} micro-batches of {cfg.stage1.micro_batch}, 1 thread, "
          f"{tokens} real tokens): padded {rates['padded']:.0f} tokens/s ({computed['padded']} computed), "
          f"packed {rates['packed']:.0f} tokens/s ({computed['packed']} computed); packed/padded time "
          f"{ratio:.3f} (quartiles {low:.3f}-{high:.3f})")
    write_json(args.json, {
        "padding_efficiency": efficiency,
        "step": {"real_tokens": tokens, "computed_tokens": computed, "tokens_per_s": rates,
                 "packed_over_padded_time": ratio, "quartiles": [low, high], "clock": timing.clock},
        "llava_mix": [{"source": s, "thousands": k, "image": i, "text_tokens": list(r)} for s, k, i, r in LLAVA_MIX],
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine(),
    })


if __name__ == "__main__":
    main()
