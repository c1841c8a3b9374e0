"""The GPU check's dry run: the whole script at tiny sizes on the CPU, with Ray, MLflow and DeepSpeed unimportable."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _absent(cls, name, path=None, target=None):
    """What the GPU machine lacks is not found, exactly as there."""
    if name.split(".")[0] in ("ray", "mlflow", "deepspeed"):
        return None
    return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_absent)
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PYTHON": str(Path(os.sys.executable))}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_prints_one_json_summary_without_ray_mlflow_or_deepspeed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(tmp_path, "--dry-run", "--only", "vce,step_loop", "--out", str(out), "--peak-tflops", "0.05")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]  # the tables went to stderr
    summary = json.loads(lines[0])
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert summary["vce"]["status"] == "ok" and summary["vce"]["vce_detr_path"].startswith("deformable_detr")
    loop = summary["step_loop"]
    assert loop["status"] == "ok" and set(loop["methods"]) == {"lora", "dual_lora"}
    for figures in loop["methods"].values():
        assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1
    assert loop["dual_lora/lora_step"] > 0
    assert {p.name for p in out.iterdir()} == {"vce.json", "step_loop.json", "summary.json"}
    assert "Stage-2 step loop" in done.stderr


def test_the_blocker_hides_ray(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    probe = "import importlib.util as u; print(u.find_spec('ray'), u.find_spec('torch') is not None)"
    done = subprocess.run([os.sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["None", "True"], done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--dry-run", "--only", "vce,nope"], "--only 'vce,nope': choose from adapters,vce,step_loop"),
    ([], "no CUDA device is visible"),
])
def test_bad_arguments_and_a_missing_gpu_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    import torch

    if not args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = _run(tmp_path, *args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""
