"""The paths users walk, as they walk them: a default `ray start --head`, `ray job submit`, and local scripts.

One head for the module, started the way the README says (`ray get-auth-token --generate`, then
`RAY_AUTH_MODE=token ray start --head --node-ip-address 127.0.0.1` with its default CPU count: 2 on
a 2-core machine, and Ray's default temp dir; the client passes RAY_AUTH_MODE=token too). On it: the demo pipeline through `ray job submit` with a
relative work dir (mapped to the head's home, outside Ray's temporary copy of the project), and a
stage that can never fit, refused naming the resources. Beside it, local runs of the scripts in
fresh processes with the default environment (MLflow telemetry on): they start Ray instances of
their own instead of tripping over the running cluster; a stage-1 artifact handed to finetune.py
by path carries its lineage; a sweep finishes; user errors end in one line, not a traceback.
Only the head and the server this module started are stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (fixture)
from ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = "pipelines/configs/demo.yaml"
# Variables that make MLflow switch its telemetry off (it looks for CI and pytest): users have none of them.
_NOT_A_USER = ("PYTEST_CURRENT_TEST", "PYTEST_VERSION", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY",
               "DO_NOT_TRACK", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")
# Small sizes for every run of this module; the job runs the demo config itself otherwise.
TINY = [
    "data.num_records=160", "data.caption_records=80", "data.records_per_shard=40",
    "data.val_fraction=0.1", "data.test_fraction=0.1", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0",
    "stage1.global_batch=8", "stage1.micro_batch=2", "stage1.max_steps=3", "stage1.checkpoint_every=3",
    "stage2.global_batch=8", "stage2.micro_batch=2", "stage2.max_steps=3", "stage2.checkpoint_every=3",
    "stage2.eval_batches=1", "adapter.r=8", "adapter.alpha=16",
]


def user_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has: the venv first on PATH, nothing that marks a test run."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_A_USER}
    # DeepSpeed's compiled ops stay where this user's earlier runs built them, whatever HOME the test gives.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_script(script: str, *args: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess[str]:
    """`python pipelines/SCRIPT ARGS` in a fresh process, from the checkout, as a user runs it."""
    return subprocess.run([sys.executable, f"pipelines/{script}", *args], cwd=REPO, env=user_env(**env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@dataclass
class Head:
    """A `ray start --head --block` of this module's: its job server address, its HOME and its own log."""

    home: Path  # HOME of the head and the jobs it runs
    address: str = ""  # the job server (dashboard) address for `ray job submit`
    gcs_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def log(self) -> Path:
        return self.home / "ray-head.log"

    def env(self) -> dict[str, str]:
        return user_env(RAY_AUTH_MODE="token", HOME=str(self.home))

    def start(self) -> None:
        dashboard, self.gcs_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                 "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                 # Own ports for the node's agents: another Ray on this machine must not collide with them.
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--ray-client-server-port", str(free_port()), "--disable-usage-stats"],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.address], env=self.env(),
                                   capture_output=True)
            if probe.returncode == 0:
                return
            assert self.alive(), f"ray start --head exited:\n{self.log_tail()}"
            time.sleep(2)
        pytest.fail(f"the Ray head's job server did not come up in 120 s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def restart_if_dead(self) -> None:
        """Start the head again, once, if it stopped under the module (said as a warning with its log)."""
        if self.alive():
            return
        assert self.restarts == 0, f"the Ray head stopped a second time:\n{self.log_tail()}"
        warnings.warn(f"the test's Ray head stopped (exit {self.process.returncode if self.process else None}); "
                      f"starting it again. Its last lines:\n{self.log_tail()}", stacklevel=2)
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # --block: the head stops the processes it started
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        # A stopped head leaves Ray's "current cluster" file behind; a plain ray.init(num_cpus=...) elsewhere
        # would then try to join it. Remove it when it names this head (and only then).
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip() == f"127.0.0.1:{self.gcs_port}":
            current.unlink()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    head = Head(tmp_path_factory.mktemp("head-home"))
    # As the README says: a token once (~/.ray/auth_token), then the head with token auth on.
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=head.env(), check=True,
                   capture_output=True)
    try:
        head.start()
        yield head
    finally:
        head.stop()


def _submit(head: Head, *overrides: str) -> subprocess.CompletedProcess[str]:
    for _ in range(10):
        head.restart_if_dead()
        args = [str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(REPO), "--",
                "python", "pipelines/full.py", "--config", DEMO, *sets(*overrides)]
        done = subprocess.run(args, env=head.env(), capture_output=True, text=True, timeout=1500)
        output = done.stdout + done.stderr
        if not head.alive() and head.restarts == 0:
            continue  # the head stopped under the job or before it: started again above, submitted again
        if "No available agent to submit job" not in output:
            break
        time.sleep(5)  # the head's job agent registers a little after its REST API answers
    return done


