"""One pydantic model tree for the whole pipeline, loaded from YAML plus `--set` overrides.

Every pipeline script validates the complete config here before touching a
cluster, so a typo in a key or an impossible value fails in a second with a
message that names the key, not an hour into a run.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.console import error, say
from components.errors import UsageError

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
# Seeds reach numpy, torch, Ray and Optuna samplers; the narrowest of them (numpy's legacy RandomState) takes 32 bits.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

# Architecture presets whose sizes are known without reading a checkpoint.
# The paper-scale presets of model.arch: their family and their vision tower's depth.
ARCH_FAMILIES = {"llava-1.5-7b": "llava", "llava-next-7b": "llava_next", "llava-onevision-7b": "llava_onevision",
                 "qwen2.5-vl-7b": "qwen2_5_vl"}
VISION_LAYERS_BY_ARCH = {"llava-1.5-7b": 24, "llava-next-7b": 24, "llava-onevision-7b": 26, "qwen2.5-vl-7b": 32}
FamilyName = Literal["auto", "llava", "llava_next", "llava_onevision", "qwen2_5_vl"]


class ConfigError(UsageError, ValueError):
    """A config problem a user can fix: the message names the key and the allowed values."""


class Section(BaseModel):
    """Base for every section: unknown keys are refused instead of silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunSection(Section):
    name: str = Field("duet", min_length=1, description="Stable run name; re-running a name resumes it.")
    seed: Seed = 0
    work_dir: str = Field(".duet", description="Local folder for the embedded defaults (Ray storage, MLflow).")
    wait_for_lock_s: Annotated[float, Field(ge=0)] = Field(
        0.0, description="How long a run waits for another live run of the same name to end (0: refuse at once).")


class StorageSection(Section):
    """Object storage settings; credentials are never here, they come from the environment or IAM."""

    endpoint_url: str | None = Field(None, description="S3 endpoint override, e.g. http://127.0.0.1:9000 (MinIO).")
    region: str | None = None
    retries: Annotated[int, Field(ge=0, le=20)] = 5
    connect_timeout_s: PositiveFloat = 10.0
    request_timeout_s: PositiveFloat = 60.0


