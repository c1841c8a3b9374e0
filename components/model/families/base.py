"""What a model family tells duet: its classes, where the vision tower and the bridge are, what VCE reads.

A family is one `AutoModelForImageTextToText` architecture of transformers. Everything duet does
to a base goes through this interface: VCE is attached in front of the family's bridge from the
vision tower to the language model (LLaVA's projector, Qwen2.5-VL's patch merger), stage 1 trains
that bridge, and the adapter goes on the language model's linear layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from components.config import VCESection


@dataclass(frozen=True)
class Family(ABC):
    """One model family. Subclasses say where VCE sits; the fields say what it is called and built from."""

    name: str  # the model.family value, and the checkpoint's config.json model_type
    label: str  # for people: "LLaVA-NeXT"
    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    trains: bool  # whether the data path (processor, chat template, image tokens) is built for it yet
    vce_site: str  # the module VCE sits in front of, as the inspector names it

    def vision_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return config.vision_config

    @abstractmethod
    def vision_layers(self, config: PretrainedConfig) -> int:
        """Number of layers (blocks) of the vision tower: the range VCE's layer indices address."""

    @abstractmethod
    def vision_dim(self, config: PretrainedConfig) -> int:
        """Width of the vision tower's hidden states: the width VCE works at."""

    @abstractmethod
    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The frozen vision encoder (under any PEFT wrapping); may contain the bridge (Qwen's merger)."""

    @abstractmethod
    def bridge(self, model: nn.Module) -> nn.Module:
        """The trainable vision-to-language bridge: VCE + projector once VCE is attached."""

    @abstractmethod
    def attach_vce(self, model: nn.Module, vce_cfg: VCESection) -> nn.Module:
        """Put VCE in front of the bridge (idempotent; `vce.enabled: false` leaves the model as it is)."""

    def check_vce(self, config: PretrainedConfig, vce_cfg: VCESection, where: str = "") -> None:
        """Refuse VCE layers this family's tower does not have (ValueError naming the key)."""
        vce_cfg.check_layers(self.vision_layers(config), where)

    def core(self, model: nn.Module) -> nn.Module:
        """The inner transformers model (vision tower, bridge, LM) under any PEFT or duet wrapping."""
        for module in model.modules():
            if self.is_core(module):
                return module
        raise TypeError(f"{type(model).__name__} is not a {self.label} model")

    @abstractmethod
    def is_core(self, module: nn.Module) -> bool:
        """Whether `module` is this family's inner model (holds its vision tower and bridge)."""
