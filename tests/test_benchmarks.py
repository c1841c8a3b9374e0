"""Smoke test of the benchmarks: each runs at its --quick size and writes well-formed JSON.

Only structure is checked (keys, positive finite ratios); timings are never asserted, since they
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"lora", "dual_lora", "moe_lora_topk", "moe_lora_softmax", "rode"}


def positive_finite(values: Any, where: str) -> None:
    """Every number in a nested mapping is a positive finite float."""
    if isinstance(values, dict):
        for key, value in values.items():
            positive_finite(value, f"{where}.{key}")
        return
    assert isinstance(values, int | float) and not isinstance(values, bool), f"{where} is {values!r}"
    assert math.isfinite(values) and values > 0, f"{where} is {values!r}"


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """run_all.py at the quick sizes of the adapter and VCE benchmarks (each in its own process)."""
    results = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "adapters,vce",
         "--results", str(results), "--budget", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return results


@pytest.mark.slow
def test_adapters_quick_json(quick_results: Path) -> None:
    data = json.loads((quick_results / "adapters.json").read_text())
    assert {"whole_model", "layer", "flop_ratio", "machine", "sizes", "targets"} <= set(data)
    for level, phases in (("whole_model", ("inference", "train_step")),
                          ("layer", ("forward", "forward_1token", "forward_backward"))):
        for phase in phases:
            assert set(data[level][phase]) == METHODS, (level, phase)
            positive_finite(data[level][phase], f"{level}.{phase}")
            assert data[level][phase]["lora"] == pytest.approx(1.0)
            assert set(data["flop_ratio"][level][phase]) == METHODS
            positive_finite(data["flop_ratio"][level][phase], f"flop_ratio.{level}.{phase}")
    # Dual-LoRA does more adapter arithmetic than LoRA at the same rank (3rd vs 2rd per token).
    assert data["flop_ratio"]["layer"]["forward"]["dual_lora"] > 1.0
    positive_finite(data["details"]["whole_model"]["reference"], "reference")
    for entry in data["targets"].values():
        assert {"target", "measured", "met"} <= set(entry)
        positive_finite(entry["measured"], "targets.measured")
    assert data["sizes"]["preset"] == "quick" and data["machine"]["torch"]


@pytest.mark.slow
def test_vce_quick_json(quick_results: Path) -> None:
    data = json.loads((quick_results / "vce.json").read_text())
    assert {"sizes", "machine", "settings"} <= set(data)
    tiny = data["sizes"]["tiny"]
    positive_finite(tiny["ratios"], "ratios")
    positive_finite(tiny["flop_ratio"], "flop_ratio")
    positive_finite(tiny["params"], "params")
    positive_finite(tiny["activation_bytes"], "activation_bytes")
    positive_finite(tiny["seconds"], "seconds")
    assert set(tiny["seconds"]["forward"]) == {"vce", "projector", "vce+projector", "vision_tower", "vce_detr"}
    assert set(tiny["ratios"]["forward"]) == {"vce/projector", "vce/vision_tower", "vce+projector/projector",
                                              "vce_detr/vce"}
    assert tiny["vce_detr_path"].startswith("deformable_detr")


@pytest.mark.slow
def test_run_all_summary(quick_results: Path) -> None:
    summary = {o["name"]: o for o in json.loads((quick_results / "summary.json").read_text())}
    assert set(summary) == {"adapters", "vce"}
    assert all(o["status"] == "ok" for o in summary.values()), summary


def test_run_all_skips_a_missing_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    outcome = module.run_one(module.Benchmark("absent", "no_such_benchmark.py"), tmp_path, timeout=60.0)
    assert outcome.status == "skipped" and "not in the tree" in outcome.note
    quick = module.run_one(module.Benchmark("no_quick", "run_all.py"), tmp_path, timeout=60.0, quick=True)
    assert quick.status == "skipped" and "--quick" in quick.note


@pytest.mark.slow
def test_stream_memory_small_json(tmp_path: Path) -> None:
    """stream_memory.py end to end at two small sizes: every record streamed, the timelines kept."""
    out = tmp_path / "stream.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stream_memory.py"), "--sizes", "300", "600",
         "--records-per-shard", "200", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [r["records"] for r in report["results"]] == [300, 600]
    for result in report["results"]:
        assert result["shards"] == math.ceil(result["records"] / 200)
        assert result["samples"][-1]["records_done"] == result["records"], "every record reached the consumer"
        assert result["idle_pss_mib"] > 0 and 0 < result["peak_pss_mib"] <= result["peak_rss_sum_mib"]
        assert result["peak_processes"] >= 1
    assert "peak memory (PSS) against the largest run" in proc.stdout


@pytest.mark.slow
def test_packing_quick_json(tmp_path: Path) -> None:
    """packing.py end to end at its smoke size: padding efficiency of every data set, packed never below padded."""
    out = tmp_path / "packing.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "packing.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    efficiency = report["padding_efficiency"]
    assert {"demo stage 1", "demo stage 2", "LLaVA-1.5-like mix, micro-batch 16"} <= set(efficiency)
    for name, e in efficiency.items():
        assert 0 < e["padded"] <= e["packed"] <= 1, name
        assert e["rows_packed"] <= e["rows_padded"], name
    assert efficiency["LLaVA-1.5-like mix, micro-batch 16"]["packed"] > 0.85, "packing what padding wastes"
    step = report["step"]
    assert step["computed_tokens"]["packed"] <= step["computed_tokens"]["padded"]
    assert step["tokens_per_s"]["packed"] > 0 and step["packed_over_padded_time"] > 0
    assert "| LLaVA-1.5-like mix, micro-batch 8 " in proc.stdout and "packed/padded time" in proc.stdout


@pytest.mark.slow
def test_serve_quick_json(tmp_path: Path) -> None:
    """serve.py end to end at its smoke size: a real endpoint, every request answered, ratios per case."""
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == {"sequential", "clients=1", "clients=4"}
    positive_finite(report["ratios"], "ratios")
    for case, runs in report["runs"].items():
        assert len(runs) == report["settings"]["repeats"], case
        for run in runs:
            assert run["tokens"] > 0 and run["p50_s"] <= run["p99_s"]
    assert "the sequential loop's throughput" in proc.stdout
