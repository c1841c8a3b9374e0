"""One replica's models: each frozen base held once, the fine-tuned versions attached to it, and generation.

A version is small next to its base: its adapter (one more PEFT adapter in the shared PeftModel, picked per
row with PEFT's `adapter_names`, which duet's layers implement for every method) and its bridge (VCE +
projector, a module swapped in for the call). Versions share a base when they were trained on the same
checkpoint with the same adapter method (a PEFT layer holds adapters of one method); any other version gets
a base of its own. Dual-LoRA cannot be merged into the base, which is why it is served this way.

Generation is the evaluation's: the same prompt builder and left-padded batches (`batch_inputs`), greedy at
temperature 0. A stopping criterion follows every row at each step: it ends a row at its own `max_tokens`
or stop string, and hands the text so far to `on_step`, which is how a batch streams.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from components import storage
from components.config import DuetConfig
from components.data.dataset import load_tokenizer, local_processor_dir
from components.data.transform import load_image_spec
from components.evaluate.generate import batch_inputs, inference_dtype
from components.evaluate.prompts import PromptBuilder, visual_token_count
from components.model.adapters.apply import load_adapter
from components.model.artifact import (
    ARTIFACT_ADAPTER,
    check_family_matches,
    load_bridge_weights,
    local_artifact,
)
from components.model.families import family_of
from components.model.llava import VCEProjector, llava_core, load_base_model
from components.model.vce import VisualCueEnhancer
from components.serve.versions import Package

NO_ADAPTER = "__base__"  # PEFT's name for "no adapter on this row"


@dataclass(frozen=True)
class Job:
    """One request, checked and encoded: what generation needs and nothing else."""

    prompt: np.ndarray           # token ids (PromptBuilder.encode)
    images: np.ndarray           # uint8 (n, H, W, 3)
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False  # a streamed row's text is followed at every step; others' only once they end

    @property
    def sampling(self) -> tuple[float, float, int | None]:
        """Rows with equal sampling settings run in one generate call (greedy ones all together)."""
        return (0.0, 1.0, None) if self.temperature == 0 else (self.temperature, self.top_p, self.seed)


@dataclass
class RowState:
    """A row's answer as generation goes: the text a client may already see, and why it ended."""

    text: str = ""
    tokens: int = 0
    finish: str | None = None  # "stop" (end of sequence or a stop string) or "length"


@dataclass
class Version:
    """A fine-tuned version attached to a base."""

    key: str
    cfg: DuetConfig
    builder: PromptBuilder
    bridge: nn.Module
    feature_layer: int | list[int]
    adapter: str
    package: Package
    base: SharedBase | None = field(default=None, repr=False)
    users: int = 0  # requests holding it (counted by the server): an evicted version waits for them
    detached: bool = False