class DataSection(Section):
    name: str = Field("synthetic", min_length=1, description="Dataset name; shards go to {root}/{name}/.")
    root: str = Field("datasets", description="URI under which datasets are written and read (relative: under run.work_dir).")
    source: Literal["synthetic", "llava", "unifood"] = "synthetic"
    input: str | None = Field(None, description="LLaVA/UniFood JSON file (its images next to it or in image_root).")
    image_root: str | None = None
    num_records: PositiveInt = 2000
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    seed: Seed = 0
    records_per_shard: PositiveInt = 1000
    image_size: Annotated[int, Field(ge=24)] = Field(
        64, description="Side of the synthetic images in pixels (>= 24: smaller shapes are not drawable)."
    )
    conversation_template: Literal["vicuna_v1", "plain"] = "vicuna_v1"
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    transform_concurrency: PositiveInt = 1
    caption_records: PositiveInt | None = Field(
        None, description="Synthetic: records in the stage-1 'caption' split (default: num_records)."
    )
    caption_input: str | None = Field(
        None, description="LLaVA: optional JSON of caption pairs written whole as the stage-1 'caption' split."
    )
    caption_template: Literal["vicuna_v1", "plain"] = Field(
        "plain", description="Template for records whose task is 'caption' (LLaVA's stage-1 'plain' by default)."
    )
    max_image_pixels: PositiveInt = Field(
        40_000_000, description="Images with more pixels, or whose square padding would have more, are skipped "
                                "as corrupt (decompression-bomb guard)."
    )
    preprocess_num_cpus: PositiveFloat = Field(
        0.5, description="CPUs reserved per shard reader and preprocessing actor (text and image stages)."
    )
    preprocess_batch_size: PositiveInt = Field(32, description="Rows per batch in the image-transform actors.")
    packing: bool = Field(
        False, description="Training: pack each micro-batch's samples several to a row (up to model.max_length), "
                           "each attending only to itself; same samples, losses and steps, less padding."
    )
    io_threads: Annotated[int, Field(ge=1, le=256)] = Field(
        8, description="Parallel image reads while converting LLaVA/UniFood inputs to shards."
    )

    @model_validator(mode="after")
    def _input_for_file_sources(self) -> DataSection:
        if self.source != "synthetic" and not self.input:
            raise ValueError(f"data.source {self.source!r} needs data.input (the JSON file; --input on the CLI)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must leave records for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class TinyModelSection(Section):
    """Sizes of the tiny LLaVA used by tests and the demo (built from config, no download)."""

    vision_hidden: PositiveInt = 64
    vision_layers: PositiveInt = 24
    vision_heads: PositiveInt = 4
    image_size: PositiveInt = 64
    patch_size: PositiveInt = 8
    text_hidden: PositiveInt = 128
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = 4
    text_intermediate: PositiveInt = 256
    vocab_size: PositiveInt = 512
    warmup_steps: Annotated[int, Field(ge=0)] = 200
    vision_warmup_steps: Annotated[int, Field(ge=0)] = 0
    vision_warmup_batch: PositiveInt = 64
    vision_warmup_lr: PositiveFloat = 1e-3
    vision_warmup_shape_weight: PositiveFloat = 1.0
    caption_warmup_steps: Annotated[int, Field(ge=0)] = 0
    caption_warmup_batch: PositiveInt = 16
    caption_warmup_lr: PositiveFloat = 1e-3


class ModelSection(Section):
    arch: Literal["tiny", "llava-1.5-7b", "llava-next-7b", "llava-onevision-7b", "qwen2.5-vl-7b", "checkpoint"] = Field(
        "tiny", description="Architecture: the tiny test model, a paper-scale preset of one family, or read from "
        "model.checkpoint."
    )
    family: FamilyName = Field(
        "auto", description="The base's model family (llava, llava_next, llava_onevision, qwen2_5_vl); auto reads "
        "it from the preset or the checkpoint's config.json model_type, and a stated one must match it.",
    )
    checkpoint: str | None = Field(None, description="Local path or URI of the base checkpoint (save_pretrained layout).")
    tiny: TinyModelSection = TinyModelSection()
    max_length: PositiveInt = 2048
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel of both towers: sdpa (PyTorch's fused attention), eager, or "
        "flash_attention_2 (GPU, needs the flash-attn package).",
    )

    @model_validator(mode="after")
    def _checkpoint_needed(self) -> ModelSection:
        if self.arch == "checkpoint" and not self.checkpoint:
            raise ValueError("model.arch 'checkpoint' needs model.checkpoint (a local path or s3:// URI)")
        preset = ARCH_FAMILIES.get(self.arch, "llava" if self.arch == "tiny" else None)
        if preset is not None and self.family not in ("auto", preset):
            raise ValueError(f"model.family {self.family!r} does not match model.arch {self.arch!r}, a {preset} "
                             f"architecture: set model.family: {preset} (or auto)")
        return self

    def vision_layers(self) -> int | None:
        """Number of vision-tower layers when known without I/O beyond a local config.json."""
        if self.arch == "tiny":
            return self.tiny.vision_layers
        if self.arch in VISION_LAYERS_BY_ARCH:
            return VISION_LAYERS_BY_ARCH[self.arch]
        cfg = Path(self.checkpoint or "") / "config.json"
        try:
            if not cfg.is_file():
                return None
            vision = json.loads(cfg.read_text()).get("vision_config", {})
            layers = vision.get("num_hidden_layers", vision.get("depth"))  # Qwen2.5-VL counts blocks as depth
        except (OSError, ValueError, AttributeError) as exc:  # unreadable path, bad JSON, JSON not an object
            raise ValueError(f"model.checkpoint: cannot read {str(cfg)[:200]!r} ({type(exc).__name__})") from None
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(f"model.checkpoint: {str(cfg)[:200]!r} has vision_config.num_hidden_layers {layers!r:.40}")
        return layers


class VCESection(Section):
    """Visual Cue Enhancement (paper section 3.3): deformable cross-attention over vision layers."""

    enabled: bool = True
    anchor_layer: int = -2
    reference_layers: list[int] = Field(default_factory=lambda: [-8, -14, -20], min_length=1)
    include_anchor_level: bool = Field(
        True,
        description="The anchor's own map is also a level (paper 4.1: layers -2, -8, -14, -20; ~2.89 M params).",
    )
    heads: PositiveInt = 16
    points: PositiveInt = 4
    final_norm: bool = True
    sampler: Literal["pytorch", "deformable_detr"] = Field(
        "pytorch",
        description="How VCE reads its levels: duet's grid_sample reference, or transformers' Deformable DETR "
        "module, which runs a fused CUDA kernel when the kernels package is installed (same weights either way).",
    )

    def check_layers(self, layers: int, where: str = "") -> None:
        """Refuse layer indices outside a vision tower of `layers` layers (ValueError naming the key)."""
        if not self.enabled:
            return
        # hidden_states has layers + 1 entries (embeddings first); index 0 is the embeddings.
        allowed = f"-{layers} .. -1 or 1 .. {layers}"
        for key, index in [("vce.anchor_layer", self.anchor_layer)] + [
            (f"vce.reference_layers[{i}]", v) for i, v in enumerate(self.reference_layers)
        ]:
            if index == 0 or not -layers <= index <= layers:
                raise ValueError(f"{key} = {index} is outside the vision tower ({layers} layers{where}): "
                                 f"allowed {allowed}")


AdapterType = Literal["none", "lora", "dual_lora", "moe_lora_topk", "moe_lora_softmax", "rode"]


class AdapterSection(Section):
    type: AdapterType = "dual_lora"
    r: PositiveInt = 128
    alpha: PositiveFloat = 256.0
    dropout: Dropout = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    skill_norm: bool = True
    task_activation: Literal["relu", "none"] = "relu"
    num_experts: PositiveInt = 4
    expert_rank: PositiveInt = 16
    top_k: PositiveInt = 2
    rode_ranks: list[PositiveInt] = Field(default_factory=lambda: [32, 16, 8, 8], min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not t.strip() for t in value):
            raise ValueError("must name at least one module (e.g. [q_proj, v_proj]) and no empty names")
        return value

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> AdapterSection:
        if self.top_k > self.num_experts:
            raise ValueError(f"adapter.top_k ({self.top_k}) must be <= adapter.num_experts ({self.num_experts})")
        return self


class StageSection(Section):
    """One training stage; the global batch holds for any worker count (accumulation is derived)."""

    name: str = Field(min_length=1)
    lr: PositiveFloat = Field(description="Learning rate of the projector and VCE.")
    adapter_lr: PositiveFloat | None = Field(None, description="Learning rate of the LLM adapter (stage 2).")
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    global_batch: PositiveInt = 128
    micro_batch: PositiveInt = 4
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; overrides epochs when set.")
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    checkpoint_every: PositiveInt = 50
    eval_every: PositiveInt | None = Field(
        None, description="Validation-loss interval in steps (default: checkpoint_every); needs a validation split."
    )
    eval_batches: PositiveInt = Field(8, description="Micro-batches per worker in each validation pass.")
    log_every: PositiveInt = 1
    trainable: Literal["all", "adapter_only"] = Field(
        "all", description="Stage 2: adapter + projector + VCE (all), or the adapter alone with the projector and "
                           "VCE frozen at their stage-1 weights (adapter_only, paper Table 5). Stage 1: all."
    )


def _stage1_default() -> StageSection:
    return StageSection(name="stage1", lr=1e-3, global_batch=256)


def _stage2_default() -> StageSection:
    return StageSection(name="stage2", lr=2e-5, adapter_lr=2e-4, global_batch=128)


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_clipping: Annotated[float, Field(ge=0)] = 1.0
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: optimizer state and step on the CPU (DeepSpeed's CPU Adam); needs zero_stage >= 1."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSection:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3 (ZeRO-Offload)")
        return self


class ScalingSection(Section):
    num_workers: PositiveInt = 2
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0
    resources_per_worker: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="Custom Ray resources each training worker holds besides CPU/GPU, e.g. {trainer: 1}: training "
        "then runs only on nodes started with that resource (`ray start --resources`, a cluster file's node type).",
    )
    max_failures: Annotated[int, Field(ge=-1)] = 2
    max_preemption_failures: Annotated[int, Field(ge=-1)] = Field(
        -1, description="Node preemptions (a node drained for preemption, e.g. a spot reclaim) a stage resumes from, "
        "counted apart from max_failures; -1: no limit."
    )
    storage_path: str | None = Field(None, description="Ray Train storage (local path or s3://); default work_dir.")
    checkpoint_upload: Literal["sync", "async"] = Field(
        "sync", description="sync: a checkpoint step waits until the checkpoint is in storage_path; async: it is "
                            "written locally and uploaded in the background while training goes on (Ray Train's "
                            "checkpoint_upload_mode). A checkpoint still uploading when a worker dies is lost."
    )
    peak_tflops: PositiveFloat | None = Field(
        None, description="Peak TFLOP/s of one training device, for MFU; default: the bf16 peak of a known GPU "
        "(components/train/flops.py), none on CPU (then MFU is not logged).")

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if name.strip() == "" or name.upper() in ("CPU", "GPU", "MEMORY"):
                raise ValueError(f"{name!r} is not a custom resource name: set CPUs and GPUs with "
                                 "scaling.cpus_per_worker and scaling.gpus_per_worker")
        return value


class TrackingSection(Section):
    tracking_uri: str | None = Field(None, description="MLflow server; default MLFLOW_TRACKING_URI or local SQLite.")
    experiment: str = "duet"
    outage_timeout_s: float = Field(
        300.0,
        ge=0,
        description="How long a stage that has finished training waits for an unreachable tracking server to "
        "take its buffered metrics before failing (checkpoints and the artifact are kept; a re-run resumes).",
    )


class SearchSpace(Section):
    """What a sweep samples: adapter rank and alpha/r (choices), stage-2 learning rates (log-uniform)."""

    r: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    alpha_over_r: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    adapter_lr: tuple[PositiveFloat, PositiveFloat] = (5e-5, 1e-3)
    lr: tuple[PositiveFloat, PositiveFloat] = (5e-6, 1e-4)

    @field_validator("adapter_lr", "lr")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"must be [low, high] with low <= high (got [{value[0]}, {value[1]}])")
        return value


