"""The scripts' command lines as a user meets them: help, config errors and user errors, in fresh processes.

`--help` and a config error answer before torch, Ray or MLflow are imported (they are heavy, and a
typo should not cost the import of a training stack); every user error ends in one `[duet] error:`
line and exit status 1 or 2, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("full", "pretrain", "finetune", "sweep", "evaluate", "prepare_data", "promote", "inspect_model")
HEAVY = ("torch", "ray", "mlflow", "transformers", "deepspeed")

# Runs a script's main() as `python pipelines/X.py ARGS` would, then reports which heavy packages it imported.
_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("IMPORTED:" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def _probe(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), f"pipelines/{script}.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )


def _imported(done: subprocess.CompletedProcess[str]) -> list[str]:
    line = next(x for x in done.stderr.splitlines() if x.startswith("IMPORTED:"))
    return [m for m in line.removeprefix("IMPORTED:").split(",") if m]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_examples_without_importing_the_training_stack(script: str) -> None:
    done = _probe(script, "--help")
    assert done.returncode == 0, done.stderr
    assert "examples:" in done.stdout and f"pipelines/{script}.py" in done.stdout
    assert "--config" in done.stdout and "--set KEY=VALUE" in done.stdout
    assert _imported(done) == [], f"--help imported {_imported(done)}"


def test_a_config_error_answers_at_once_with_a_suggestion(tmp_path: Path) -> None:
    done = _probe("full", "--config", "pipelines/configs/demo.yaml", "--set", f"run.work_dir={tmp_path}",
                  "--set", "adapter.alpah=8")
    assert done.returncode == 2
    assert "[duet] error: invalid config:\n  adapter.alpah: unknown key (did you mean adapter.alpha?)" in done.stderr
    assert _imported(done) == [] and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir()), "nothing written"


def test_a_global_batch_the_workers_cannot_share_is_refused_before_any_work(tmp_path: Path) -> None:
    done = _probe("full", "--config", "pipelines/configs/demo.yaml", "--set", f"run.work_dir={tmp_path}",
                  "--set", "stage2.global_batch=7", "--set", "scaling.num_workers=2")
    assert done.returncode == 2
    assert "stage2.global_batch (7) is not divisible by scaling.num_workers (2)" in done.stderr
    assert _imported(done) == [] and not any(tmp_path.iterdir())


def test_an_unreachable_object_store_ends_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "pipelines/prepare_data.py", "--config", "pipelines/configs/demo.yaml",
         "--output", "s3://bucket/datasets", "--num-records", "20",
         "--set", f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "--set", "storage.retries=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "test-key-id",
             "AWS_SECRET_ACCESS_KEY": "test-secret-key", "AWS_EC2_METADATA_DISABLED": "true",
             **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}},
    )
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("[duet] error:")]
    assert len(errors) == 1 and "127.0.0.1" in errors[0] and "s3://bucket/datasets" in errors[0]
    assert "Traceback" not in done.stderr and "test-secret-key" not in done.stderr