def _digest_dir(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def base_identity(cfg: DuetConfig) -> str:
    """What decides that two versions can share a base: the base weights and the adapter method.

    A package embeds a small base (a copy per version), so a local base is known by its content; a large
    one is referenced by URI and known by it.
    """
    checkpoint = cfg.model.checkpoint or ""
    weights = checkpoint if storage.is_remote(checkpoint) else _digest_dir(Path(storage.resolve(checkpoint)[1]))
    return f"{weights}:{cfg.adapter.type}"


class SharedBase:
    """One frozen base (vision tower, language model, plain projector) and the adapters loaded into it."""

    def __init__(self, cfg: DuetConfig, device: torch.device) -> None:
        self.device = device
        self.dtype = inference_dtype(cfg, device)
        self.model: nn.Module = load_base_model(cfg, self.dtype).to(device).eval()
        self.core = llava_core(self.model)
        self.plain_projector = self.core.multi_modal_projector
        self.plain_feature_layer = self.model.config.vision_feature_layer
        local = local_processor_dir(cfg.model.checkpoint or "", cfg.storage)
        self.tokenizer = load_tokenizer(local)
        self.spec = load_image_spec(local)
        self.adapters: set[str] = set()
        self._names = 0

    def bridge_for(self, cfg: DuetConfig) -> tuple[nn.Module, int | list[int]]:
        """A fresh VCE + projector for `cfg` (weights loaded by the caller) and the vision layers it reads."""
        projector = copy.deepcopy(self.plain_projector)
        if not cfg.vce.enabled:
            return projector, self.plain_feature_layer
        dim = self.model.config.vision_config.hidden_size
        vce = VisualCueEnhancer.from_config(cfg.vce, dim).to(self.device, self.dtype)
        return VCEProjector(vce, projector, dim, cfg.vce).eval(), [cfg.vce.anchor_layer, *cfg.vce.reference_layers]

    def add_adapter(self, folder: Path) -> str:
        """Load a saved adapter under a fresh name; returns the name."""
        name = f"version{self._names}"
        self._names += 1
        if not self.adapters:
            self.model = load_adapter(self.model, str(folder), adapter_name=name).eval()
        else:
            self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        self.model.to(self.device)
        self.adapters.add(name)
        return name

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters and len(self.adapters) > 1:
            self.model.delete_adapter(name)
            self.adapters.discard(name)


class Engine:
    """The versions one replica serves, over as few bases as they allow; one generate call at a time."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bases: dict[str, SharedBase] = {}
        self.versions: dict[str, Version] = {}
        self._lock = threading.Lock()  # the bridge swap and generate() run under it

    def load(self, package: Package) -> Version:
        """Attach a version (blocking: run it in a thread); another base is loaded only when none fits."""
        cfg = package.cfg
        folder, meta = local_artifact(package.stage2, cfg.storage)
        if meta.stage != 2:
            raise ValueError(f"{package.key}: {package.stage2} is a stage-{meta.stage} artifact, not a fine-tuned one")
        identity = base_identity(cfg)
        base = self.bases.get(identity)
        if base is None:
            base = SharedBase(cfg, self.device)
        check_family_matches(meta, family_of(base.model), package.stage2)
        bridge, feature_layer = base.bridge_for(cfg)
        load_bridge_weights(bridge, folder, package.stage2)
        bridge.to(self.device, base.dtype)
        builder = PromptBuilder.from_config(cfg, cfg.model.checkpoint or "", visual_token_count(cfg))
        adapter_dir = folder / ARTIFACT_ADAPTER
        with self._lock:  # PEFT's adapter loading changes modules a running generate() reads
            adapter = base.add_adapter(adapter_dir) if (adapter_dir / "adapter_config.json").is_file() else NO_ADAPTER
            self.bases[identity] = base
            version = Version(package.key, cfg, builder, bridge, feature_layer, adapter, package, base)
            self.versions[package.key] = version
        return version

    def unload(self, key: str | Version) -> None:
        """Detach a version (by key, or that very object: a version loaded again under its key is another
        object); its base goes too when no other version uses it."""
        with self._lock:
            version = self.versions.get(key) if isinstance(key, str) else key
            if version is None or version.base is None or version.detached:
                return
            version.detached = True
            if self.versions.get(version.key) is version:
                del self.versions[version.key]
            base = version.base
            if not any(v.base is base for v in self.versions.values()):
                self.bases = {k: b for k, b in self.bases.items() if b is not base}
            elif version.adapter != NO_ADAPTER:
                base.remove_adapter(version.adapter)
        version.package.discard()

    @torch.inference_mode()
    def generate(self, version: Version, jobs: Sequence[Job],
                 on_step: Callable[[list[RowState]], None] | None = None) -> list[RowState]:
        """Answers for `jobs` (equal sampling settings) in one generate call; `on_step` sees every step when a
        job streams, else only the end."""
        base = version.base
        if base is None or not jobs:
            return [RowState() for _ in jobs]
        temperature, top_p, seed = jobs[0].sampling
        pad = int(base.tokenizer.pad_token_id)
        with self._lock:
            inputs, length = batch_inputs([j.prompt for j in jobs], [j.images for j in jobs], pad, base.spec,
                                          self.device, base.dtype)
            follower = RowFollower(base.tokenizer, jobs, length, on_step)
            settings = GenerationConfig(
                max_new_tokens=max(j.max_new_tokens for j in jobs), do_sample=temperature > 0, num_beams=1,
                pad_token_id=pad, eos_token_id=base.tokenizer.eos_token_id,
                bos_token_id=base.tokenizer.bos_token_id,
                **({"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}),
            )
            if seed is not None:
                torch.manual_seed(seed)
            base.core.multi_modal_projector = version.bridge
            base.model.config.vision_feature_layer = version.feature_layer
            base.core.config.vision_feature_layer = version.feature_layer
            extra = {"adapter_names": [version.adapter] * len(jobs)} if base.adapters else {}
            base.model.generate(**inputs, generation_config=settings,
                                stopping_criteria=StoppingCriteriaList([follower]), **extra)
        return follower.finish()


class RowFollower(StoppingCriteria):
    """Follows each row of a batch step by step: its text (stop strings cut), its token budget, its end.

    The text a row shows is the evaluation's answer (decoded without special tokens, stripped) for what
    has been generated so far, minus what could still change: a trailing partial character, trailing
    whitespace, or the start of a stop string. So a stream's pieces add up to the non-streamed answer.
    """

    def __init__(self, tokenizer, jobs: Sequence[Job], prompt_length: int,
                 on_step: Callable[[list[RowState]], None] | None) -> None:
        self.tokenizer = tokenizer
        self.jobs = list(jobs)
        self.prompt_length = prompt_length
        self.on_step = on_step
        self.rows = [RowState() for _ in jobs]
        self.eos = set(_as_list(tokenizer.eos_token_id))
        # Decoding every row at every step costs more than a small model's step: only where it is needed.
        self.followed = [job.stream or bool(job.stop) for job in self.jobs]
        self.streaming = any(job.stream for job in self.jobs)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length:]
        for row, (job, state) in enumerate(zip(self.jobs, self.rows)):
            if state.finish is not None:
                continue
            tokens = generated[row].tolist()
            ended = bool(tokens) and tokens[-1] in self.eos
            state.tokens = len(tokens)
            at_length = len(tokens) >= job.max_new_tokens
            if not (ended or at_length or self.followed[row]):
                continue
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _cut_at_stop(text, job.stop)
            if ended or cut is not None:
                state.text, state.finish = (text if cut is None else cut).strip(), "stop"
            elif at_length:
                state.text, state.finish = text.strip(), "length"
            else:
                state.text = _settled(text, job.stop)
        if self.on_step is not None and self.streaming:
            self.on_step([RowState(s.text, s.tokens, s.finish) for s in self.rows])
        return torch.tensor([s.finish is not None for s in self.rows], device=input_ids.device)

    def finish(self) -> list[RowState]:
        """The rows after generate returned (a row generate ended without the criterion seeing it ends by length)."""
        for state in self.rows:
            if state.finish is None:
                state.finish = "length"
        if self.on_step is not None:
            self.on_step([RowState(s.text, s.tokens, s.finish) for s in self.rows])
        return self.rows


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """The text before the first stop string, or None when none occurs."""
    found = [text.index(s) for s in stops if s in text]
    return text[:min(found)] if found else None


def _settled(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished answer that more tokens cannot change."""
    text = text.rstrip("\ufffd")
    for stop in stops:  # hold back a suffix that may become a stop string
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                text = text[:-size]
                break
    return text.strip()
