"""Registration and the gated alias promotion against a real `mlflow server`, library and CLI."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import pytest
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (session fixture)

from components.config import RegistrySection, TrackingSection, load_config
from components.registry import Registry, RegistryError
from components.tracking.tags import (
    TAG_CONFIG_HASH,
    TAG_DATASET_DIGEST,
    TAG_FORCED,
    TAG_GATE,
    TAG_PARENT_STAGE_RUN,
    TAG_SOURCE_RUN,
)
from components.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[1]


class _UpperModel(mlflow.pyfunc.PythonModel):
    """A real, tiny pyfunc to register: the registry must not care what the model is."""

    def predict(self, model_input: list[str], params: dict | None = None) -> list[str]:
        return [text.upper() for text in model_input]


@dataclass
class Setup:
    tracker: Tracker
    run_id: str
    stage1_id: str


@pytest.fixture(scope="module")
def setup(mlflow_server: MlflowServer) -> Setup:  # noqa: F811
    """One pipeline run whose stage-2 child has lineage, metrics and a logged pyfunc model."""
    tracker = Tracker(TrackingSection(tracking_uri=mlflow_server.uri, experiment=f"reg-{uuid.uuid4().hex[:8]}"), "x")
    cfg = load_config()
    with tracker.parent_run("registry-test") as parent:
        with tracker.child_run("stage", "stage1", parent) as stage1:
            tracker.log_config(stage1, cfg)
        with tracker.child_run("stage", "stage2", parent) as stage2:
            tracker.log_config(stage2, cfg)
            tracker.tag_lineage(stage2, stage1, "s3://bucket/stage1", "digest-123")
            tracker.log_metrics(stage2, {"iou": 40.0, "f1": 60.0, "loss": 0.7})
            tracker.log_pyfunc(stage2, "model", _UpperModel(), pip_requirements=["mlflow"])
    return Setup(tracker, stage2, stage1)


def _registry(setup: Setup, **cfg: object) -> Registry:
    return Registry(setup.tracker, RegistrySection(model_name=f"m-{uuid.uuid4().hex[:8]}", **cfg))


def _version(reg: Registry, setup: Setup, **metrics: float) -> str:
    return reg.register(setup.run_id, "model", metrics=metrics).version


def _alias_version(reg: Registry) -> str | None:
    champion = reg.champion()
    return champion.version if champion else None


def test_register_carries_lineage_and_metrics_and_serves_by_alias(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    reg = _registry(setup)
    with caplog.at_level(logging.WARNING):
        version = reg.register(setup.run_id)  # metrics from the run; score derived from iou and f1
    assert version.source.startswith("models:/m-"), version.source  # the logged model, by id
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    tags = version.tags
    assert tags[TAG_SOURCE_RUN] == setup.run_id
    assert tags[TAG_PARENT_STAGE_RUN] == setup.stage1_id
    assert tags[TAG_DATASET_DIGEST] == "digest-123"
    assert tags[TAG_CONFIG_HASH] == load_config().hash()
    assert float(tags["metric.iou"]) == 40.0 and float(tags["metric.loss"]) == 0.7
    assert float(tags["metric.score"]) == pytest.approx(50.0)
    decision = reg.promote(version.version)
    assert decision.promoted and "first holder" in decision.reason
    with setup.tracker.as_default():
        model = mlflow.pyfunc.load_model(f"models:/{reg.cfg.model_name}@champion")
    assert list(model.predict(["dual lora"])) == ["DUAL LORA"]
    assert reg.promote(version.version).outcome == "already"


def test_gate_promotes_better_and_refuses_worse(setup: Setup) -> None:
    reg = _registry(setup)
    v1, v2, v3 = (_version(reg, setup, score=s) for s in (50.0, 60.0, 55.0))
    assert reg.promote(v1).promoted
    assert reg.promote(v2).promoted and _alias_version(reg) == v2
    refused = reg.promote(v3)
    assert refused.outcome == "rejected"
    assert "55 does not beat 60" in refused.reason and f"stays on version {v2}" in refused.reason
    assert _alias_version(reg) == v2
    assert reg.client.get_model_version(reg.cfg.model_name, v3).tags[TAG_GATE] == refused.reason
    assert (refused.candidate_value, refused.champion_version, refused.champion_value) == (55.0, v2, 60.0)


def test_min_margin_and_direction_min(setup: Setup) -> None:
    reg = _registry(setup, metric="pmae", direction="min", min_margin=1.0)
    v1, v2, v3 = (_version(reg, setup, pmae=p) for p in (50.0, 49.5, 48.0))
    assert reg.promote(v1).promoted
    assert reg.promote(v2).outcome == "rejected"  # better, but not by more than the margin
    assert _alias_version(reg) == v1
    assert reg.promote(v3).promoted and _alias_version(reg) == v3


def test_force_promotes_a_worse_version_and_is_recorded(setup: Setup) -> None:
    reg = _registry(setup)
    v1, v2 = _version(reg, setup, score=70.0), _version(reg, setup, score=10.0)
    reg.promote(v1)
    decision = reg.promote(v2, force=True)
    assert decision.promoted and decision.forced and _alias_version(reg) == v2
    versions = {v: reg.client.get_model_version(reg.cfg.model_name, v).tags for v in (v1, v2)}
    assert versions[v2][TAG_FORCED] == "true" and TAG_FORCED not in versions[v1]


def test_failure_mid_promotion_leaves_the_champion(setup: Setup) -> None:
    reg = _registry(setup)
    v1 = _version(reg, setup, score=50.0)
    v2 = _version(reg, setup, loss=0.1)  # registered without the gate metric (and nothing to derive it from)
    reg.promote(v1)
    with pytest.raises(RegistryError, match=f"version {v2} has no 'score' metric"):
        reg.promote(v2)
    assert _alias_version(reg) == v1
    with pytest.raises(RegistryError, match="has no version 99"):
        reg.promote(99)
    assert _alias_version(reg) == v1
    with pytest.raises(RegistryError, match="not found"):
        reg.register("0" * 32)


def _cli(server: MlflowServer, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "pipelines/promote.py", "--set", f"tracking.tracking_uri={server.uri}", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_promote_cli_end_to_end(setup: Setup, mlflow_server: MlflowServer) -> None:  # noqa: F811
    reg = _registry(setup)
    name = reg.cfg.model_name
    v1, v2 = _version(reg, setup, score=80.0), _version(reg, setup, score=20.0)
    reg.promote(v1)

    refused = _cli(mlflow_server, "--model", name, "--version", v2)
    assert refused.returncode == 1, refused.stderr
    assert "rejected" in refused.stdout and f"stays on version {v1}" in refused.stdout
    assert _alias_version(reg) == v1

    forced = _cli(mlflow_server, "--model", name, "--version", v2, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "promoted" in forced.stdout and _alias_version(reg) == v2
    assert reg.client.get_model_version(name, v2).tags[TAG_FORCED] == "true"

    missing = _cli(mlflow_server, "--model", name, "--version", "42")
    assert missing.returncode == 2 and f"model {name!r} has no version 42" in missing.stderr


def test_registering_in_a_local_sqlite_store_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The demo's store: a models:/ID source is resolved there through the tracking URI; MLflow's own
    "Successfully registered model" / "Created version" lines are not printed (duet says it once)."""
    tracker = Tracker(TrackingSection(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="local"), str(tmp_path))
    with tracker.parent_run("local") as parent, tracker.child_run("stage", "stage2", parent) as stage2:
        tracker.log_metrics(stage2, {"score": 10.0})
        tracker.log_pyfunc(stage2, "model", _UpperModel(), pip_requirements=["mlflow"])
    capfd.readouterr()
    reg = Registry(tracker, RegistrySection(model_name="local-model"))
    first, second = reg.register(stage2), reg.register(stage2)
    assert (str(first.version), str(second.version)) == ("1", "2") and first.source.startswith("models:/m-")
    printed = capfd.readouterr()
    assert "registered" not in printed.err + printed.out and "Created version" not in printed.err, printed
