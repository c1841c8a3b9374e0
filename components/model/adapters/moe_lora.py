"""Mixture-of-LoRA-experts baselines of the paper's Table 1, as PEFT custom LoRA layers.

Three routing styles over E LoRA experts (B_e A_e) on the same frozen nn.Linear W:

* sparse top-k  — LLaVA-MoLE (Chen, Jie, Ma 2024, "LLaVA-MoLE: Sparse Mixture of LoRA Experts
  for Mitigating Data Conflicts in Instruction Finetuning MLLMs", arXiv:2401.16160; paper ref [4]):
  a linear router per token, softmax over the k largest logits, the other experts get 0.
* dense softmax — MoLE (Wu, Huang, Wei 2024, "Mixture of LoRA Experts", arXiv:2404.13628; paper
  ref [27]): every expert weighted by a softmax over the router logits.
* rectified     — RoDE (Jiao et al. 2024, "RoDE: Linear Rectified Mixture of Diverse Experts for
  Food Large Multi-Modal Models", arXiv:2407.12730; paper ref [10]): heterogeneous expert ranks
  (default [32, 16, 8, 8]) gated by ReLU(router logits), no top-k, no normalisation.

All experts are evaluated at once, exactly: with the experts' A stacked into A_cat (R x d_in,
R = sum of ranks) and their B side by side in B_cat (d_out x R),

    sum_e g_e B_e A_e x = B_cat( expand(g) * (A_cat x) ),

where expand(g) repeats each expert's gate over its rank slots. That is two GEMMs per layer (the
router rides along in the first when dropout is off) and no per-token or per-expert matmul loop.

Scaling convention: every expert uses alpha / R (alpha / sqrt(R) with rsLoRA), R the total rank.
The experts together are one rank-R LoRA sliced into blocks, so at the same alpha a 4 x 16 mixture
has the same scale as the rank-64 LoRA and Dual-LoRA it is compared against in Table 1 (a per-expert
alpha / r_e would silently make the experts E times stronger).

Init: A kaiming-uniform (like LoRA's A), B = 0, so step 0 equals the base model whatever the router
does; the router starts at nn.Linear's default uniform init (a zero router would leave ReLU gates
dead forever and make top-k ties arbitrary). No load-balancing loss is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from components.model.adapters.base import CustomLoraConfig, InputDependentLoraLayer

ROUTINGS = ("topk", "softmax", "relu")


# ---------------------------------------------------------------- configs


@dataclass
class MixtureLoraConfig(CustomLoraConfig):
    """Shared fields of the mixture baselines; use one of the three concrete subclasses.

    `r` is set to the total rank sum(expert_ranks): it is what the scaling divides by.
    """

    ROUTING: ClassVar[str] = ""
    expert_ranks: list[int] = field(
        default_factory=lambda: [16, 16, 16, 16], metadata={"help": "Rank per expert."}
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.ROUTING not in ROUTINGS:
            raise TypeError(
                f"{name} is abstract; use MoeLoraTopkConfig, MoeLoraSoftmaxConfig or RodeLoraConfig"
            )
        ranks = list(self.expert_ranks or [])
        if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r <= 0 for r in ranks):
            raise ValueError(
                f"{name}.expert_ranks must be a non-empty list of positive ints, got {self.expert_ranks!r}"
            )
        self.expert_ranks = ranks
        self.r = sum(ranks)
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError(
                f"{name} does not support rank_pattern/alpha_pattern; set expert_ranks and lora_alpha"
            )
        super().__post_init__()

    @property
    def num_experts(self) -> int:
        return len(self.expert_ranks)


@dataclass
class MoeLoraTopkConfig(MixtureLoraConfig):
    """Sparse MoE-LoRA (LLaVA-MoLE style): softmax over the top_k router logits per token."""

    METHOD: ClassVar[str] = "moe_lora_topk"
    ROUTING: ClassVar[str] = "topk"
    adapter_method: str = field(
        default="moe_lora_topk", metadata={"help": "Which custom LoRA method this is."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts used per token."})

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(self.expert_ranks or []):
            raise ValueError(
                f"MoeLoraTopkConfig.top_k must be between 1 and the number of experts "
                f"({len(self.expert_ranks or [])}), got {self.top_k!r}"
            )
        super().__post_init__()

    def layer_class(self) -> type[nn.Module]:
        return MoeLoraTopkLinear


@dataclass
class MoeLoraSoftmaxConfig(MixtureLoraConfig):
    """Dense MoE-LoRA (MoLE style): all experts weighted by a per-token softmax."""

    METHOD: ClassVar[str] = "moe_lora_softmax"
    ROUTING: ClassVar[str] = "softmax"
    adapter_method: str = field(
        default="moe_lora_softmax", metadata={"help": "Which custom LoRA method this is."}
    )

    def layer_class(self) -> type[nn.Module]:
        return MoeLoraSoftmaxLinear


@dataclass
class RodeLoraConfig(MixtureLoraConfig):
    """RoDE-style rectified mixture: heterogeneous ranks, ReLU gates."""

    METHOD: ClassVar[str] = "rode"
    ROUTING: ClassVar[str] = "relu"
    adapter_method: str = field(default="rode", metadata={"help": "Which custom LoRA method this is."})
    expert_ranks: list[int] = field(
        default_factory=lambda: [32, 16, 8, 8], metadata={"help": "Rank per expert."}
    )

    def layer_class(self) -> type[nn.Module]:
        return RodeLoraLinear


# ---------------------------------------------------------------- gates


def route(logits: torch.Tensor, routing: str, top_k: int | None = None) -> torch.Tensor:
    """Per-expert gates (..., E) from router logits (..., E) for one routing style."""
    if routing == "softmax":
        return logits.softmax(dim=-1)
    if routing == "relu":
        return F.relu(logits)
    if routing == "topk":
        chosen, index = logits.topk(top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, chosen.softmax(dim=-1))
    raise ValueError(f"routing must be one of {list(ROUTINGS)}, got {routing!r}")


def expand_gates(gates: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
    """Repeat each expert's gate over its rank slots: (..., E) -> (..., sum(ranks))."""
    if len(set(ranks)) == 1:
        return gates.unsqueeze(-1).expand(*gates.shape, ranks[0]).flatten(-2)
    return torch.cat(
        [gates[..., e : e + 1].expand(*gates.shape[:-1], r) for e, r in enumerate(ranks)], dim=-1
    )