# Per-step training metrics a sweep can rank trials by (reported by components/train/loop.py).
TUNE_METRICS = ("val_loss", "loss", "tokens_per_s", "samples_per_s")


class TuneSection(Section):
    enabled: bool = False
    num_samples: PositiveInt = 8
    search: Literal["random", "optuna"] = "random"
    seed: Seed | None = Field(None, description="Seed of the search algorithm's sampler (default: run.seed).")
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    max_concurrent: PositiveInt | None = Field(
        None, description="Cap on concurrent trials (always also bounded by what the cluster holds)."
    )
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    trial_driver_cpus: Annotated[float, Field(gt=0, le=1)] = Field(
        0.1, description="CPUs each trial's driver reserves (it only coordinates; its training workers reserve "
                         "their own)."
    )
    space: SearchSpace = SearchSpace()

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in TUNE_METRICS:
            raise ValueError(f"must be one of the per-step training metrics {', '.join(TUNE_METRICS)}")
        return value


class EvalSection(Section):
    """Batch generation on a Ray Data actor pool: one model replica per actor (components/evaluate/run.py)."""

    max_new_tokens: PositiveInt = 64
    batch_size: PositiveInt = 8
    num_replicas: PositiveInt = 1
    max_samples: PositiveInt | None = None
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: replicas take GPUs when the cluster has any.")
    gpus_per_replica: PositiveFloat = Field(1.0, description="GPUs reserved per replica when GPUs are used.")
    cpus_per_replica: PositiveFloat = Field(1.0, description="CPUs reserved per replica (generation actor).")
    blind_baseline: bool = Field(
        False, description="Also evaluate the fine-tuned model with every image replaced by a blank one of the "
                           "same size: the difference is what the model takes from the pictures."
    )


