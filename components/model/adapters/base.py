"""The shared base of every duet adapter method: a PEFT custom LoRA config and an input-dependent layer.

Each method is a `LoraConfig` subclass (`CustomLoraConfig`) that registers its own layer class
through PEFT's extension point (`LoraConfig._register_custom_module`), so `get_peft_model`,
`save_pretrained` (only `lora_`-prefixed tensors, safetensors) and `PeftModel.from_pretrained(base, path)`
(with or without `config=`: `loading.py` makes PEFT's plain path read `adapter_method`) work
unchanged; and a layer (`InputDependentLoraLayer`) whose update depends on the input and therefore
cannot be merged into W. A new method is one module in this package plus one line in `apply.py`.

Mixed-adapter batches (`model(x, adapter_names=[...])`, also through `generate`) work as for PEFT's
LoRA: PEFT checks the names against each layer's `lora_A` keys, so every adapter a layer holds has an
entry there (a parameterless `AdapterSlot` where the method has no single A matrix).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraLayer
from torch import nn

from components.errors import DuetError

CONFIG_FILE = "adapter_config.json"


class NotMergeableError(DuetError, RuntimeError):
    """Raised by merge/unmerge: the adapter's update depends on the input, so W cannot absorb it."""


@dataclass
class CustomLoraConfig(LoraConfig):
    """A `LoraConfig` for a LoRA-family method with its own layer class.

    `adapter_method` is written to adapter_config.json so a saved adapter says which class
    rebuilds it (PEFT itself only records `peft_type: LORA`).
    """

    METHOD: ClassVar[str] = ""
    adapter_method: str = field(default="", metadata={"help": "Which custom LoRA method this config builds."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.adapter_method:
            self.adapter_method = self.METHOD
        if self.adapter_method != self.METHOD:
            raise ValueError(
                f"adapter_method is {self.adapter_method!r} but {type(self).__name__} "
                f"builds {self.METHOD!r}; "
                "load saved adapters with components.model.adapters.load_adapter, which picks the class"
            )
        self._refuse_unsupported_options()
        self._register_custom_module({nn.Linear: self.layer_class()})

    def layer_class(self) -> type[nn.Module]:
        """The PEFT layer that replaces each targeted nn.Linear."""
        raise NotImplementedError

    def _refuse_unsupported_options(self) -> None:
        """LoRA variants and merge-related options assume the plain B A update; refuse them by name."""
        name = type(self).__name__
        variants = [
            f.name
            for f in dataclasses.fields(LoraConfig)
            if f.metadata.get("is_lora_variant") and getattr(self, f.name)
        ]
        if variants:
            raise ValueError(
                f"{name} does not support the LoRA variant option(s) {variants}; leave them unset"
            )
        for option in ("lora_bias", "fan_in_fan_out", "target_parameters", "use_qalora"):
            if getattr(self, option, None):
                raise ValueError(
                    f"{name} does not support {option}; leave it unset (targets are nn.Linear modules)"
                )
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"{name}.init_lora_weights must be True (B = 0, step 0 equals the base model) or False "
                f"(random B, for tests), got {self.init_lora_weights!r}"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Rebuild this config class from a local adapter directory written by `save_pretrained`.

        PEFT's own loader maps `peft_type: LORA` to plain `LoraConfig` and drops the extra
        fields, which would silently turn the adapter into a plain LoRA; `loading.py` sends PEFT's
        plain loaders here for folders that name an `adapter_method`.
        """
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        file = folder / CONFIG_FILE
        if not file.is_file():
            raise ValueError(
                f"no {CONFIG_FILE} in {str(folder)!r}: pass the local directory that save_pretrained wrote"
            )
        saved = json.loads(file.read_text())
        saved.pop("runtime_config", None)
        method = saved.get("adapter_method")
        if method != cls.METHOD:
            raise ValueError(
                f"{file} holds a {method or 'plain LoRA'!r} adapter, not {cls.METHOD!r}; "
                "use components.model.adapters.load_adapter, which picks the right class"
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(saved) - known)
        if unknown:
            warnings.warn(f"{file}: ignoring keys {unknown} unknown to {cls.__name__}", stacklevel=2)
        return cls(**{k: v for k, v in saved.items() if k in known}, **kwargs)


class AdapterSlot(nn.Module):
    """A parameterless `lora_A` entry for a method without a single A matrix (Dual-LoRA has S and T).

    PEFT finds which adapters a layer holds from the keys of `lora_A` (the mixed-batch name check,
    `scale_layer`), so the entry must exist; it holds nothing, so saved files do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "this lora_A entry only records the adapter's name; the layer computes its own update"
        )


class InputDependentLoraLayer(nn.Module, LoraLayer):
    """A PEFT LoRA layer around an nn.Linear whose added term depends on the input.

    Subclasses create their tensors in `_create_adapter` and compute the added term in
    `_adapter_delta`; this class handles both PEFT constructor call styles, multiple adapters,
    disabling, mixed-adapter batches, dtype casting like PEFT's LoRA, and refusing merges.
    """

    config_class: ClassVar[type[CustomLoraConfig]]
    label: ClassVar[str] = "this adapter"
    other_param_names = LoraLayer.other_param_names

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: CustomLoraConfig | None = None,
        r: int = 0,
        lora_alpha: float = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs.get("loaded_in_8bit") or kwargs.get("loaded_in_4bit"):
            raise ValueError(
                f"{self.label} does not support quantized (8/4-bit) base layers; load the base in 16/32 bit"
            )
        LoraLayer.__init__(self, base_layer, ephemeral_gpu_offload=kwargs.pop("ephemeral_gpu_offload", False))
        if not isinstance(self.get_base_layer(), nn.Linear) or self.in_features is None:
            raise TypeError(
                f"{self.label} adapts nn.Linear modules only, got {type(self.get_base_layer()).__name__}"
            )
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._init_containers()
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- adapter creation ------------------------------------------------------------

    def _resolve_config(self, config: CustomLoraConfig | None, r: int, lora_alpha: float, kwargs: dict):
        """Accept PEFT's `config=` style and the older flattened-kwargs style alike."""
        if config is None:
            names = {f.name for f in dataclasses.fields(self.config_class) if f.init} - {"r", "lora_alpha"}
            config = self.config_class(
                r=r, lora_alpha=lora_alpha, **{k: v for k, v in kwargs.items() if k in names}
            )
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"a {self.label} layer can only hold {self.label} adapters, got a {type(config).__name__}; "
                "use one adapter type per model or target different modules"
            )
        return config

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        config: CustomLoraConfig | None = None,
        **kwargs: Any,
    ) -> None:
        """Add (or replace) adapter `adapter_name`; PEFT calls this for every further adapter too."""
        config = self._resolve_config(config, r, lora_alpha, kwargs)
        self._caches.pop(f"stacked:{adapter_name}", None)
        r = self._rank(config, r)
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        self._create_adapter(adapter_name, r, config)
        if adapter_name not in self.lora_A:
            self.lora_A[adapter_name] = AdapterSlot()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_A:  # an AdapterSlot: lora_A is not among this method's containers
            del self.lora_A[adapter_name]
        self._caches.pop(f"stacked:{adapter_name}", None)

    def _rank(self, config: CustomLoraConfig, r: int) -> int:
        """The rank used for the scaling; PEFT passes `r` (possibly from rank_pattern)."""
        return r

    def _init_containers(self) -> None:
        """Create the per-adapter containers beyond LoraLayer's own (r, scaling, lora_B, ...)."""
        raise NotImplementedError

    def _create_adapter(self, adapter_name: str, r: int, config: CustomLoraConfig) -> None:
        raise NotImplementedError

    def _adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The scaled added term for input `x` (already in the adapter's dtype)."""
        raise NotImplementedError

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        return self.lora_B[adapter_name].weight.dtype

    def _holds(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_B

    def _fusable(self, adapter_name: str, *weights: torch.Tensor) -> bool:
        """Whether the one-GEMM path applies: no active dropout and weights not partitioned.

        ZeRO-3 only gathers a submodule's weights inside that submodule's forward; the fused path
        reads them directly, so partitioned weights (`ds_id`) take the plain path.
        """
        dropout = self.lora_dropout[adapter_name]
        dropout_active = isinstance(dropout, nn.Dropout) and dropout.p > 0 and self.training
        return not dropout_active and not any(hasattr(w, "ds_id") for w in weights)

    def _stacked(self, adapter_name: str, *weights: torch.Tensor) -> torch.Tensor:
        """The weights stacked along the output dim for one GEMM.

        With autograd on, a fresh `torch.cat` carries the gradients back to each weight. Without
        it (inference, generation), the stacked copy is kept and reused while every weight is the
        same tensor at the same version, so a one-token decode step pays one GEMV and no copy.
        """
        key = f"stacked:{adapter_name}"
        if torch.is_grad_enabled():
            self._caches.pop(key, None)  # no stale copy held through training
            return torch.cat(weights, dim=0)
        stamp = tuple((id(w), w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        cached = self._caches.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, torch.cat(weights, dim=0))
            self._caches[key] = cached
        return cached[1]

    # -- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if not self._holds(name):
                continue
            result = result + self._adapter_delta(name, self._cast_input_dtype(x, self._adapter_dtype(name)))
        return result.to(result_dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Per-sample adapters (`adapter_names=[...]` at inference), `__base__` meaning none.

        Each row gets the computation `forward` does with that adapter alone active: the delta is
        added before casting back to the base output's dtype, as there, so half-precision rows round
        the same way (only the sub-batch's GEMM shapes differ).
        Rows naming an adapter this layer does not hold get the base output (PEFT's rule: not every
        layer need hold every adapter; PEFT checks the names exist somewhere in the model).
        """
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or not self._holds(name):
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            sub = self._cast_input_dtype(x[rows], self._adapter_dtype(name))
            result[rows] = (result[rows] + self._adapter_delta(name, sub)).to(result.dtype)
        return result

    # -- merging is impossible --------------------------------------------------------------

    def _not_mergeable(self) -> NotMergeableError:
        return NotMergeableError(
            f"{self.label} cannot be merged into the base weight: its update depends on the input "
            "(an input-dependent gate), so no fixed matrix equals it. Keep the adapter attached for "
            "inference (use the PeftModel as is); unload() removes it without merging."
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise self._not_mergeable()

    def unmerge(self) -> None:
        raise self._not_mergeable()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise self._not_mergeable()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False
