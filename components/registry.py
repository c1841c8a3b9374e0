"""Model registry: register a run's model with its lineage and metrics, and a gated alias promotion.

A version carries its metrics as tags ``metric.NAME`` and its lineage (source run,
stage-1 run and artifact, dataset digest, config hash, git commit) as ``duet.*``
tags, so the gate and a reader need nothing but the registry. Promotion moves
the alias (``registry.alias``, "champion") to a version only when its
``registry.metric`` beats the current holder's by more than ``registry.min_margin``
in ``registry.direction``; ``force`` skips the comparison and is recorded as
``duet.forced=true``. Every check and tag happens before the alias move, which
is the last and single call, so a failure anywhere leaves the previous champion
in place. Aliases are used, not the deprecated stages. What the model is (the
packaged LLaVA pyfunc or anything else) does not matter here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

from components.config import RegistrySection
from components.errors import DuetError
from components.evaluate.metrics import primary_score
from components.tracking.redact import is_secret_name, redact
from components.tracking.tags import (
    LINEAGE_TAGS,
    METRIC_TAG_PREFIX,
    TAG_FORCED,
    TAG_GATE,
    TAG_PROMOTED_OVER,
    TAG_SOURCE_RUN,
)
from components.tracking.tracker import Tracker

Outcome = Literal["promoted", "already", "rejected"]


class RegistryError(DuetError, RuntimeError):
    """A registry problem a user can fix; the message says what and how."""


@dataclass(frozen=True)
class Decision:
    """What the gate did and why."""

    model: str
    version: str
    alias: str
    outcome: Outcome
    reason: str
    candidate_value: float | None = None
    champion_version: str | None = None
    champion_value: float | None = None
    forced: bool = False

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    @property
    def verdict(self) -> str:
        """The outcome and its reason with the outcome said once: "promoted: beats version 2 ..."."""
        if self.reason.startswith(self.outcome):
            return self.reason
        return f"{'unchanged' if self.outcome == 'already' else self.outcome}: {self.reason}"

    def __str__(self) -> str:
        return f"{self.model} version {self.version}: {self.verdict}"


class Registry:
    """Registration and gated promotion for one registered model name (``registry.model_name``)."""

    def __init__(self, tracker: Tracker, cfg: RegistrySection) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.cfg = cfg

    # ------------------------------------------------------------ registration

    def register(
        self, run_id: str, artifact_path: str = "model", metrics: Mapping[str, float] | None = None,
        name: str | None = None,
    ) -> ModelVersion:
        """Register ``runs:/{run_id}/{artifact_path}`` with lineage and metric tags.

        Metrics default to the run's latest metric values. When ``score`` is not among
        them it is derived with ``components.metrics.primary_score`` if the metrics allow.
        """
        name = name or self.cfg.model_name
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise RegistryError(f"run {run_id!r} not found in {self.tracker.safe_uri}: register a run that exists") from None
        values = dict(run.data.metrics if metrics is None else metrics)
        if "score" not in values:
            try:
                values["score"] = primary_score(values)
            except ValueError:
                pass
        tags = {TAG_SOURCE_RUN: run_id}
        tags.update({k: run.data.tags[k] for k in LINEAGE_TAGS if k in run.data.tags})
        tags.update({f"{METRIC_TAG_PREFIX}{k}": repr(float(v)) for k, v in values.items()})
        safe = {k: redact(str(v)) for k, v in tags.items() if not is_secret_name(k)}
        # The client calls mlflow.register_model makes, without its two lines on stderr: the caller
        # says what was registered in its own words. The store resolves a models:/ID source through the
        # process's tracking URI, hence as_default.
        source, model_id = self._model_source(run, artifact_path)
        try:
            with self.tracker.as_default():
                try:
                    self.client.create_registered_model(name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                return self.client.create_model_version(name, source, run_id=run_id, tags=safe, model_id=model_id)
        except MlflowException as exc:
            raise RegistryError(
                f"cannot register runs:/{run_id}/{artifact_path} as {name!r}: {redact(exc.message)}"
            ) from None

    def _model_source(self, run: Run, artifact_path: str) -> tuple[str, str | None]:
        """``models:/ID`` and the ID of the newest model logged by the run under `artifact_path` (MLflow 3
        keeps a model's files in its logged-model record), else the artifact location of a model logged
        among the run's artifacts (``runs:/RUN/PATH``) and no ID."""
        found = self.client.search_logged_models(
            [run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{artifact_path}'",
            order_by=[{"field_name": "creation_time", "ascending": False}], max_results=1,
        )
        if found:
            return f"models:/{found[0].model_id}", found[0].model_id
        return RunsArtifactRepository.get_underlying_uri(f"runs:/{run.info.run_id}/{artifact_path}"), None

    # ------------------------------------------------------------ promotion

    def champion(self, name: str | None = None) -> ModelVersion | None:
        """The version holding the alias, or None when no version does yet."""
        try:
            return self.client.get_model_version_by_alias(name or self.cfg.model_name, self.cfg.alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def metric_of(self, version: ModelVersion) -> float | None:
        """The gate metric recorded on a version, or None when it was registered without it."""
        raw = version.tags.get(f"{METRIC_TAG_PREFIX}{self.cfg.metric}")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    def _beats(self, candidate: float, champion: float) -> bool:
        if self.cfg.direction == "max":
            return candidate > champion + self.cfg.min_margin
        return candidate < champion - self.cfg.min_margin

    def promote(self, version: int | str, force: bool = False, name: str | None = None) -> Decision:
        """Move the alias to ``version`` if it beats the current holder (or ``force``); see the module doc."""
        name = name or self.cfg.model_name
        alias = self.cfg.alias
        try:
            candidate = self.client.get_model_version(name, str(version))
        except MlflowException:
            raise RegistryError(
                f"model {name!r} has no version {version} in {self.tracker.safe_uri}: check --model/--version"
            ) from None
        current = self.champion(name)
        value = self.metric_of(candidate)
        held_value = self.metric_of(current) if current is not None else None
        base = {"model": name, "version": candidate.version, "alias": alias, "candidate_value": value,
                "champion_version": current.version if current else None, "champion_value": held_value}
        if current is not None and current.version == candidate.version:
            return Decision(**base, outcome="already", reason=f"version {candidate.version} already holds @{alias}")

        if force:
            reason = f"forced over {f'version {current.version}' if current else 'no champion'}, gate not applied"
        else:
            reason = self._gate(candidate, current, value, held_value)
            if reason.startswith("rejected"):
                self.client.set_model_version_tag(name, candidate.version, TAG_GATE, reason)
                return Decision(**base, outcome="rejected", reason=reason)

        self.client.set_model_version_tag(name, candidate.version, TAG_GATE, reason)
        self.client.set_model_version_tag(name, candidate.version, TAG_PROMOTED_OVER, current.version if current else "none")
        if force:
            self.client.set_model_version_tag(name, candidate.version, TAG_FORCED, "true")
        self.client.set_registered_model_alias(name, alias, candidate.version)  # the last, single call
        return Decision(**base, outcome="promoted", reason=reason, forced=force)

    def _gate(
        self, candidate: ModelVersion, current: ModelVersion | None, value: float | None, held: float | None
    ) -> str:
        """The gate's verdict as a sentence starting 'promoted' or 'rejected'; raises when it cannot judge."""
        metric, alias = self.cfg.metric, self.cfg.alias
        if value is None:
            raise RegistryError(
                f"version {candidate.version} has no {metric!r} metric (tag {METRIC_TAG_PREFIX}{metric}): register "
                f"it with that metric, set registry.metric to one it has, or pass --force"
            )
        if current is None:
            return f"promoted: first holder of @{alias} ({metric} {value:.4g})"
        if held is None:
            raise RegistryError(
                f"@{alias} version {current.version} has no {metric!r} metric to compare with: pass --force "
                f"to replace it, or set registry.metric to a metric both versions have"
            )
        rule = f"{self.cfg.direction} by more than {self.cfg.min_margin:g}"
        if self._beats(value, held):
            return f"promoted: {metric} {value:.4g} beats {held:.4g} of version {current.version} ({rule})"
        return (
            f"rejected: {metric} {value:.4g} does not beat {held:.4g} of version {current.version} ({rule}); "
            f"@{alias} stays on version {current.version}"
        )