class RegistrySection(Section):
    model_name: str = Field("duet-llava", min_length=1)
    alias: str = Field("champion", min_length=1)
    metric: str = "score"
    direction: Literal["max", "min"] = "max"
    min_margin: Annotated[float, Field(ge=0)] = 0.0


class ServeSection(Section):
    """The Ray Serve endpoint (pipelines/serve.py, components/serve/): replicas take CPUs/GPUs as `eval` says."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds; 0.0.0.0 inside a container.")
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    model: str | None = Field(
        None, description="What `@alias` traffic gets: models:/NAME@ALIAS, models:/NAME/VERSION or a stage-2 "
                          "artifact URI; default models:/{registry.model_name}@{registry.alias}.")
    max_batch_size: PositiveInt = Field(8, description="Requests per generate call of a replica (@serve.batch).")
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = Field(
        0.02, description="How long a replica waits for more requests before running a partial batch.")
    max_versions_per_replica: PositiveInt = Field(
        3, description="Fine-tuned versions one replica keeps next to its base (LRU, @serve.multiplexed).")
    alias_refresh_s: PositiveFloat = Field(
        30.0, description="How often the registry alias is resolved again; traffic moves to a new holder.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the bearer token clients must send; "
                          "unset: no auth. The token itself is never in a file.")
    image_roots: list[str] = Field(
        default_factory=list, description="Object-store prefixes request images may be read from (s3://...); "
                                          "empty: data.root when it is in an object store.")
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = Field(
        8.0, description="Autoscaling target: requests in flight per replica.")
    max_ongoing_requests: PositiveInt = Field(32, description="Requests a replica accepts at once (queued beyond).")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r:.60} is not an environment variable name (serve.api_key_env names the "
                             "variable that holds the token, e.g. DUET_API_KEY; never the token itself)")
        return name

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.min_replicas ({self.min_replicas}) is above serve.max_replicas "
                             f"({self.max_replicas})")
        return self


# Study and variant names become trial names, MLflow run names and folder names.
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _check_name(kind: str, name: str) -> None:
    if not _STUDY_NAME.fullmatch(name):
        raise ValueError(f"{kind} name {_echo(name, 80)} must be 1-64 letters, digits, '_', '.' or '-' "
                         "(it names trials, runs and folders)")


class StudySpec(Section):
    """One method study: each variant (config overrides) trained once per seed, compared with `reference`.

    Only what the study itself can check is checked here; whether each variant's overrides give a
    valid config needs the whole config and is checked by components/study/spec.py.
    """

    description: str | None = None
    seeds: int = Field(3, description="Trials per variant, with run.seed, run.seed + 1, ...")
    reference: str = Field(description="The variant every other one is compared with (e.g. LoRA at the same rank).")
    trainable: Literal["all", "adapter_only"] = Field(
        "all", description="Stage 2 trains adapter + projector + VCE (all), or the adapter alone (paper Table 5)."
    )
    variants: dict[str, dict[str, Any]] = Field(
        description="Variant name -> overrides as dotted keys (adapter.r: 64), applied as --set would be."
    )
    compare_with: dict[str, str] = Field(
        default_factory=dict, description="Variant -> the variant it is compared with instead of `reference` "
                                          "(e.g. dual_lora_r16: lora_r16, LoRA at the same rank)."
    )
    figure: bool = Field(
        False, description="Also draw Figure 5: the primary metric against trainable adapter MiB, one line per "
                           "adapter type over its ranks, with error bars over seeds."
    )

    @field_validator("seeds")
    @classmethod
    def _at_least_one_seed(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1: each variant is trained once per seed (e.g. seeds: 3)")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _variant_without_overrides(cls, value: Any) -> Any:
        """`base:` alone (YAML null) is a variant that trains the config as it is."""
        if isinstance(value, dict):
            return {name: {} if overrides is None else overrides for name, overrides in value.items()}
        return value

    @field_validator("variants")
    @classmethod
    def _variants_declared(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("no variants: declare at least one, e.g. variants: {lora: {adapter.type: lora}}")
        for name, overrides in value.items():
            _check_name("variant", name)
            for key, setting in overrides.items():
                where = f"variant {name!r}, key {_echo(key, 80)}"
                if not _OVERRIDE_KEY.fullmatch(key):
                    raise ValueError(f"{where}: an override key is a dotted config key, e.g. adapter.r")
                if key == "run.seed" or (key == "run" and isinstance(setting, dict) and "seed" in setting):
                    raise ValueError(f"{where}: seeds belong to the study, not to a variant; remove it and set "
                                     "the study's seeds (trials use run.seed, run.seed + 1, ...)")
                if key.split(".")[0] == "study":
                    raise ValueError(f"{where}: a variant cannot change the study section itself")
        return value

    @model_validator(mode="after")
    def _reference_is_a_variant(self) -> StudySpec:
        if self.reference not in self.variants:
            raise ValueError(f"reference {self.reference!r} is not one of the variants "
                             f"({', '.join(self.variants)}): name the variant the others are compared with")
        unknown = [name for pair in self.compare_with.items() for name in pair if name not in self.variants]
        if unknown:
            raise ValueError(f"compare_with names {', '.join(map(repr, unknown))}, not a variant "
                             f"({', '.join(self.variants)})")
        return self


class StudySection(Section):
    """Method studies (README "Method studies"); none by default."""

    name: str | None = Field(None, description="The study pipelines/study.py runs when --study is not given.")
    studies: dict[str, StudySpec] = Field(default_factory=dict)

    @field_validator("studies", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("studies")
    @classmethod
    def _study_names(cls, value: dict[str, StudySpec]) -> dict[str, StudySpec]:
        for name in value:
            _check_name("study", name)
        return value

    @model_validator(mode="after")
    def _name_is_declared(self) -> StudySection:
        if self.name is not None and self.name not in self.studies:
            declared = ", ".join(self.studies) or "none"
            raise ValueError(f"study.name {self.name!r} is not a declared study (study.studies: {declared})")
        return self


class DuetConfig(Section):
    """The whole pipeline. Cross-section checks live here."""

    run: RunSection = RunSection()
    storage: StorageSection = StorageSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    vce: VCESection = VCESection()
    adapter: AdapterSection = AdapterSection()
    stage1: StageSection = Field(default_factory=_stage1_default)
    stage2: StageSection = Field(default_factory=_stage2_default)
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingSection = TrackingSection()
    tune: TuneSection = TuneSection()
    eval: EvalSection = EvalSection()
    registry: RegistrySection = RegistrySection()
    serve: ServeSection = ServeSection()
    study: StudySection = StudySection()

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults_under_partial_sections(cls, data: Any) -> Any:
        """A partial stage section (`--set stage1.lr=...` alone, or YAML with a few keys) keeps that stage's
        own defaults (name, lr, global batch) instead of failing on `stage1.name: Field required`."""
        if not isinstance(data, dict):
            return data
        for key, default in (("stage1", _stage1_default), ("stage2", _stage2_default)):
            if isinstance(data.get(key), dict):
                data = {**data, key: {**default().model_dump(), **data[key]}}
        return data

    @model_validator(mode="after")
    def _global_batch_splits_over_workers(self) -> DuetConfig:
        """Checked here, not in the workers: there it would fail after the data, the base and stage 1."""
        workers = self.scaling.num_workers
        for stage in (self.stage1, self.stage2):
            if stage.global_batch % workers:
                raise ValueError(
                    f"{stage.name}.global_batch ({stage.global_batch}) is not divisible by scaling.num_workers "
                    f"({workers}): every worker takes an equal share of each step's batch; choose a global batch "
                    f"that is a multiple of {workers}, e.g. {max(workers, stage.global_batch // workers * workers)}"
                )
        return self

    @model_validator(mode="after")
    def _stage1_trains_its_bridge(self) -> DuetConfig:
        if self.stage1.trainable != "all":
            raise ValueError("stage1.trainable must be 'all': stage 1 trains only the projector and VCE (there is no "
                             "adapter yet); adapter_only is a stage-2 setting (stage2.trainable)")
        return self

    @model_validator(mode="after")
    def _layers_inside_vision_tower(self) -> DuetConfig:
        layers = self.model.vision_layers()
        if layers is not None:
            self.vce.check_layers(layers)
        return self

    def with_absolute_paths(self, cwd: str | None = None) -> DuetConfig:
        """Relative local paths made absolute, so Ray workers (which run in other directories) find the same files.

        One rule: `run.work_dir` resolves against the current directory (`cwd`), and everything duet
        writes resolves against `run.work_dir` (data.root, scaling.storage_path, and model.checkpoint
        when duet builds the tiny base there), so `--set run.work_dir=X` moves all of it. Inputs a user
        brings (data.input, data.image_root, data.caption_input, the checkpoint of a real base) resolve
        against the current directory, like any command-line path. Under `ray job submit` the current
        directory is Ray's temporary copy of the project; see `durable_work_dir`.
        """
        here = os.path.abspath(cwd or os.getcwd())
        work_dir = durable_work_dir(self.run.work_dir, here)

        def under(root: str, value: str | None) -> str | None:
            if not value or "://" in value:
                return value
            return os.path.normpath(os.path.join(root, os.path.expanduser(value)))

        built_base = self.model.arch == "tiny"
        return self.model_copy(update={
            "run": self.run.model_copy(update={"work_dir": work_dir}),
            "data": self.data.model_copy(update={
                "root": under(work_dir, self.data.root), "input": under(here, self.data.input),
                "image_root": under(here, self.data.image_root), "caption_input": under(here, self.data.caption_input),
            }),
            "model": self.model.model_copy(
                update={"checkpoint": under(work_dir if built_base else here, self.model.checkpoint)}
            ),
            "scaling": self.scaling.model_copy(update={"storage_path": under(work_dir, self.scaling.storage_path)}),
        })

    def stage(self, number: int) -> StageSection:
        """The section of training stage 1 or 2."""
        if number not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {number!r}")
        return self.stage1 if number == 1 else self.stage2

    def hash(self) -> str:
        """Stable digest of the resolved config, used to recognise already-done work."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def environ_snapshot() -> dict[str, str]:
    """A copy of the environment that does not race threads changing it.

    Iterating `os.environ` looks every key up again, so a variable another thread removes in
    between (MLflow's telemetry thread does, for `_MLFLOW_TELEMETRY_SESSION_ID`) raises KeyError.
    The copy is retried until it sees one consistent state.
    """
    while True:
        try:
            return os.environ.copy()
        except (KeyError, RuntimeError):  # changed while being copied: try again
            continue


