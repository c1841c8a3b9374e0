"""The stage-artifact format: what a finished stage writes, how it is checked, and how it loads back.

    {storage}/{run}/{stage}/artifact/
      vce_projector.safetensors   VCE + projector weights (safetensors: loading never unpickles)
      adapter/                    the LLM adapter in PEFT's format (stage 2)
      config.yaml                 the resolved config the stage ran with
      artifact.json               stage, model and VCE signature, data digest, the MLflow run that
                                  wrote it, size and sha256 of each weight file; written last

Stage 2 refuses a stage-1 artifact from another model or VCE config, naming the difference, and a
damaged one, naming the file. Artifacts written before `run_id` and `files` existed still load.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file
from torch import nn

from components import storage
from components.checksums import file_records, mismatches
from components.config import DuetConfig, StorageSection, dump_config
from components.errors import ArtifactError
from components.model.adapters.apply import is_adapter_param, load_adapter
from components.model.families import FAMILIES, Family, family_of
from components.model.families.llava import LLAVA
from components.model.llava import attach_vce, configured_family, load_base_model, projector_module

ARTIFACT_WEIGHTS = "vce_projector.safetensors"


ARTIFACT_ADAPTER = "adapter"


ARTIFACT_META = "artifact.json"


ARTIFACT_CONFIG = "config.yaml"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors only, keyed by their full names (what checkpoints hold)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def artifact_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What a stage artifact holds: the trainable parameters plus the projector and VCE, which the artifact
    carries even when stage 2 keeps them frozen (stage2.trainable: adapter_only)."""
    prefix = _projector_prefix(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad or n.startswith(prefix)]


def artifact_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `artifact_parameters`, keyed by their full names."""
    return {n: p.detach().cpu().contiguous() for n, p in artifact_parameters(model)}


@dataclass(frozen=True)
class ArtifactMeta:
    """What a stage artifact was trained with: checked before stage 2 builds on it.

    `run_id` is the MLflow run that wrote it (lineage for a stage given by URI), `files` the size and
    sha256 of each file beside artifact.json (a damaged or incomplete copy is refused). Artifacts
    written before these fields existed load with them empty.
    """

    stage: int
    model_signature: dict[str, Any]
    vce_signature: dict[str, Any]
    data_digest: str | None
    adapter_type: str | None
    run_id: str | None = None
    files: dict[str, dict[str, Any]] | None = None

    @staticmethod
    def from_dict(raw: Any, where: str = ARTIFACT_META) -> ArtifactMeta:
        """Validate a parsed artifact.json; an ArtifactError names the file and the field."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where} must hold a JSON object, got {type(raw).__name__}: the artifact is damaged")
        kinds: dict[str, tuple[type, ...]] = {
            "stage": (int,), "model_signature": (dict,), "vce_signature": (dict,), "data_digest": (str, type(None)),
            "adapter_type": (str, type(None)), "run_id": (str, type(None)), "files": (dict, type(None)),
        }
        required = ("stage", "model_signature", "vce_signature")
        for name, allowed in kinds.items():
            if name not in raw and name in required:
                raise ArtifactError(f"{where} has no {name!r}: it was not written by a finished duet stage")
            value = raw.get(name)
            if not isinstance(value, allowed) or isinstance(value, bool):
                raise ArtifactError(f"{where}: {name!r} is {value!r:.80}, which is not a {allowed[0].__name__}")
        if raw["stage"] not in (1, 2):
            raise ArtifactError(f"{where}: 'stage' is {raw['stage']!r}; a stage artifact is from stage 1 or 2")
        return ArtifactMeta(**{k: raw.get(k) for k in ArtifactMeta.__dataclass_fields__})


def model_signature(cfg: DuetConfig) -> dict[str, Any]:
    return {"arch": cfg.model.arch, "checkpoint": cfg.model.checkpoint}