# ---------------------------------------------------------------- on the cluster


def test_full_pipeline_through_ray_job_submit_on_a_default_head(
    ray_head: Head, mlflow_server: MlflowServer  # noqa: F811
) -> None:
    overrides = [*TINY, f"tracking.tracking_uri={mlflow_server.uri}", "run.name=e2e", "registry.model_name=duet-e2e",
                 "eval.max_samples=8", "eval.max_new_tokens=8", "eval.batch_size=8"]
    first = _submit(ray_head, *overrides)
    output = first.stdout + first.stderr
    assert first.returncode == 0 and re.search(r"Job '.*' succeeded", output), output[-6000:]
    assert "promote:" in output
    # The relative work dir of demo.yaml is not Ray's temporary copy of the project: it is the head's home.
    durable = ray_head.home / ".duet"
    assert "run.work_dir '.duet' is relative and this job runs in Ray's temporary copy" in output
    assert (durable / "datasets" / "shapes" / "train" / "manifest.json").is_file()
    assert (durable / "base" / "tiny" / "config.json").is_file()

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    champion = client.get_model_version_by_alias("duet-e2e", "champion")
    stage2 = client.get_run(champion.run_id)
    stage1_id = stage2.data.tags["duet.parent_stage_run_id"]
    stage1 = client.get_run(stage1_id)
    assert stage1.data.tags["duet.step"] == "stage1"
    digest = stage2.data.tags["duet.dataset_digest"]
    assert champion.tags["duet.dataset_digest"] == digest
    stage1_digest = stage1.data.tags["duet.dataset_digest"]
    assert stage1_digest.startswith(stage1.inputs.dataset_inputs[0].dataset.digest)
    parent = client.get_run(stage2.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["duet.kind"] == "pipeline"
    assert stage1.data.tags["mlflow.parentRunId"] == parent.info.run_id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["duet.step"] for r in children} >= {"stage1", "stage2", "evaluate-zero-shot",
                                                          "evaluate-fine-tuned"}
    # val_loss is logged where it was measured (after step 3), not carried forward to every step.
    assert [m.step for m in client.get_metric_history(stage2.info.run_id, "val_loss")] == [3]
    assert len(client.get_metric_history(stage2.info.run_id, "loss")) == 3

    second = _submit(ray_head, *overrides)
    again = second.stdout + second.stderr
    assert second.returncode == 0, again[-3000:]
    assert re.search(r"data caption: \d+ records, digest \w+ \(reused\)", again), again[-3000:]
    assert "stage1: reused run " + stage1_id in again


def test_a_stage_the_cluster_can_never_hold_is_refused_naming_the_resources(ray_head: Head) -> None:
    started = time.monotonic()
    done = _submit(ray_head, *TINY, "scaling.num_workers=8", "run.name=too-big")
    output = done.stdout + done.stderr
    print(f"refused after {time.monotonic() - started:.0f} s")
    assert done.returncode != 0 and re.search(r"Job '.*' failed", output), output[-4000:]
    assert re.search(r"\[duet\] error: stage 1 needs [\d.]+ CPU at once \(8 training workers x 0\.\d+ CPU", output)
    assert "but the Ray cluster has" in output and "ray start --head --num-cpus" in output
    assert "Traceback" not in output
    runs = ray_head.home / ".duet" / "runs"
    assert not list(runs.glob("too-big*")), "nothing was trained: no artifact folder, no Ray Train run folder"


# ---------------------------------------------------------------- local runs beside the cluster


@dataclass
class LocalRun:
    work: Path
    tracking_uri: str
    artifact: Path
    output: str


