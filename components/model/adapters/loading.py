"""PEFT's plain loading path, made to rebuild duet adapters instead of an ordinary LoRA.

`PeftModel.from_pretrained(base, path)` without `config=`, and `peft_model.load_adapter(path, name)`,
read adapter_config.json with `LoraConfig.from_pretrained` (PEFT maps the saved `peft_type: LORA` to
`LoraConfig`). That builds a plain `LoraConfig` and drops the fields it does not know, so a Dual-LoRA
folder would come back as an untrained plain LoRA, and a MoE-LoRA folder as a plain LoRA that loads
the experts' A and B but not the router: a different model, with only a warning about "a newer PEFT".

PEFT has no registry for LoRA sub-methods, so importing this package (its `__init__` calls `install`)
wraps that one public classmethod: a local folder whose config names an `adapter_method` is rebuilt
with that method's config class (an unknown method is refused by name); every other folder, and every
call on another class, goes to PEFT's own loader unchanged. Folders on the Hub are not read here:
load them with `components.model.adapters.apply.load_adapter` after downloading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import LoraConfig

from components.model.adapters.base import CONFIG_FILE

_peft_from_pretrained = LoraConfig.from_pretrained.__func__


def _saved_config(path: str | Path, subfolder: str | None) -> tuple[dict, Path] | None:
    """The saved config of a local adapter folder, or None where it is not a local folder."""
    file = Path(path) / (subfolder or "") / CONFIG_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text()), file


def _from_pretrained(
    cls: type[LoraConfig], pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
) -> LoraConfig:
    """`LoraConfig.from_pretrained`, but a folder saved from a duet method gives that method's config."""
    if cls is LoraConfig:
        found = _saved_config(pretrained_model_name_or_path, subfolder)
        if found is not None and found[0].get("adapter_method") is not None:
            from components.model.adapters.apply import config_class_for

            saved, file = found
            # PEFT's own kwargs here are Hub-download options and runtime flags; the saved file wins
            # over config fields in PEFT's loader too, so the local rebuild needs none of them.
            return config_class_for(saved, str(file)).from_pretrained(
                str(pretrained_model_name_or_path), subfolder=subfolder
            )
    return _peft_from_pretrained(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def install() -> None:
    """Route `LoraConfig.from_pretrained` through `_from_pretrained` (idempotent)."""
    if LoraConfig.from_pretrained.__func__ is not _from_pretrained:
        LoraConfig.from_pretrained = classmethod(_from_pretrained)