def artifact_family(meta: ArtifactMeta) -> str:
    """The model family an artifact was trained on (artifacts from before families were recorded: LLaVA)."""
    return str(meta.model_signature.get("family", LLAVA.name))


def vce_signature(cfg: DuetConfig) -> dict[str, Any]:
    """What VCE's weights depend on: not the sampler, which holds none."""
    return cfg.vce.model_dump(mode="json", exclude={"sampler"})


def save_stage_artifact(
    model: nn.Module, cfg: DuetConfig, stage: int, uri: str, data_digest: str | None,
    state: dict[str, torch.Tensor] | None = None, run_id: str | None = None,
) -> str:
    """Write the stable stage layout: VCE + projector safetensors, PEFT adapter, resolved config, meta.

    `state` may carry already-gathered weights (ZeRO-3, `artifact_state_dict`); by default they are read from
    `model`.
    artifact.json is written last, so a folder with one is complete.
    """
    prefix = _projector_prefix(model)
    full_state = state if state is not None else artifact_state_dict(model)
    bridge = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
    if not bridge:
        raise RuntimeError("no projector/VCE weights to save: were they gathered from all ranks?")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_file(bridge, str(out / ARTIFACT_WEIGHTS))
        if stage == 2 and hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
            adapter_state = {k: v for k, v in full_state.items() if is_adapter_param(k)}
            model.save_pretrained(str(out / ARTIFACT_ADAPTER), state_dict=adapter_state or None)
        (out / ARTIFACT_CONFIG).write_text(dump_config(cfg))
        meta = ArtifactMeta(
            stage=stage, model_signature={**model_signature(cfg), "family": family_of(model).name},
            vce_signature=vce_signature(cfg),
            data_digest=data_digest, adapter_type=cfg.adapter.type if stage == 2 else None, run_id=run_id,
            files=file_records(out, skip=[ARTIFACT_CONFIG]),  # a package replaces config.yaml with a redacted copy
        )
        storage.copy_dir(str(out), uri, cfg.storage)
        storage.write_text(storage.join(uri, ARTIFACT_META), json.dumps(meta.__dict__, indent=2, sort_keys=True),
                           cfg.storage)
    return uri


def artifact_identity(uri: str, storage_cfg: StorageSection | None = None) -> str:
    """What tells one written artifact from another at the same URI: the digest of its artifact.json, which
    holds the run that wrote it and every file's sha256. Steps that build on an artifact hash this, never
    its path, which a retrained stage writes to again."""
    try:
        meta = storage.read_bytes(storage.join(uri, ARTIFACT_META), storage_cfg)
    except FileNotFoundError:
        raise ArtifactError(f"no stage artifact at {uri} (no {ARTIFACT_META}): was its stage finished?") from None
    return hashlib.sha256(meta).hexdigest()[:16]


def read_artifact_meta(uri: str, storage_cfg: StorageSection | None = None) -> ArtifactMeta:
    """The validated artifact.json of a stage artifact; an ArtifactError names the path when it is not one."""
    meta_uri = storage.join(uri, ARTIFACT_META)
    try:
        text = storage.read_text(meta_uri, storage_cfg)
    except FileNotFoundError:
        if not storage.exists(uri, storage_cfg):
            raise ArtifactError(f"no stage artifact at {uri}: nothing is there (check the path or URI)") from None
        raise ArtifactError(
            f"{uri} is not a stage artifact: it has no {ARTIFACT_META} (a finished stage writes one; "
            "point at {storage}/{run}/stage1/artifact or stage2/artifact)"
        ) from None
    except (IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{meta_uri} cannot be read ({type(exc).__name__}): the artifact is damaged") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ArtifactError(f"{meta_uri} is not valid JSON ({exc}): the artifact is damaged; re-run the stage "
                            "that wrote it") from None
    return ArtifactMeta.from_dict(raw, meta_uri)