# Ray unpacks a job's --working-dir under .../runtime_resources/working_dir_files/_ray_pkg_<hash>/ and deletes it.
_RAY_JOB_PACKAGE = f"{os.sep}working_dir_files{os.sep}"


def in_ray_job_package(cwd: str) -> bool:
    """True when `cwd` is Ray's temporary copy of a job's working directory (`ray job submit --working-dir`)."""
    return _RAY_JOB_PACKAGE in os.path.join(os.path.abspath(cwd), "")


def durable_work_dir(work_dir: str, cwd: str) -> str:
    """`run.work_dir` as an absolute path that outlives the command.

    A relative work dir resolves against `cwd`, except inside Ray's temporary copy of a job's
    working directory, which Ray deletes: there it resolves against the home directory of the
    machine the job's driver runs on (`.duet` -> `~/.duet`), so the dataset, the base model and
    the MLflow store survive the job and a re-submitted job resumes.
    """
    expanded = os.path.expanduser(work_dir)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    root = os.path.expanduser("~") if in_ray_job_package(cwd) else cwd
    return os.path.normpath(os.path.join(root, expanded))


# ---------------------------------------------------------------- loading


# Bounded echo of a bad value: a 1 MB string or a deeply nested YAML value must not become the message.
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxdict, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxset = 3, 6, 6, 6, 6
_ECHO.maxstring, _ECHO.maxother, _ECHO.maxlong = 300, 120, 60


