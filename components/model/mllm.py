"""LLaVA assembly: base checkpoint + VCE in front of the projector + the LLM adapter.

VCE plugs into Hugging Face's own image path: the model's `vision_feature_layer`
becomes the list [anchor, references...], so `get_image_features` hands the
projector those maps concatenated on the feature axis (CLS dropped), and the
projector is replaced by `VCEProjector`, which splits them, runs VCE and then the
original two-layer MLP. Generation, caching and the image-token merge stay
transformers' code.

Stage trainable sets (paper section 3.5): stage 1 trains {projector, VCE};
stage 2 adds the adapter. The vision tower and the LLM weights stay frozen.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from components import storage
from components.config import PipelineConfig, StageConfig, StorageConfig, VCEConfig, dump_config
from components.errors import ArtifactError
from components.model.adapters import apply_adapter, is_adapter_param, load_adapter
from components.model.vce import VisualCueEnhancer

ARTIFACT_WEIGHTS = "vce_projector.safetensors"
ARTIFACT_ADAPTER = "adapter"
ARTIFACT_META = "artifact.json"
ARTIFACT_CONFIG = "config.yaml"


class VCEProjector(nn.Module):
    """VCE (paper eq. 7) followed by LLaVA's projector (eq. 8), fed the concatenated selected maps.

    Input: [B, N, d * (1 + R)] = anchor map then R reference maps, as HF's
    `get_image_features` concatenates them for a list-valued `vision_feature_layer`.
    """

    def __init__(self, vce: VisualCueEnhancer, projector: nn.Module, dim: int, vce_cfg: VCEConfig):
        super().__init__()
        self.vce = vce
        self.projector = projector
        self.dim = dim
        self.include_anchor_level = vce_cfg.include_anchor_level
        self.num_references = len(vce_cfg.reference_layers)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        maps = image_features.split(self.dim, dim=-1)
        if len(maps) != 1 + self.num_references:
            raise ValueError(
                f"VCEProjector expected {1 + self.num_references} feature maps of width {self.dim}, got "
                f"{len(maps)}: the model's vision_feature_layer does not match vce.reference_layers"
            )
        anchor, references = maps[0], list(maps[1:])
        if self.include_anchor_level:
            references = [anchor, *references]
        side = math.isqrt(anchor.shape[1])
        if side * side != anchor.shape[1]:
            raise ValueError(f"VCE needs a square patch grid from CLIP, got {anchor.shape[1]} patches")
        enhanced = self.vce(anchor, references, (side, side))
        return self.projector(enhanced)


def llava_15_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336 + Vicuna-7B), as published with llava-hf's checkpoint."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=32001, tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- locating parts


def llava_core(model: nn.Module) -> nn.Module:
    """The inner `LlavaModel` (vision tower, projector, LM) under any PEFT wrapping."""
    for module in model.modules():
        if hasattr(module, "multi_modal_projector") and hasattr(module, "vision_tower"):
            return module
    raise TypeError(f"{type(model).__name__} is not a LLaVA model (no vision_tower/multi_modal_projector)")


def projector_module(model: nn.Module) -> nn.Module:
    """The trainable vision-to-language bridge: VCEProjector (or the plain projector when VCE is off)."""
    return llava_core(model).multi_modal_projector


# ---------------------------------------------------------------- building


def local_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A local directory for a checkpoint URI (an object-store checkpoint is downloaded once per machine)."""
    if not storage.is_remote(uri):
        path = storage.resolve(uri)[1]
        if not (Path(path) / "config.json").is_file():
            raise ArtifactError(
                f"model.checkpoint {uri!r} has no config.json: point it at a LlavaForConditionalGeneration "
                "checkpoint directory (save_pretrained layout)"
            )
        return path
    try:
        local = storage.local_copy(uri, storage_cfg, kind="checkpoints")
    except FileNotFoundError:
        raise ArtifactError(f"model.checkpoint {uri!r}: nothing is stored there (check the URI)") from None
    if not (local / "config.json").is_file():
        raise ArtifactError(f"model.checkpoint {uri!r} has no config.json: it is not a save_pretrained checkpoint")
    return str(local)


def load_base_model(cfg: PipelineConfig, dtype: torch.dtype | None = None) -> LlavaForConditionalGeneration:
    """The pretrained LLaVA from `model.checkpoint` (a local path or object-store URI)."""
    if not cfg.model.checkpoint:
        raise ValueError(
            "model.checkpoint is not set: give the LLaVA checkpoint directory or URI "
            "(the demo builds a tiny one: see pipelines/full.py)"
        )
    path = local_checkpoint(cfg.model.checkpoint, cfg.storage)
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)


