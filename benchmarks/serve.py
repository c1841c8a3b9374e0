"""Serving throughput: the Ray Serve endpoint under 1, 4 and 16 concurrent clients against a sequential loop.

    .venv/bin/python benchmarks/serve.py [--requests 48] [--max-tokens 32] [--repeats 3] [--json PATH] [--quick]
    .venv/bin/python benchmarks/serve.py --model .duet/runs/demo/stage2/artifact   # the demo's fine-tuned model

The model is the demo's architecture (pipelines/configs/demo.yaml: tiny LLaVA, VCE, Dual-LoRA) built untrained
here, or --model a stage-2 artifact of that config. Every case answers the same requests (a synthetic image
and a question each, max_tokens fixed, greedy):

- sequential: one process, one `generate` call per request, one after the other, with the replica's
  thread count (the loop a user writes without a server);
- clients=N: N threads, each sending its share of the requests with the official `openai` client to the
  endpoint on 127.0.0.1 (one replica, `serve.max_batch_size` --batch), one request at a time per client.

Each repetition runs every case once (order rotated); a ratio is the median over repetitions of
(requests/s of the case) / (requests/s of the sequential loop in the same repetition). Latencies are per
request, client-side. The goal: at 16 clients, at least 3x the sequential loop's throughput on CPU.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

from benchmarks.common import format_table, machine, write_json
from components.config import DuetConfig, load_config
from components.data.synthetic import SyntheticShapes
from components.evaluate.prompts import PromptBuilder, visual_token_count
from components.model.artifact import save_stage_artifact
from components.model.stages import build_model
from components.model.tiny import save_tiny_checkpoint
from components.serve.engine import Engine, Job
from components.serve.versions import Package

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("List the shapes in the image.", "Describe the image.", "How many shapes are there?")


def bench_config(work: Path, args: argparse.Namespace) -> DuetConfig:
    checkpoint = f"model.checkpoint={work}/base" if args.model is None else None
    return load_config(REPO / "pipelines/configs/demo.yaml", [o for o in [
        f"run.work_dir={work}", checkpoint, "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0",
        f"serve.max_batch_size={args.batch}", f"serve.batch_wait_timeout_s={args.batch_wait}",
        f"serve.max_ongoing_requests={max(64, args.batch * 4)}", "eval.use_gpu=false",
        f"eval.cpus_per_replica={args.replica_cpus}",
    ] if o]).with_absolute_paths()


def build_artifact(cfg: DuetConfig, work: Path) -> str:
    """The demo's architecture, untrained: the adapter perturbed so that it acts, answers max_tokens long."""
    shapes = SyntheticShapes(0, cfg.model.tiny.image_size)
    texts = [" ".join(t["value"].replace("<image>", "") for t in shapes.record(i)["conversations"]) for i in range(50)]
    save_tiny_checkpoint(cfg.model.tiny, work / "base", texts, seed=0)
    torch.manual_seed(0)
    stage1 = save_stage_artifact(build_model(cfg, 1), cfg, 1, str(work / "stage1"), None)
    model = build_model(cfg, 2, stage1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return save_stage_artifact(model, cfg, 2, str(work / "stage2"), None)


def requests(count: int, image_size: int) -> list[tuple[str, bytes]]:
    shapes = SyntheticShapes(7, image_size)
    return [(QUESTIONS[i % len(QUESTIONS)], shapes.png(i)) for i in range(count)]


def sequential(cfg: DuetConfig, artifact: str, asked: Sequence[tuple[str, bytes]], max_tokens: int,
               threads: int) -> dict[str, float]:
    """One generate call per request in this process, timed over all of them."""
    torch.set_num_threads(threads)
    engine = Engine("cpu")
    version = engine.load(Package("bench", cfg, artifact))
    builder = PromptBuilder.from_config(cfg, cfg.model.checkpoint or "", visual_token_count(cfg))
    jobs = [Job(builder.encode(builder.text([{"from": "human", "value": f"<image>\n{q}"}]), 1),
                builder.images([png]), max_tokens) for q, png in asked]
    engine.generate(version, jobs[:1])  # warm-up
    latencies, tokens = [], 0
    started = time.perf_counter()
    for job in jobs:
        t = time.perf_counter()
        tokens += engine.generate(version, [job])[0].tokens
        latencies.append(time.perf_counter() - t)
    return summary(time.perf_counter() - started, latencies, tokens, len(jobs))


def clients(url: str, asked: Sequence[tuple[str, bytes]], count: int, max_tokens: int) -> dict[str, float]:
    """`count` client threads sharing the requests, one request in flight per client."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    queue = list(enumerate(asked))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, (question, png) = queue.pop()
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            t = time.perf_counter()
            try:
                reply = client.chat.completions.create(model="duet-demo", max_tokens=max_tokens, temperature=0,
                                                       messages=[{"role": "user", "content": [
                                                           {"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": question}]}])
            except BaseException as exc:  # noqa: BLE001  (reported, the run goes on)
                errors.append(exc)
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens.append(reply.usage.completion_tokens)

    workers = [threading.Thread(target=work) for _ in range(count)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(asked)} requests failed, first: {errors[0]!r}")
    return summary(time.perf_counter() - started, latencies, sum(tokens), len(asked))


def summary(elapsed: float, latencies: list[float], tokens: int, count: int) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"seconds": elapsed, "requests_per_s": count / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "tokens": tokens}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per case and repetition")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="serve.max_batch_size of the replica")
    parser.add_argument("--batch-wait", type=float, default=0.05, help="serve.batch_wait_timeout_s of the replica")
    parser.add_argument("--replica-cpus", type=int, default=1, help="CPUs (and torch threads) of the replica")
    parser.add_argument("--model", help="a stage-2 artifact of the demo config (default: built untrained)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.repeats, args.clients = 8, 8, 1, "1,4"
    levels = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray import serve

    from components.quiet import quiet_driver, quiet_model_worker
    from components.serve.app import SERVE_LOGGING, build_app

    quiet_driver()
    quiet_model_worker()  # the sequential loop loads the model in this process
    with tempfile.TemporaryDirectory(prefix="duet-bench-serve-") as tmp:
        work = Path(tmp)
        cfg = bench_config(work, args)
        artifact = args.model or build_artifact(cfg, work)
        asked = requests(args.requests, cfg.model.tiny.image_size)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
        serve.run(build_app(cfg, artifact), name="duet", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}/v1"
        clients(url, asked[:2], 2, args.max_tokens)  # warm-up
        cases = ["sequential", *[f"clients={n}" for n in levels]]
        runs: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
        for rep in range(args.repeats):
            for case in cases[rep % len(cases):] + cases[:rep % len(cases)]:
                if case == "sequential":
                    runs[case].append(sequential(cfg, artifact, asked, args.max_tokens, args.replica_cpus))
                else:
                    runs[case].append(clients(url, asked, int(case.split("=")[1]), args.max_tokens))
        serve.shutdown()
        ray.shutdown()
    ratios = {case: statistics.median(r["requests_per_s"] / s["requests_per_s"]
                                      for r, s in zip(runs[case], runs["sequential"])) for case in cases}
    rows = []
    for case in cases:
        med = {k: statistics.median(r[k] for r in runs[case]) for k in ("requests_per_s", "tokens_per_s", "p50_s",
                                                                         "p99_s")}
        rows.append([case, round(med["requests_per_s"], 2), round(med["tokens_per_s"], 1), round(med["p50_s"], 3),
                     round(med["p99_s"], 3), round(ratios[case], 2)])
    print(format_table(["case", "requests/s", "tokens/s", "p50 s", "p99 s", "x sequential"], rows))
    top = f"clients={max(levels)}"
    print(f"{top}: {ratios[top]:.2f}x the sequential loop's throughput (goal >= 3x at 16 clients)")
    write_json(args.json, {
        "ratios": ratios, "runs": runs,
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine(),
        "model": "given" if args.model else "demo architecture, untrained",
    })


if __name__ == "__main__":
    main()
