"""The one switch from `AdapterSection` to a PEFT-wrapped model, and back from a saved adapter.

`adapter.type` picks the method: plain LoRA (PEFT's own), Dual-LoRA, or one of the Table-1
mixture baselines. Every method is a `LoraConfig` (sub)class, so wrapping, saving and loading
go through PEFT in the same way; `load_adapter` reads `adapter_method` from the saved
adapter_config.json to pick the class.

Targets. Plain module names (`q_proj`, or a dotted suffix like `self_attn.q_proj`) match modules
whose name ends with them, but never inside the vision tower, the projector or VCE: a LLaVA's CLIP
tower also has `q_proj`/`v_proj`, and the paper adapts only the language model. Entries with
regex characters are taken as full-match regexes exactly as written (the user's own scope).
All entries are combined into one full-match regex, the form PEFT accepts for a string.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from components.config import AdapterSection
from components.model.adapters.base import CONFIG_FILE, CustomLoraConfig
from components.model.adapters.dual_lora import DualLoraConfig
from components.model.adapters.moe_lora import MoeLoraSoftmaxConfig, MoeLoraTopkConfig, RodeLoraConfig

ADAPTER_PREFIX = "lora_"


# Submodules of a multimodal model that plain target names never reach (vision side, projector, VCE).
NON_LANGUAGE_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "vce")


CUSTOM_CONFIGS: dict[str, type[CustomLoraConfig]] = {
    cls.METHOD: cls for cls in (DualLoraConfig, MoeLoraTopkConfig, MoeLoraSoftmaxConfig, RodeLoraConfig)
}


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def target_regex(targets: list[str]) -> str:
    """One full-match regex for `targets`: plain names scoped to the language model, regexes as given."""
    if not targets:
        raise ValueError("adapter.target_modules must name at least one module, e.g. [q_proj, v_proj]")
    plain = [t for t in targets if _PLAIN_NAME.fullmatch(t)]
    custom = [t for t in targets if not _PLAIN_NAME.fullmatch(t)]
    for pattern in custom:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"adapter.target_modules entry {pattern!r} is not a valid regex: {exc}"
            ) from None
    parts = [f"(?:{p})" for p in custom]
    if plain:
        excluded = "|".join(NON_LANGUAGE_MODULES)
        names = "|".join(re.escape(t) for t in plain)
        parts.append(rf"(?!(?:.*\.)?(?:{excluded})\.)(?:.*\.)?(?:{names})")
    return "|".join(parts)


def peft_config_for(cfg: AdapterSection) -> LoraConfig:
    """The PEFT config for `cfg`; adapter.type 'none' has none."""
    common = dict(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_regex(cfg.target_modules),
        use_rslora=cfg.use_rslora,
    )
    experts = [cfg.expert_rank] * cfg.num_experts
    if cfg.type == "lora":
        return LoraConfig(**common)
    if cfg.type == "dual_lora":
        return DualLoraConfig(**common, skill_norm=cfg.skill_norm, task_activation=cfg.task_activation)
    if cfg.type == "moe_lora_topk":
        return MoeLoraTopkConfig(**common, expert_ranks=experts, top_k=cfg.top_k)
    if cfg.type == "moe_lora_softmax":
        return MoeLoraSoftmaxConfig(**common, expert_ranks=experts)
    if cfg.type == "rode":
        return RodeLoraConfig(**common, expert_ranks=list(cfg.rode_ranks))
    raise ValueError(
        f"adapter.type {cfg.type!r} has no PEFT config; choose one of lora, dual_lora, moe_lora_topk, "
        "moe_lora_softmax, rode (or none for no adapter)"
    )


def apply_adapter(model: nn.Module, cfg: AdapterSection) -> nn.Module:
    """Wrap `model` with the configured adapter (only adapter tensors stay trainable); 'none': unchanged.

    PEFT freezes everything but the adapter: callers that also train other parts (projector, VCE)
    re-enable those after this call.
    """
    if cfg.type == "none":
        return model
    config = peft_config_for(cfg)
    with _peft_wrapping():
        return _checked(get_peft_model(model, config), config)


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning
    for PEFT's maintainers on every user's terminal and every worker's log. Only that one is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _checked(model: PeftModel, config: LoraConfig) -> PeftModel:
    """Refuse targets a custom method cannot adapt: PEFT would silently put plain LoRA there."""
    if not isinstance(config, CustomLoraConfig):
        return model
    layer_cls = config.layer_class()
    stray = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, layer_cls)]
    if stray:
        raise ValueError(
            f"adapter.target_modules matched modules that {config.adapter_method} cannot adapt (it adapts "
            f"nn.Linear only): {stray[:5]}; narrow the names or regex to linear layers"
        )
    return model


def config_class_for(saved: dict, source: str = CONFIG_FILE) -> type[LoraConfig]:
    """The config class that rebuilds a saved adapter_config.json's contents."""
    method = saved.get("adapter_method")
    if method is None:
        if saved.get("peft_type") != "LORA":
            raise ValueError(
                f"{source}: peft_type {saved.get('peft_type')!r} is not supported; "
                "expected a LoRA-family adapter "
                f"({', '.join(['lora', *CUSTOM_CONFIGS])})"
            )
        return LoraConfig
    if method not in CUSTOM_CONFIGS:
        raise ValueError(f"{source}: unknown adapter_method {method!r}; known: {sorted(CUSTOM_CONFIGS)}")
    return CUSTOM_CONFIGS[method]


def load_adapter(
    model: nn.Module, path: str | Path, is_trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """Attach the adapter saved at local directory `path` to `model`, whatever its method."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {str(path)!r}: pass the directory that save_pretrained wrote")
    config_cls = config_class_for(json.loads(file.read_text()), str(file))
    config = config_cls.from_pretrained(str(path))
    with _peft_wrapping():
        loaded = PeftModel.from_pretrained(
            model, str(path), adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )
    return _checked(loaded, config)


def is_adapter_param(name: str) -> bool:
    """Whether parameter `name` belongs to an adapter (some path component starts with `lora_`)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))