def _echo(value: Any, limit: int = 300) -> str:
    text = _ECHO.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAX_ERRORS = 12  # a list of 10 000 bad items is reported by its first few


def _section_at(loc: Sequence[Any]) -> type[Section] | None:
    """The section class that holds the last key of a validation error's location, if the path is known."""
    section: type[Section] = DuetConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, Section)):
            return None
        section = annotation
    return section


def _unknown_key_hint(loc: Sequence[Any]) -> str:
    """'did you mean ...' for a misspelt key, else where the keys are listed."""
    section = _section_at(loc)
    if section is not None and loc:
        close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
        if close:
            prefix = ".".join(str(p) for p in loc[:-1])
            return f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return "check the spelling; see the README's config reference"


def _format_error(err: ValidationError) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:_MAX_ERRORS]:
        key = ".".join(_key(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key[:300]}: unknown key ({_unknown_key_hint(e['loc'])})")
        elif not e["loc"] and e["type"] == "value_error":  # a check across sections: its message names the keys
            lines.append(f"  {msg[:800]}")
        else:
            lines.append(f"  {key[:300]}: {msg[:500]} (got {_echo(e.get('input'))})")
    if len(errors) > _MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - _MAX_ERRORS} more")
    return "invalid config:\n" + "\n".join(lines)