def check_family_matches(meta: ArtifactMeta, family: Family, uri: str) -> None:
    """Refuse weights of an artifact trained on another family than the base's."""
    trained = artifact_family(meta)
    if trained != family.name:
        label = FAMILIES[trained].label if trained in FAMILIES else trained
        raise ArtifactError(
            f"stage-{meta.stage} artifact {uri!r} was trained on a {label} base, but this config's base is "
            f"{family.label} ({family.name}): its VCE and projector weights fit that family only; train stage 1 "
            "on this base, or set model.checkpoint to the artifact's base"
        )


def check_compatible(cfg: DuetConfig, uri: str, stage: int | None = None) -> ArtifactMeta:
    """Refuse an artifact trained with another model or VCE config (or from the wrong stage), naming the difference."""
    meta = read_artifact_meta(uri, cfg.storage)
    if stage is not None and meta.stage != stage:
        raise ArtifactError(f"{uri} is a stage-{meta.stage} artifact, not stage {stage}")
    check_family_matches(meta, configured_family(cfg), uri)
    diffs = [
        f"model.{k}: artifact {meta.model_signature.get(k)!r} != config {v!r}"
        for k, v in model_signature(cfg).items() if meta.model_signature.get(k) != v
    ] + [
        f"vce.{k}: artifact {meta.vce_signature.get(k)!r} != config {v!r}"
        for k, v in vce_signature(cfg).items() if meta.vce_signature.get(k) != v
    ]
    if diffs:
        raise ArtifactError(f"stage-{meta.stage} artifact {uri!r} does not match this config:\n  " + "\n  ".join(diffs))
    return meta


def local_artifact(uri: str, storage_cfg: StorageSection | None = None) -> tuple[Path, ArtifactMeta]:
    """A stage artifact as a local folder (a remote one is downloaded once per machine), checked against
    the sizes and checksums its artifact.json records."""
    meta = read_artifact_meta(uri, storage_cfg)
    folder = Path(storage.resolve(uri)[1]) if not storage.is_remote(uri) else storage.local_copy(
        uri, storage_cfg, kind="artifacts")
    problems = mismatches(folder, meta.files or {})
    if problems:
        raise ArtifactError(
            f"stage artifact {uri} is damaged or incomplete ({'; '.join(problems)}; artifact.json records every "
            "file's size and sha256): re-run the stage that wrote it, or restore the folder from a good copy"
        )
    return folder, meta


def _projector_prefix(model: nn.Module) -> str:
    target = projector_module(model)
    for name, module in model.named_modules():
        if module is target:
            return name + "."
    raise RuntimeError("projector not found among the model's modules")


def load_projector_weights(model: nn.Module, folder: str | Path, where: str) -> None:
    """Load VCE + projector weights (safetensors: no pickle) from a local artifact folder into `model`."""
    weights = load((Path(folder) / ARTIFACT_WEIGHTS).read_bytes())  # read first: a bad file fails as itself
    _fill_bridge(projector_module(model), weights, where)


def load_bridge_weights(bridge: nn.Module, folder: str | Path, where: str) -> None:
    """Load VCE + projector weights from a local artifact folder into the bridge module itself
    (a VCEProjector, or the plain projector when VCE is off)."""
    _fill_bridge(bridge, load((Path(folder) / ARTIFACT_WEIGHTS).read_bytes()), where)


def _fill_bridge(bridge: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = bridge.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"stage artifact {where!r} does not fit this model's projector/VCE: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it trained with another vce/model config?)"
        )


def load_stage_model(cfg: DuetConfig, uri: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A ready-to-use model from a stage artifact: base + VCE/projector weights (+ adapter for stage 2)."""
    folder, meta = local_artifact(uri, cfg.storage)
    model = attach_vce(load_base_model(cfg, dtype), cfg.vce)
    check_family_matches(meta, family_of(model), uri)
    load_projector_weights(model, folder, uri)
    if meta.stage == 2 and (folder / ARTIFACT_ADAPTER / "adapter_config.json").is_file():
        model = load_adapter(model, str(folder / ARTIFACT_ADAPTER))
    model.eval()
    return model
