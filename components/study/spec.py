"""What a method study declares and what each of its trials trains: one fully validated config per variant.

A study is resolved before any training: every variant's overrides are applied to the base config
through `apply_override`, the path `--set` takes (each value is written back as YAML text, so a
string stays a string and is coerced or refused exactly as the same value in a config file), and
the result is validated by the same pydantic models. A mistake in any variant stops the study before
its first trial, with a message naming the study, the variant and the key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from components.config import ConfigError, DuetConfig, StudySpec, apply_override, config_from_dict
from components.workflow.steps import step_hash


@dataclass(frozen=True)
class StudyTrial:
    """One trial: a variant trained with one seed; `config` has that seed as run.seed."""

    variant: str
    seed: int
    config: DuetConfig


@dataclass(frozen=True)
class ResolvedStudy:
    """A study checked against its base config: the config of every variant and the trials to run."""

    name: str
    spec: StudySpec
    variants: Mapping[str, DuetConfig]  # declaration order; each with the base run.seed
    trials: tuple[StudyTrial, ...]  # variant-major, seeds ascending

    @property
    def reference(self) -> str:
        return self.spec.reference

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(trial.seed for trial in self.trials))

    @property
    def adapter_only(self) -> bool:
        """True when stage 2 trains the adapter alone: the runner freezes the projector and VCE (Table 5)."""
        return self.spec.trainable == "adapter_only"


def resolve_study(cfg: DuetConfig, name: str | None = None) -> ResolvedStudy:
    """Study `name` (default: study.name) of `cfg`, every variant's config validated; ConfigError otherwise."""
    studies = cfg.study.studies
    if not studies:
        raise ConfigError("no studies declared: add one under study.studies (README, \"Method studies\"), or use "
                          "a shipped config, e.g. pipelines/configs/demo.yaml")
    chosen = name if name is not None else cfg.study.name
    if chosen is None:
        raise ConfigError(f"no study chosen: pass its name or set study.name; declared: {', '.join(studies)}")
    if chosen not in studies:
        raise ConfigError(f"unknown study {chosen!r}; declared in study.studies: {', '.join(studies)}")
    spec = studies[chosen]
    # A trial trains one variant; the declarations of every study are not part of what it trains.
    base = cfg.model_dump(mode="json", exclude={"study"})
    for variant, overrides in spec.variants.items():
        if "stage2.trainable" in overrides:
            raise ConfigError(f"study {chosen!r}, variant {variant!r}: stage2.trainable is set for the whole study by "
                              f"study.studies.{chosen}.trainable; remove it from the variant")
    # The study's trainable set is part of every variant's stage 2 (and so of its step hash).
    fixed = {"stage2.trainable": spec.trainable}
    variants = {variant: _variant_config(base, chosen, variant, {**overrides, **fixed})
                for variant, overrides in spec.variants.items()}
    first = cfg.run.seed
    trials = tuple(
        StudyTrial(variant, seed, _with_seed(variant_cfg, chosen, variant, seed))
        for variant, variant_cfg in variants.items()
        for seed in range(first, first + spec.seeds)
    )
    return ResolvedStudy(chosen, spec, variants, trials)


def _variant_config(base: dict[str, Any], study: str, variant: str, overrides: Mapping[str, Any]) -> DuetConfig:
    where = f"study {study!r}, variant {variant!r}"
    fix = f"fix study.studies.{study}.variants.{variant}"
    tree = copy.deepcopy(base)
    for key, value in overrides.items():
        try:
            apply_override(tree, f"{key}={_as_yaml(value)}")
        except ConfigError as err:
            raise ConfigError(f"{where}: override {str(err).removeprefix('--set ')} ({fix})") from None
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        raise ConfigError(f"{where}: its overrides give an invalid config ({fix}):\n"
                          f"{_problems(err)}") from None


def _with_seed(cfg: DuetConfig, study: str, variant: str, seed: int) -> DuetConfig:
    tree = cfg.model_dump(mode="json")
    tree["run"]["seed"] = seed
    try:
        return config_from_dict(tree)
    except ConfigError as err:  # run.seed near the top of the seed range: run.seed + seeds - 1 overflows
        raise ConfigError(f"study {study!r}, variant {variant!r}: seed {seed} is out of range (lower run.seed or "
                          f"study.studies.{study}.seeds):\n{_problems(err)}") from None


def _problems(err: ConfigError) -> str:
    """The indented problem lines of a config error, without its "invalid config:" heading."""
    return str(err).removeprefix("invalid config:\n")


def _as_yaml(value: Any) -> str:
    """A value read from YAML written back as YAML text on one line, for `apply_override` to parse."""
    return yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)


def stage1_key(cfg: DuetConfig) -> str:
    """What decides a trial's stage-1 artifact: the stage-1 step hash the workflow reuses stage 1 by (base,
    VCE, stage-1 settings, precision, seed), plus the data section, which the workflow covers by the
    digest of the prepared dataset."""
    return step_hash(cfg, "stage1", data=cfg.data.model_dump(mode="json"))


def vce_groups(resolved: ResolvedStudy) -> dict[str, tuple[StudyTrial, ...]]:
    """Trials that can share one stage 1, by `stage1_key`: variants that differ only in adapter or stage-2
    settings share one stage 1 per seed; a different VCE setting gets its own. First-appearance order."""
    groups: dict[str, list[StudyTrial]] = {}
    for trial in resolved.trials:
        groups.setdefault(stage1_key(trial.config), []).append(trial)
    return {key: tuple(trials) for key, trials in groups.items()}