@pytest.fixture(scope="module")
def stage1_local(ray_head: Head, tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    """pretrain.py run locally while the head is up: its own Ray instance, not the cluster's."""
    work = tmp_path_factory.mktemp("local")
    done = run_script("pretrain.py", "--config", DEMO, *sets(*TINY, f"run.work_dir={work}", "scaling.num_workers=1"))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return LocalRun(work, f"sqlite:///{work / 'mlflow.db'}", work / "runs" / "demo" / "stage1" / "artifact", output)


def test_a_local_run_beside_a_running_cluster_starts_its_own_ray(stage1_local: LocalRun) -> None:
    assert "[duet] Ray: started a local instance" in stage1_local.output
    assert "num_cpus and num_gpus must not be provided" not in stage1_local.output
    meta = json.loads((stage1_local.artifact / "artifact.json").read_text())
    assert meta["stage"] == 1 and meta["run_id"], "the artifact names the run that wrote it"
    assert set(meta["files"]) == {"vce_projector.safetensors"}


def test_finetune_from_a_stage1_artifact_given_by_path_with_optimizer_offload(stage1_local: LocalRun) -> None:
    meta = json.loads((stage1_local.artifact / "artifact.json").read_text())
    common = ["--config", DEMO, *sets(*TINY, f"run.work_dir={stage1_local.work}", "scaling.num_workers=1",
                                      "run.name=from-path", "deepspeed.offload_optimizer=true")]
    done = run_script("finetune.py", *common, "--stage1-artifact", str(stage1_local.artifact))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "stage 2 artifact:" in output and "ZeRORuntimeException" not in output

    client = MlflowClient(tracking_uri=stage1_local.tracking_uri)
    experiment = client.get_experiment_by_name("duet-demo")
    (stage2,) = client.search_runs([experiment.experiment_id], "tags.`duet.step` = 'stage2'")
    assert stage2.info.status == "FINISHED"
    tags = stage2.data.tags
    assert tags["duet.parent_stage_run_id"] == meta["run_id"], "lineage from the artifact's own record"
    assert tags["duet.stage1_artifact_uri"] == str(stage1_local.artifact)
    assert tags["duet.stage1_dataset_digest"] == meta["data_digest"]

    before = len(client.search_runs([experiment.experiment_id]))
    missing = run_script("finetune.py", *common, "--stage1-artifact", "/nonexistent/stage1")
    assert missing.returncode == 1, missing.stderr[-3000:]
    assert "[duet] error: no stage artifact at /nonexistent/stage1" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert len(client.search_runs([experiment.experiment_id])) == before, "no FAILED runs left behind"


def test_a_sweep_with_mlflow_telemetry_on_finishes(stage1_local: LocalRun) -> None:
    done = run_script("sweep.py", "--config", DEMO, *sets(
        *TINY, f"run.work_dir={stage1_local.work}", "scaling.num_workers=1", "stage2.max_steps=2",
        "stage2.eval_every=1", "tune.num_samples=2", "tune.grace_period=1", "tune.space.r=[4, 8]",
        "tune.space.alpha_over_r=[2.0]",
    ))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "_MLFLOW_TELEMETRY_SESSION_ID" not in output
    assert re.search(r"\[duet\] best config: .*-best\.yaml", output)
    assert "stage1: reused run" in output, "the sweep starts from the stage 1 already trained with this config"


def test_a_missing_image_in_a_llava_input_ends_in_one_line(tmp_path: Path) -> None:
    records = [{"id": "a", "image": "nowhere.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    done = run_script("full.py", "--config", DEMO, *sets(
        f"run.work_dir={tmp_path / 'work'}", "data.source=llava", f"data.input={tmp_path / 'llava.json'}",
    ))
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"\[duet\] error: .*record 'a'.*nowhere\.png", done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_a_changed_config_under_the_same_run_name_trains_afresh(stage1_local: LocalRun) -> None:
    """Checkpoints and artifacts are found by run name; what a re-run resumes or reuses must also be of its
    own config. Last in the module: it rewrites the run's stage-1 artifact."""
    first = json.loads((stage1_local.artifact / "artifact.json").read_text())["run_id"]
    common = [*TINY, f"run.work_dir={stage1_local.work}", "scaling.num_workers=1"]
    changed = run_script("pretrain.py", "--config", DEMO, *sets(*common, "stage1.lr=3e-3"))
    output = changed.stdout + changed.stderr
    assert changed.returncode == 0, output[-5000:]
    assert "stage1: training" in output and "resumed from checkpoint" not in output, output[-3000:]
    second = json.loads((stage1_local.artifact / "artifact.json").read_text())["run_id"]
    assert second != first
    folders = sorted(p.name for p in (stage1_local.work / "runs").glob("demo-stage1-*"))
    assert len(folders) == 2, folders  # one Ray Train folder per config

    again = run_script("pretrain.py", "--config", DEMO, *sets(*common))  # the first config once more
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-5000:]
    assert f"run {first} trained this config, but" in output and "resumed from checkpoint" in output, output[-3000:]
    third = json.loads((stage1_local.artifact / "artifact.json").read_text())["run_id"]
    assert third not in (first, second), "the artifact is rewritten by a run of the first config"
