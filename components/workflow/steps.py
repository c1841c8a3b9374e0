"""How a step of the pipeline is recognised as done: a step hash, and what a finished step hands on.

A step's hash covers only the config sections that change its result (the worker count, for one,
does not: runs are reproducible across worker counts) plus its inputs' digests; a finished MLflow
run with the same hash whose artifact still exists is reused instead of run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from components.config import DuetConfig


def step_hash(cfg: DuetConfig, step: str, **inputs: Any) -> str:
    """Digest of what determines a step's output: its config sections plus its inputs (digests, URIs)."""
    sections: dict[str, list[str]] = {
        "stage1": ["model", "vce", "stage1", "deepspeed"],
        "stage2": ["model", "vce", "adapter", "stage2", "deepspeed"],
        "evaluate": ["eval"],
    }
    dumped = cfg.model_dump(mode="json")
    payload = {s: dumped[s] for s in sections.get(step, [])}
    payload.update(seed=cfg.run.seed, precision=cfg.deepspeed.precision, inputs=inputs, step=step)
    payload["data_template"] = [cfg.data.conversation_template, cfg.data.caption_template]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StepOutcome:
    """A finished step: its MLflow run (None when the store does not hold it), artifact and final metrics."""

    run_id: str | None
    artifact_uri: str
    reused: bool
    metrics: dict[str, Any]
    data_digest: str | None = None
