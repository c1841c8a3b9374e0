"""What a sweep searches: adapter rank, alpha/r and the two stage-2 learning rates, and a search point applied.

Search parameters are named as in `tune.space`: `r` sets `adapter.r`, `alpha_over_r` sets
`adapter.alpha = r * alpha_over_r`, `adapter_lr` and `lr` set `stage2.adapter_lr` and `stage2.lr`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from ray import tune

from components.config import ConfigError, DuetConfig, SearchSpace, config_from_dict
from components.train.settings import total_steps
from components.train.stage import StageData

SEARCH_PARAMS = ("r", "alpha_over_r", "adapter_lr", "lr")


TUNABLE_ADAPTERS = ("lora", "dual_lora")  # the baselines size their experts with other keys


def search_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's param_space for `tune.space`: choices for r and alpha/r, log-uniform learning rates."""

    def log_uniform(bounds: tuple[float, float]) -> Any:
        low, high = bounds
        return low if low == high else tune.loguniform(low, high)

    return {
        "r": tune.choice(list(space.r)),
        "alpha_over_r": tune.choice(list(space.alpha_over_r)),
        "adapter_lr": log_uniform(space.adapter_lr),
        "lr": log_uniform(space.lr),
    }


def as_python_number(value: Any) -> Any:
    """Numpy scalars (what Tune samples) as Python numbers, so configs validate and dump cleanly."""
    return value.item() if hasattr(value, "item") else value


def apply_best(cfg: DuetConfig, best: Mapping[str, Any]) -> DuetConfig:
    """`cfg` with a search point applied, validated as a whole.

    Without `alpha_over_r` the base config's alpha/r ratio is kept for the new rank.
    """
    unknown = sorted(set(best) - set(SEARCH_PARAMS))
    if unknown:
        raise ConfigError(
            f"unknown search parameter(s) {', '.join(unknown)}: the sweep searches {', '.join(SEARCH_PARAMS)} "
            "(tune.space.*)"
        )
    point = {k: as_python_number(v) for k, v in best.items()}
    tree = cfg.model_dump(mode="json")
    r = point.get("r", cfg.adapter.r)
    ratio = point.get("alpha_over_r", cfg.adapter.alpha / cfg.adapter.r)
    if not (is_number(ratio) and ratio > 0):
        raise ConfigError(f"search point alpha_over_r={ratio!r} must be a positive number (tune.space.alpha_over_r)")
    tree["adapter"]["r"] = r
    if is_number(r) and ("r" in point or "alpha_over_r" in point):  # a non-number r: validation names it
        tree["adapter"]["alpha"] = r * ratio
    if "adapter_lr" in point:
        tree["stage2"]["adapter_lr"] = point["adapter_lr"]
    if "lr" in point:
        tree["stage2"]["lr"] = point["lr"]
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
        raise ConfigError(
            f"search point {shown} gives an invalid config (narrow tune.space to valid values):\n"
            f"{str(err).removeprefix('invalid config:').lstrip()}"
        ) from None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_sweepable(cfg: DuetConfig, data: StageData | None = None) -> None:
    """Refuse a sweep that cannot work, before any cluster work: every corner of the space must validate."""
    if cfg.adapter.type not in TUNABLE_ADAPTERS:
        raise ConfigError(
            f"adapter.type {cfg.adapter.type!r} cannot be swept: tune.space.r and alpha_over_r set adapter.r and "
            f"adapter.alpha, which only {' and '.join(TUNABLE_ADAPTERS)} use; set adapter.type to one of them"
        )
    space = cfg.tune.space
    for r, ratio, adapter_lr, lr in itertools.product(
        space.r, space.alpha_over_r, sorted(set(space.adapter_lr)), sorted(set(space.lr))
    ):
        apply_best(cfg, {"r": r, "alpha_over_r": ratio, "adapter_lr": adapter_lr, "lr": lr})
    if data is None:
        return
    if cfg.tune.metric == "val_loss" and not data.val_uri:
        raise ConfigError(
            "tune.metric 'val_loss' needs a validation split, and this dataset has none: set "
            "data.val_fraction > 0 (and re-prepare the data) or set tune.metric=loss"
        )
    steps = total_steps(cfg.stage2, data.num_train_samples)
    if cfg.tune.grace_period > steps:
        raise ConfigError(
            f"tune.grace_period ({cfg.tune.grace_period}) exceeds the stage-2 steps ({steps}): no trial could be "
            "stopped early; lower tune.grace_period or raise stage2.max_steps"
        )