# ---------------------------------------------------------------- layers


class MixtureLoraLinear(InputDependentLoraLayer):
    """nn.Linear + a mixture of LoRA experts. Per adapter: lora_A (R x d_in, experts stacked),
    lora_B (d_out x R), lora_router (E x d_in)."""

    label = "mixture-of-LoRA-experts"
    adapter_layer_names = ("lora_A", "lora_B", "lora_router")
    other_param_names = InputDependentLoraLayer.other_param_names + ("expert_ranks", "routing", "top_k")

    def _init_containers(self) -> None:
        self.lora_router = nn.ModuleDict()
        self.expert_ranks: dict[str, tuple[int, ...]] = {}
        self.routing: dict[str, str] = {}
        self.top_k: dict[str, int | None] = {}

    def _rank(self, config: MixtureLoraConfig, r: int) -> int:
        return sum(config.expert_ranks)

    def _create_adapter(self, adapter_name: str, r: int, config: MixtureLoraConfig) -> None:
        self.expert_ranks[adapter_name] = tuple(config.expert_ranks)
        self.routing[adapter_name] = config.ROUTING
        self.top_k[adapter_name] = getattr(config, "top_k", None)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.lora_router[adapter_name] = nn.Linear(self.in_features, config.num_experts, bias=False)
        # Each expert's A block gets its own fan-in init, exactly as a separate LoRA's A would.
        for block in self.lora_A[adapter_name].weight.data.split(config.expert_ranks, dim=0):
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_B[adapter_name].weight)

    def _project(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat dropout(x), router logits); one GEMM on [A_cat; W_router] when dropout is inactive."""
        a_layer, router = self.lora_A[adapter_name], self.lora_router[adapter_name]
        if self._fusable(adapter_name, a_layer.weight, router.weight):
            both = F.linear(x, self._stacked(adapter_name, a_layer.weight, router.weight))
            return both.split([self.r[adapter_name], router.out_features], dim=-1)
        return a_layer(self.lora_dropout[adapter_name](x)), router(x)

    def gates(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert gates (..., E) for input `x` (exposed for analysis and tests)."""
        logits = self.lora_router[adapter_name](self._cast_input_dtype(x, self._adapter_dtype(adapter_name)))
        return route(logits, self.routing[adapter_name], self.top_k[adapter_name])

    def _adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        hidden, logits = self._project(adapter_name, x)
        gates = route(logits, self.routing[adapter_name], self.top_k[adapter_name])
        hidden = hidden * expand_gates(gates, self.expert_ranks[adapter_name])
        return self.lora_B[adapter_name](hidden) * self.scaling[adapter_name]


class MoeLoraTopkLinear(MixtureLoraLinear):
    config_class = MoeLoraTopkConfig
    label = "MoE-LoRA (top-k)"


class MoeLoraSoftmaxLinear(MixtureLoraLinear):
    config_class = MoeLoraSoftmaxConfig
    label = "MoE-LoRA (softmax)"


class RodeLoraLinear(MixtureLoraLinear):
    config_class = RodeLoraConfig
    label = "RoDE"
