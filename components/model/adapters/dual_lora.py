"""Dual-LoRA (paper section 3.4, eq. 11) as a PEFT method.

    z = W x + scale * B( LN(S dropout(x)) * relu(T x) ),   scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

S (skill) and T (task) are r x d_in, B is d_out x r; LN is a LayerNorm over the r dims.
`skill_norm` and `task_activation` are the switches of the paper's Table 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from components.model.adapters.base import (
    CustomLoraConfig,
    InputDependentLoraLayer,
)

TASK_ACTIVATIONS = ("relu", "none")


@dataclass
class DualLoraConfig(CustomLoraConfig):
    """Dual-LoRA: skill space S (layer-normed) gated element-wise by the rectified task space T.

    `skill_norm` and `task_activation` switch the paper's Table-4 ablations.
    """

    METHOD: ClassVar[str] = "dual_lora"
    adapter_method: str = field(
        default="dual_lora", metadata={"help": "Which custom LoRA method this config builds."}
    )
    skill_norm: bool = field(default=True, metadata={"help": "LayerNorm (affine) over the r skill dims."})
    task_activation: str = field(
        default="relu", metadata={"help": "Task-space activation: 'relu' or 'none'."}
    )

    def __post_init__(self) -> None:
        if self.task_activation not in TASK_ACTIVATIONS:
            raise ValueError(
                f"DualLoraConfig.task_activation must be one of {list(TASK_ACTIVATIONS)}, "
                f"got {self.task_activation!r}"
            )
        if not isinstance(self.skill_norm, bool):
            raise ValueError(f"DualLoraConfig.skill_norm must be true or false, got {self.skill_norm!r}")
        super().__post_init__()

    def layer_class(self) -> type[nn.Module]:
        return DualLoraLinear


class DualLoraLinear(InputDependentLoraLayer):
    """nn.Linear + Dual-LoRA. Per adapter: lora_S, lora_T (r x d_in), lora_B (d_out x r), lora_norm."""

    config_class = DualLoraConfig
    label = "Dual-LoRA"
    adapter_layer_names = ("lora_S", "lora_T", "lora_B", "lora_norm")
    other_param_names = InputDependentLoraLayer.other_param_names + ("skill_norm", "task_activation")

    def _init_containers(self) -> None:
        self.lora_S = nn.ModuleDict()
        self.lora_T = nn.ModuleDict()
        self.lora_norm = nn.ModuleDict()
        self.skill_norm: dict[str, bool] = {}
        self.task_activation: dict[str, str] = {}

    def _create_adapter(self, adapter_name: str, r: int, config: DualLoraConfig) -> None:
        self.lora_S[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_T[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        if config.skill_norm:
            self.lora_norm[adapter_name] = nn.LayerNorm(r, elementwise_affine=True)
        elif adapter_name in self.lora_norm:
            del self.lora_norm[adapter_name]
        self.skill_norm[adapter_name] = config.skill_norm
        self.task_activation[adapter_name] = config.task_activation
        for space in (self.lora_S, self.lora_T):
            nn.init.kaiming_uniform_(space[adapter_name].weight, a=math.sqrt(5))
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_B[adapter_name].weight)

    def _skill_and_task(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S dropout(x) and T x; one GEMM on the stacked (2r x d_in) weight when dropout is inactive."""
        s_layer, t_layer = self.lora_S[adapter_name], self.lora_T[adapter_name]
        if self._fusable(adapter_name, s_layer.weight, t_layer.weight):
            both = F.linear(x, self._stacked(adapter_name, s_layer.weight, t_layer.weight))
            return both.split(self.r[adapter_name], dim=-1)
        return s_layer(self.lora_dropout[adapter_name](x)), t_layer(x)

    def _adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        skill, task = self._skill_and_task(adapter_name, x)
        if self.skill_norm[adapter_name]:
            skill = self.lora_norm[adapter_name](skill)
        if self.task_activation[adapter_name] == "relu":
            task = F.relu(task)
        return self.lora_B[adapter_name](skill * task) * self.scaling[adapter_name]