def _parse_value(text: str, key: str = "") -> Any:
    """`--set` values are YAML scalars or flow collections: 3, 1e-4, true, [q_proj, v_proj], null."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: an int of over 4300 digits
        raise ConfigError(f"--set {_key(key)}: value {_echo(text)} is not valid YAML: {str(exc)[:800]}") from None


def _key(part: Any) -> str:
    """A key as typed when it is printable, else its repr (no control characters or lone surrogates in messages)."""
    text = str(part)
    return text[:200] if text.isprintable() else _echo(text)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a raw config dict, creating sections as needed."""
    if "=" not in assignment:
        raise ConfigError(f"--set {_echo(assignment)}: expected dotted.key=value, e.g. --set adapter.r=64")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {_echo(assignment)}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {_key(key)}: {_key(part)} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(raw, key.strip())


def _empty_sections_as_defaults(tree: dict[str, Any], section: type[Section]) -> dict[str, Any]:
    """A section written with nothing under it (`tune:` alone, which YAML reads as null) means its defaults."""
    out = dict(tree)
    for key, value in tree.items():
        field = section.model_fields.get(str(key))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, Section)):
            continue
        if value is None:
            out[key] = {}
        elif isinstance(value, dict):
            out[key] = _empty_sections_as_defaults(value, annotation)
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> DuetConfig:
    """Load YAML (or defaults when path is None), apply overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:  # missing, a directory, unreadable, not UTF-8, bad path
            reason = "not found" if isinstance(exc, FileNotFoundError) else f"cannot be read ({type(exc).__name__})"
            raise ConfigError(
                f"config file {_echo(str(file))} {reason} (pass --config pipelines/configs/demo.yaml)"
            ) from None
        try:
            loaded = yaml.safe_load(text) or {}
        except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: an int of over 4300 digits
            raise ConfigError(f"config file {_echo(str(file))} is not valid YAML: {str(exc)[:800]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {_echo(str(file))} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = _empty_sections_as_defaults(loaded, DuetConfig)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return DuetConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_from_dict(tree: dict[str, Any]) -> DuetConfig:
    """Validate an already-resolved config (e.g. the one logged with a run or shipped to a worker)."""
    try:
        return DuetConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def dump_config(cfg: DuetConfig) -> str:
    """The resolved config as YAML: enough on its own to reproduce a run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- CLI helper


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--config FILE` and repeated `--set key=value` every pipeline script accepts."""
    parser.add_argument("--config", help="YAML config file (see pipelines/configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set adapter.r=64 (repeatable)",
    )
    return parser


def parse_cli(
    description: str, argv: Sequence[str] | None = None, extra: Any = None
) -> tuple[DuetConfig, argparse.Namespace]:
    """Parse a pipeline script's arguments and validate the config; exit 2 with the message on error.

    `description` is the script's docstring, shown whole by `--help` (its usage examples included);
    `extra` is an optional callable that adds the script's own arguments to the parser.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        loaded = load_config(args.config, args.overrides)
    except ConfigError as exc:
        error(str(exc))
        raise SystemExit(2) from None
    cfg = loaded.with_absolute_paths()
    if in_ray_job_package(os.getcwd()) and not os.path.isabs(os.path.expanduser(loaded.run.work_dir)):
        say(f"note: run.work_dir {loaded.run.work_dir!r} is relative and this job runs in Ray's temporary copy of "
            f"the working directory, which Ray deletes: using {cfg.run.work_dir} (set run.work_dir to an absolute "
            "path to choose)")
    return cfg, args