def attach_vce(model: LlavaForConditionalGeneration, vce_cfg: VCEConfig) -> LlavaForConditionalGeneration:
    """Wrap the projector with VCE and make the vision path hand it the anchor and reference maps."""
    if not vce_cfg.enabled:
        return model
    core = llava_core(model)
    if isinstance(core.multi_modal_projector, VCEProjector):
        return model
    dim = model.config.vision_config.hidden_size
    layers = [vce_cfg.anchor_layer, *vce_cfg.reference_layers]
    model.config.vision_feature_layer = layers
    vce = VisualCueEnhancer.from_config(vce_cfg, dim)
    device = next(core.multi_modal_projector.parameters()).device
    vce.to(device=device, dtype=next(core.multi_modal_projector.parameters()).dtype)
    core.multi_modal_projector = VCEProjector(vce, core.multi_modal_projector, dim, vce_cfg)
    return model


def set_trainable(model: nn.Module, stage: int) -> None:
    """Freeze everything, then unfreeze the stage's set: projector + VCE, plus the adapter in stage 2."""
    for name, param in model.named_parameters():
        param.requires_grad = stage == 2 and is_adapter_param(name)
    for param in projector_module(model).parameters():
        param.requires_grad = True


def build_model(cfg: PipelineConfig, stage: int, stage1_artifact: str | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """The model for one stage: base + VCE (+ stage-1 weights and the adapter in stage 2)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    model = attach_vce(load_base_model(cfg, dtype), cfg.vce)
    if stage == 2:
        if stage1_artifact is not None:
            folder, _ = local_artifact(stage1_artifact, cfg.storage)
            load_projector_weights(model, folder, stage1_artifact)
        model = apply_adapter(model, cfg.adapter)
    set_trainable(model, stage)
    if cfg.model.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inner.enable_input_require_grads()
    return model


def build_meta_model(cfg: PipelineConfig, stage: int = 2) -> nn.Module:
    """The configured architecture with adapter and VCE on the `meta` device: sizes without weights."""
    if cfg.model.arch == "llava-1.5-7b":
        config = llava_15_7b_config()
    elif cfg.model.arch == "checkpoint":
        config = LlavaConfig.from_pretrained(local_checkpoint(cfg.model.checkpoint or "", cfg.storage))
    else:
        if not cfg.model.checkpoint:
            raise ValueError("model.arch 'tiny' needs model.checkpoint for its tokenizer size; use the demo config")
        config = LlavaConfig.from_pretrained(local_checkpoint(cfg.model.checkpoint, cfg.storage))
    with torch.device("meta"):
        model = attach_vce(LlavaForConditionalGeneration(config), cfg.vce)
        if stage == 2:
            model = apply_adapter(model, cfg.adapter)
    set_trainable(model, stage)
    return model


# ---------------------------------------------------------------- optimizer groups


def parameter_groups(model: nn.Module, stage_cfg: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups: adapter at `adapter_lr`, projector + VCE at `lr` (paper section 4.1)."""
    adapter, bridge = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (adapter if is_adapter_param(name) else bridge).append(param)
    groups = [{"name": "projector_vce", "params": bridge, "lr": stage_cfg.lr, "weight_decay": stage_cfg.weight_decay}]
    if adapter:
        if stage_cfg.adapter_lr is None:
            raise ValueError(f"{stage_cfg.name}.adapter_lr is required when an adapter is trained (e.g. 2e-4)")
        groups.append(
            {"name": "adapter", "params": adapter, "lr": stage_cfg.adapter_lr, "weight_decay": stage_cfg.weight_decay}
        )
    return groups


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors only, keyed by their full names (what checkpoints hold)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- stage artifacts


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


def model_signature(cfg: PipelineConfig) -> dict[str, Any]:
    return {"arch": cfg.model.arch, "checkpoint": cfg.model.checkpoint}


def vce_signature(cfg: PipelineConfig) -> dict[str, Any]:
    return cfg.vce.model_dump(mode="json")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the weight and adapter files under `folder`, by relative path.

    config.yaml describes the run and is left out: a package replaces it with a redacted copy.
    """
    return {
        file.relative_to(folder).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ARTIFACT_CONFIG)
    }


def save_stage_artifact(
    model: nn.Module, cfg: PipelineConfig, stage: int, uri: str, data_digest: str | None,
    state: dict[str, torch.Tensor] | None = None, run_id: str | None = None,
) -> str:
    """Write the stable stage layout: VCE + projector safetensors, PEFT adapter, resolved config, meta.

    `state` may carry already-gathered trainable weights (ZeRO-3); by default they are read from `model`.
    artifact.json is written last, so a folder with one is complete.
    """
    prefix = _projector_prefix(model)
    full_state = state if state is not None else trainable_state_dict(model)
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
            stage=stage, model_signature=model_signature(cfg), vce_signature=vce_signature(cfg),
            data_digest=data_digest, adapter_type=cfg.adapter.type if stage == 2 else None, run_id=run_id,
            files=_file_records(out),
        )
        storage.copy_dir(str(out), uri, cfg.storage)
        storage.write_text(storage.join(uri, ARTIFACT_META), json.dumps(meta.__dict__, indent=2, sort_keys=True),
                           cfg.storage)
    return uri


def read_artifact_meta(uri: str, storage_cfg: StorageConfig | None = None) -> ArtifactMeta:
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


def check_compatible(cfg: PipelineConfig, uri: str, stage: int | None = None) -> ArtifactMeta:
    """Refuse an artifact trained with another model or VCE config (or from the wrong stage), naming the difference."""
    meta = read_artifact_meta(uri, cfg.storage)
    if stage is not None and meta.stage != stage:
        raise ArtifactError(f"{uri} is a stage-{meta.stage} artifact, not stage {stage}")
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


def local_artifact(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[Path, ArtifactMeta]:
    """A stage artifact as a local folder (a remote one is downloaded once per machine), checked against
    the sizes and checksums its artifact.json records."""
    meta = read_artifact_meta(uri, storage_cfg)
    folder = Path(storage.resolve(uri)[1]) if not storage.is_remote(uri) else storage.local_copy(
        uri, storage_cfg, kind="artifacts")
    for rel, record in (meta.files or {}).items():
        file = folder / rel
        if not file.is_file():
            raise ArtifactError(f"stage artifact {uri}: {rel} is missing (artifact.json lists it); re-run the stage")
        if file.stat().st_size != record.get("size") or _sha256(file) != record.get("sha256"):
            raise ArtifactError(
                f"stage artifact {uri}: {rel} does not match the checksum artifact.json records (damaged or "
                "partly overwritten); re-run the stage that wrote it"
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
    weights = load((Path(folder) / ARTIFACT_WEIGHTS).read_bytes())
    missing, unexpected = projector_module(model).load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"stage artifact {where!r} does not fit this model's projector/VCE: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it trained with another vce/model config?)"
        )


def load_stage_model(cfg: PipelineConfig, uri: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A ready-to-use model from a stage artifact: base + VCE/projector weights (+ adapter for stage 2)."""
    folder, meta = local_artifact(uri, cfg.storage)
    model = attach_vce(load_base_model(cfg, dtype), cfg.vce)
    load_projector_weights(model, folder, uri)
    if meta.stage == 2 and (folder / ARTIFACT_ADAPTER / "adapter_config.json").is_file():
        model = load_adapter(model, str(folder / ARTIFACT_ADAPTER))
    model.eval()
    return model


def iter_component_params(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(component, name, param) for vision_tower, vce, projector, language_model and adapter."""
    core = llava_core(model)
    vision = {id(p) for p in core.vision_tower.parameters()}
    bridge = projector_module(model)
    vce = {id(p) for p in bridge.vce.parameters()} if isinstance(bridge, VCEProjector) else set()
    proj = {id(p) for p in bridge.parameters()} - vce
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            component = "adapter"
        elif id(param) in vision:
            component = "vision_tower"
        elif id(param) in vce:
            component = "vce"
        elif id(param) in proj:
            component = "projector"
        else:
            component = "language_model"
        yield component, name, param


COMPONENTS = ("vision_tower", "vce", "projector", "language_model", "adapter")


def component_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per component: parameter count, whether any of it trains, and its size in fp16 MiB."""
    sizes: dict[str, dict[str, Any]] = {c: {"params": 0, "trainable": False} for c in COMPONENTS}
    seen: set[int] = set()
    for component, _, param in iter_component_params(model):
        if id(param) in seen:
            continue
        seen.add(id(param))
        sizes[component]["params"] += param.numel()
        sizes[component]["trainable"] |= param.requires_grad
    for row in sizes.values():
        row["mib_fp16"] = round(row["params"] * 2 / 2**20, 2)
    return sizes
