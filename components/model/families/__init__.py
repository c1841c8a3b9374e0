"""The model families duet builds on, by `model.family` name and by a checkpoint's config.json.

| family          | transformers class                         | VCE sits in front of      |
| llava           | LlavaForConditionalGeneration              | multi_modal_projector     |
| llava_next      | LlavaNextForConditionalGeneration          | multi_modal_projector     |
| llava_onevision | LlavaOnevisionForConditionalGeneration     | multi_modal_projector     |
| qwen2_5_vl      | Qwen2_5_VLForConditionalGeneration         | visual.merger             |
"""

from __future__ import annotations

from torch import nn

from components.model.families.base import Family
from components.model.families.llava import LLAVA, LLAVA_NEXT, LLAVA_ONEVISION
from components.model.families.qwen2_5_vl import QWEN2_5_VL

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_5_VL)}

# Checkpoint model types duet recognises but has no family for: what they are, for the message.
UNSUPPORTED = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL", "idefics3": "Idefics3", "paligemma": "PaliGemma"}


def family_named(name: str) -> Family:
    """The family called `name` (a model.family value), or a ValueError listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family {name!r} is not a family duet knows; choose one of {sorted(FAMILIES)}") from None


def family_for_model_type(model_type: object, where: str) -> Family:
    """The family of a checkpoint whose config.json says `model_type` (`where` names the checkpoint)."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    what = UNSUPPORTED.get(str(model_type), f"model_type {model_type!r}")
    raise ValueError(
        f"{where} is a {what} checkpoint (config.json model_type {model_type!r}); duet builds on "
        f"{', '.join(f.label for f in FAMILIES.values())} ({', '.join(FAMILIES)}): convert it, or point "
        "model.checkpoint at a checkpoint of one of those"
    )


def family_of(model: nn.Module) -> Family:
    """The family of a built model (under any PEFT, DeepSpeed or duet wrapping), from its config's model_type."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type in FAMILIES:
            return FAMILIES[model_type]
    for family in FAMILIES.values():  # no config (a bare module): by its parts, as the families lay them out
        if any(family.is_core(module) for module in model.modules()):
            return family
    config = getattr(model, "config", None)
    return family_for_model_type(getattr(config, "model_type", None), f"the model {type(model).__name__}")


__all__ = ["FAMILIES", "Family", "family_for_model_type", "family_named", "family_of"]
