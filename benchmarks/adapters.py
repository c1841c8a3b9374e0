"""Latency of Dual-LoRA against LoRA and the mixture baselines, as ratios to LoRA measured side by side.

Two levels:

- layer: one adapted d x d nn.Linear over T tokens (inference forward, one-token forward, and
  forward+backward in training mode with the configured dropout);
- whole model: a LLaVA whose language model carries the adapter on q_proj/v_proj (VCE in front
  of the projector, as in stage 2). Inference is a forward over the prompt (image + text) plus
  token-by-token greedy generation with the KV cache, every method generating the same number
  of tokens; train_step is forward + backward of the stage-2 trainable set.

All methods share one set of base weights (the frozen model is copied with its tensors shared)
and differ only in the adapter, so a ratio isolates the adapter's cost. Ranks keep the paper's
adapter-to-width proportion (r = 64 at d = 4096, Table 1): every method has the same total rank r,
the MoE-LoRA baselines split it into 4 equal experts and RoDE into the proportions [32, 16, 8, 8].

The theoretical FLOP ratio beside each measured ratio counts the base model and the adapters
analytically (GEMMs exactly, element-wise ops approximately), with the implemented computation:
the mixture baselines evaluate every expert densely in one stacked GEMM (their fastest form at
these ranks), top-k masking only the gates.

Two references are timed with the methods but are not methods: the same model without an adapter
(`none`: no adapter can be faster, so `none / baseline` is the floor of `dual_lora / baseline`),
and, at the layer, top-k MoE-LoRA written with one A and one B GEMM per expert, the unfused form
common in published MoE-LoRA code.

CPU presets time with one intra-op thread on the process CPU clock (see benchmarks/common.py).

    .venv/bin/python benchmarks/adapters.py --preset cpu --json .duet/bench/adapters.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from benchmarks.common import (
    Timing,
    default_clock,
    format_table,
    machine,
    measure_interleaved,
    resolve_dtype,
    seconds,
    write_json,
)
from components.config import AdapterSection, TinyModelSection, VCESection
from components.model.adapters.apply import apply_adapter
from components.model.adapters.base import InputDependentLoraLayer
from components.model.adapters.moe_lora import MoeLoraTopkLinear, route
from components.model.llava import attach_vce, llava_15_7b_config
from components.model.stages import set_trainable
from components.model.tiny import build_tokenizer, tiny_llava_config

METHODS = ("lora", "dual_lora", "moe_lora_topk", "moe_lora_softmax", "rode")
BASELINE = "lora"
PAPER_RANK = 64
PAPER_RODE_RANKS = (32, 16, 8, 8)
NUM_EXPERTS = 4
TOP_K = 2
DROPOUT = 0.05
# Targets for whole-model inference: Dual-LoRA / LoRA, and Dual-LoRA / each MoE-LoRA baseline
# (the paper reports 1.16x LoRA and 0.73x a 4-expert LoRA-MoE).
TARGET_VS_LORA = 1.05
TARGET_VS_MOE = 0.73
MOE_BASELINES = ("moe_lora_topk", "moe_lora_softmax", "rode")
# Not a baseline: top-k MoE-LoRA with one A and one B GEMM per expert, the form common in
# published MoE-LoRA code, timed at inference only to show what an unfused mixture costs.
LOOPED = "moe_lora_topk_looped"
# Not a method either: the same model without any adapter, the floor every adapter's time sits on.
NONE = "none"


@dataclass(frozen=True)
class Preset:
    """Sizes and repetition counts of one benchmark run."""

    device: str
    dtype: str
    layer_dim: int
    layer_tokens: int
    rank: int
    arch: str  # "tiny" (TinyModelSection sizes below) or "llava-1.5-7b"
    prompt_text_tokens: int
    new_tokens: int
    train_batch: int
    train_text_tokens: int
    layer_repeats: int
    model_repeats: int
    inference_repeats: int  # decoding is bandwidth-bound and noisier on a shared host: more repetitions
    warmup: int = 1
    # Intra-op threads (0: torch's default). One on shared CPUs: with two, every OpenMP barrier
    # waits for a thread a neighbouring process has preempted, which multiplies times 5-10x.
    threads: int = 0
    tiny: dict[str, int] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # Seconds: exercises every code path, for the smoke test.
    "quick": Preset(
        device="cpu", dtype="float32", layer_dim=64, layer_tokens=16, rank=8, arch="tiny",
        prompt_text_tokens=8, new_tokens=4, train_batch=1, train_text_tokens=8,
        layer_repeats=3, model_repeats=2, inference_repeats=2, threads=1,
        tiny=dict(vision_hidden=32, vision_layers=20, vision_heads=2, image_size=32, patch_size=8,
                  text_hidden=64, text_layers=2, text_heads=4, text_intermediate=172),
    ),
    # The paper's proportion on 2 CPU cores: r = 16 at d = 1024 (r = 64 at d = 4096).
    "cpu": Preset(
        device="cpu", dtype="float32", layer_dim=1024, layer_tokens=512, rank=16, arch="tiny",
        prompt_text_tokens=63, new_tokens=16, train_batch=1, train_text_tokens=63,
        layer_repeats=15, model_repeats=7, inference_repeats=15, threads=1,
        tiny=dict(vision_hidden=128, vision_layers=24, vision_heads=4, image_size=112, patch_size=14,
                  text_hidden=1024, text_layers=4, text_heads=16, text_intermediate=2752),
    ),
    # LLaVA-1.5-7B's shapes in bf16 on one GPU (random weights: timing only).
    "gpu": Preset(
        device="cuda", dtype="bfloat16", layer_dim=4096, layer_tokens=2048, rank=64, arch="llava-1.5-7b",
        prompt_text_tokens=128, new_tokens=64, train_batch=1, train_text_tokens=1471,
        layer_repeats=31, model_repeats=7, inference_repeats=7,
    ),
}


def expert_ranks(rank: int) -> dict[str, list[int]]:
    """Per-expert ranks at total rank `rank`: the paper's splits scaled by rank / 64."""
    if rank % (PAPER_RANK // min(PAPER_RODE_RANKS)) or rank % NUM_EXPERTS:
        raise ValueError(f"rank must be a multiple of {PAPER_RANK // min(PAPER_RODE_RANKS)}, got {rank}")
    return {
        "moe": [rank // NUM_EXPERTS] * NUM_EXPERTS,
        "rode": [r * rank // PAPER_RANK for r in PAPER_RODE_RANKS],
    }


def adapter_config(method: str, rank: int, targets: list[str]) -> AdapterSection:
    """The project's adapter config for `method` at total rank `rank` (alpha = 2r as in the paper)."""
    ranks = expert_ranks(rank)
    return AdapterSection(
        type=method, r=rank, alpha=2.0 * rank, dropout=DROPOUT, target_modules=targets,
        num_experts=NUM_EXPERTS, expert_rank=ranks["moe"][0], top_k=TOP_K, rode_ranks=ranks["rode"],
    )


def share_weights(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers are the same tensors."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def adapter_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def check_modes(model: nn.Module, training: bool) -> None:
    """Refuse to time a model whose adapters are not in the intended mode.

    Inference must run in eval mode (dropout off, so the fused one-GEMM paths apply); a train
    step must run in training mode with the configured dropout.
    """
    layers = adapter_layers(model)
    if not layers:
        raise RuntimeError("no adapter layers found: the targets matched nothing")
    for layer in layers:
        for dropout in layer.lora_dropout.values():
            if dropout.training != training or getattr(dropout, "p", None) != DROPOUT:
                raise RuntimeError(f"adapter dropout is {dropout!r} (training={dropout.training}), "
                                   f"expected p={DROPOUT}, training={training}")
        if isinstance(layer, InputDependentLoraLayer) and not training:
            for name in layer.active_adapters:
                weights = [p for p in layer.parameters() if p.requires_grad]
                if not layer._fusable(name, *weights):
                    raise RuntimeError(f"{type(layer).__name__} would not take its fused inference path")


# ---------------------------------------------------------------- FLOP model (forward unless noted)


def adapter_flops(method: str, d_in: int, d_out: int, rank: int) -> float:
    """Forward FLOPs per token of one adapter on a d_in -> d_out linear, as implemented."""
    scale_add = 2 * d_out
    if method == "lora":
        return 2 * rank * (d_in + d_out) + scale_add
    if method == "dual_lora":
        layer_norm, relu, gate = 8 * rank, rank, rank
        return 2 * (2 * rank * d_in + rank * d_out) + layer_norm + relu + gate + scale_add
    if method in MOE_BASELINES:
        experts = NUM_EXPERTS
        routing, gate = 5 * experts, rank
        return 2 * (rank * d_in + experts * d_in + rank * d_out) + routing + gate + scale_add
    raise ValueError(f"unknown method {method!r}")


def layer_flops(method: str, dim: int, tokens: int, rank: int) -> dict[str, float]:
    """Frozen d x d linear + adapter; backward: input gradient of the base, both gradients of the adapter."""
    base = 2 * tokens * dim * dim
    adapter = tokens * adapter_flops(method, dim, dim, rank)
    return {"forward": base + adapter, "forward_backward": (base + adapter) + (base + 2 * adapter)}


def vision_flops(config: LlavaConfig) -> float:
    """CLIP tower forward for one image: patch embedding + every layer (all run for hidden_states)."""
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    n, d = patches + 1, vc.hidden_size
    per_layer = 2 * n * (4 * d * d + 2 * d * vc.intermediate_size) + 4 * n * n * d
    return vc.num_hidden_layers * per_layer + 2 * patches * 3 * vc.patch_size**2 * d


def bridge_flops(config: LlavaConfig, vce: VCESection) -> float:
    """VCE (deformable cross-attention over L levels) + the two-layer projector, for one image."""
    vc, tc = config.vision_config, config.text_config
    n, d = (vc.image_size // vc.patch_size) ** 2, vc.hidden_size
    levels = len(vce.reference_layers) + int(vce.include_anchor_level)
    samples = vce.heads * levels * vce.points
    per_query = 2 * d * samples * 3 + 2 * d * d + 10 * levels * vce.points * d
    values = levels * n * 2 * d * d
    projector = 2 * n * (d * tc.hidden_size + tc.hidden_size * tc.hidden_size)
    return n * per_query + values + projector


def lm_flops(config: LlavaConfig, method: str, rank: int, positions: int, context: float,
             logits: int) -> dict[str, float]:
    """Language model forward over `positions` tokens attending to `context` keys on average.

    Split into the frozen linears, attention and the q/v adapters, because backward treats them
    differently (frozen: input gradient only; adapters: both gradients).
    """
    tc = config.text_config
    d, layers = tc.hidden_size, tc.num_hidden_layers
    linear = layers * 2 * positions * (4 * d * d + 3 * d * tc.intermediate_size) + 2 * logits * d * tc.vocab_size
    attention = layers * 4 * positions * context * d
    adapters = layers * 2 * positions * adapter_flops(method, d, d, rank)
    return {"linear": linear, "attention": attention, "adapters": adapters}


def model_flops(config: LlavaConfig, vce: VCESection, method: str, rank: int, preset: Preset,
                prompt_len: int) -> dict[str, float]:
    """Inference (prompt + generation, logits only where a token is chosen) and train-step FLOPs."""
    image = vision_flops(config) + bridge_flops(config, vce)
    prefill = lm_flops(config, method, rank, prompt_len, (prompt_len + 1) / 2, logits=1)
    inference = image + sum(prefill.values())
    for step in range(1, preset.new_tokens):
        inference += sum(lm_flops(config, method, rank, 1, prompt_len + step, logits=1).values())
    batch, length = preset.train_batch, prompt_len
    lm = lm_flops(config, method, rank, batch * length, (length + 1) / 2, logits=batch * length)
    forward = batch * image + sum(lm.values())
    bridge = batch * bridge_flops(config, vce)
    backward = 2 * bridge + lm["linear"] + 2 * lm["attention"] + 2 * lm["adapters"]
    return {"inference": inference, "train_step": forward + backward}


# ---------------------------------------------------------------- the unfused reference


def looped_topk_delta(layer: MoeLoraTopkLinear, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """Top-k MoE-LoRA with one A and one B GEMM per expert (same result as the stacked layer)."""
    ranks = list(layer.expert_ranks[adapter_name])
    gates = route(layer.lora_router[adapter_name](x), "topk", layer.top_k[adapter_name])
    a_blocks = layer.lora_A[adapter_name].weight.split(ranks, dim=0)
    b_blocks = layer.lora_B[adapter_name].weight.split(ranks, dim=1)
    out = None
    for expert, (a, b) in enumerate(zip(a_blocks, b_blocks)):
        term = gates[..., expert : expert + 1] * F.linear(F.linear(x, a), b)
        out = term if out is None else out + term
    return out * layer.scaling[adapter_name]


def make_looped(model: nn.Module) -> nn.Module:
    """Switch every top-k MoE-LoRA layer of `model` to the per-expert loop."""
    for layer in adapter_layers(model):
        if not isinstance(layer, MoeLoraTopkLinear):
            raise TypeError(f"expected MoE-LoRA top-k layers, got {type(layer).__name__}")
        layer._adapter_delta = types.MethodType(looped_topk_delta, layer)
    return model


def check_looped_matches(reference: nn.Module, looped: nn.Module, *args: Any, **kwargs: Any) -> None:
    """The looped form computes the same function as the stacked layer (with a random B, so it shows)."""
    with torch.no_grad():
        for ref_layer, loop_layer in zip(adapter_layers(reference), adapter_layers(looped)):
            for name in ref_layer.active_adapters:
                x = torch.randn(3, ref_layer.in_features, device=ref_layer.lora_B[name].weight.device,
                                dtype=ref_layer.lora_B[name].weight.dtype)
                torch.testing.assert_close(
                    looped_topk_delta(loop_layer, name, x), ref_layer._adapter_delta(name, x),
                    rtol=1e-3, atol=1e-3,
                )
            return


# ---------------------------------------------------------------- layer level


class OneLinear(nn.Module):
    """A single d x d linear named like an attention projection, for apply_adapter's targets."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_variants(base: nn.Module, rank: int, targets: list[str], stage: int | None,
                   looped: bool) -> dict[str, nn.Module]:
    """Every method, the bare base (and the looped reference), on weight-sharing copies of `base`.

    PEFT freezes every base tensor it wraps, and the copies share them, so the stage's trainable
    set (projector and VCE in stage 2) is switched back on once every copy exists.
    """
    if looped:
        torch.manual_seed(1)
        check = apply_adapter(share_weights(base), adapter_config("moe_lora_topk", rank, targets)).eval()
        for layer in adapter_layers(check):
            for weights in layer.lora_B.values():
                nn.init.normal_(weights.weight)
        check_looped_matches(check, make_looped(share_weights(check)))
    models = {}
    for method in (*METHODS, LOOPED) if looped else METHODS:
        torch.manual_seed(1)
        kind = "moe_lora_topk" if method == LOOPED else method
        model = apply_adapter(share_weights(base), adapter_config(kind, rank, targets))
        models[method] = make_looped(model) if method == LOOPED else model
    models[NONE] = share_weights(base)
    if stage is not None:
        for model in models.values():
            set_trainable(model, stage)
    return models


def bench_layer(preset: Preset, device: torch.device, dtype: torch.dtype) -> dict[str, Timing]:
    """Inference forward over T tokens and over one token, and forward+backward, for every method."""
    torch.manual_seed(0)
    base = OneLinear(preset.layer_dim).to(device=device, dtype=dtype).requires_grad_(False)
    models = build_variants(base, preset.rank, ["proj"], stage=None, looped=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, preset.layer_tokens, preset.layer_dim, generator=gen).to(device=device, dtype=dtype)
    one = x[:, :1].clone()
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)

    def forward(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(inputs)
        return run

    def forward_backward(model: nn.Module) -> Callable[[], None]:
        leaf = x.detach().clone().requires_grad_(True)

        def run() -> None:
            model.zero_grad(set_to_none=True)
            leaf.grad = None
            model(leaf).backward(grad)
        return run

    timings: dict[str, Timing] = {}
    for method, model in models.items():
        model.eval()
        if method != NONE:
            check_modes(model, training=False)
    # Enough back-to-back calls per sample that one sample lasts tens of milliseconds.
    for phase, inputs, number in (("forward", x, 3), ("forward_1token", one, 200)):
        cases = {m: forward(models[m], inputs) for m in models}
        timings[phase] = measure_interleaved(cases, preset.layer_repeats, preset.warmup, number, device,
                                             f"layer {phase}", default_clock(device))
    trained = (*METHODS, NONE)
    for method in trained:
        models[method].train()
        if method != NONE:
            check_modes(models[method], training=True)
    cases = {m: forward_backward(models[m]) for m in trained}
    timings["forward_backward"] = measure_interleaved(cases, preset.layer_repeats, preset.warmup, 2, device,
                                                      "layer forward_backward", default_clock(device))
    return timings


def layer_flop_ratios(preset: Preset) -> dict[str, dict[str, float]]:
    flops = {m: layer_flops(m, preset.layer_dim, preset.layer_tokens, preset.rank) for m in METHODS}
    one = {m: layer_flops(m, preset.layer_dim, 1, preset.rank)["forward"] for m in METHODS}
    return {
        "forward": {m: flops[m]["forward"] / flops[BASELINE]["forward"] for m in METHODS},
        "forward_1token": {m: one[m] / one[BASELINE] for m in METHODS},
        "forward_backward": {m: flops[m]["forward_backward"] / flops[BASELINE]["forward_backward"] for m in METHODS},
    }


# ---------------------------------------------------------------- whole model


def build_config(preset: Preset) -> tuple[LlavaConfig, int]:
    """The LLaVA config of the preset and its BOS token id."""
    if preset.arch == "llava-1.5-7b":
        return llava_15_7b_config(), 1
    tokenizer = build_tokenizer(TinyModelSection().vocab_size)
    config = tiny_llava_config(TinyModelSection(warmup_steps=0, **preset.tiny), tokenizer)
    return config, tokenizer.bos_token_id


def model_inputs(config: LlavaConfig, bos: int, batch: int, text_tokens: int, device: torch.device,
                 dtype: torch.dtype, labels: bool) -> dict[str, torch.Tensor]:
    """BOS, the image's placeholder tokens, then random text tokens (never special ids)."""
    gen = torch.Generator().manual_seed(3)
    image = torch.full((batch, config.image_seq_length), config.image_token_id)
    low = 16  # above the tiny tokenizer's special tokens
    text = torch.randint(low, config.text_config.vocab_size, (batch, text_tokens), generator=gen)
    text[text == config.image_token_id] = low
    ids = torch.cat([torch.full((batch, 1), bos), image, text], dim=1)
    side = config.vision_config.image_size
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, 3, side, side, generator=gen).to(device=device, dtype=dtype),
    }
    if labels:
        inputs["labels"] = torch.cat([torch.full((batch, 1 + image.shape[1]), -100), text], dim=1).to(device)
    return inputs


def bench_model(preset: Preset, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Timing], dict]:
    """Prompt + greedy generation, and a stage-2 train step, on a LLaVA with each adapter on q/v."""
    config, bos = build_config(preset)
    vce = VCESection()
    torch.manual_seed(0)
    with torch.device(device):
        base = LlavaForConditionalGeneration(config)
    base = attach_vce(base.to(dtype=dtype), vce)
    # The looped reference is timed at the layer only: in the whole model it adds a case to every
    # repetition (more time between the paired measurements) for a number the layer already shows.
    models = build_variants(base, preset.rank, ["q_proj", "v_proj"], stage=2, looped=False)
    prompt = model_inputs(config, bos, 1, preset.prompt_text_tokens, device, dtype, labels=False)
    batch = model_inputs(config, bos, preset.train_batch, preset.train_text_tokens, device, dtype, labels=True)
    prompt_len = prompt["input_ids"].shape[1]
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    def generate(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            return model.generate(**prompt, max_new_tokens=preset.new_tokens, min_new_tokens=preset.new_tokens,
                                  do_sample=False, pad_token_id=pad)
        return run

    def train_step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        return run

    timings: dict[str, Timing] = {}
    for method, model in models.items():
        model.eval()
        if method != NONE:
            check_modes(model, training=False)
        produced = generate(model)().shape[1] - prompt_len
        if produced != preset.new_tokens:
            raise RuntimeError(f"{method} generated {produced} tokens, expected {preset.new_tokens}")
    cases = {m: generate(models[m]) for m in models}
    # The checked generation above was each model's warm-up.
    timings["inference"] = measure_interleaved(cases, preset.inference_repeats, 0, 1, device,
                                               "model inference", default_clock(device))
    trained = (*METHODS, NONE)
    for method in trained:
        models[method].train()
        if method != NONE:
            check_modes(models[method], training=True)
    cases = {m: train_step(models[m]) for m in trained}
    timings["train_step"] = measure_interleaved(cases, preset.model_repeats, preset.warmup, 1, device,
                                                "model train_step", default_clock(device))
    flops = {m: model_flops(config, vce, m, preset.rank, preset, prompt_len) for m in METHODS}
    tc, vc = config.text_config, config.vision_config
    info = {
        "flop_ratio": {
            phase: {m: flops[m][phase] / flops[BASELINE][phase] for m in METHODS}
            for phase in ("inference", "train_step")
        },
        "sizes": {
            "text_hidden": tc.hidden_size, "text_layers": tc.num_hidden_layers,
            "text_intermediate": tc.intermediate_size, "text_heads": tc.num_attention_heads,
            "vocab": tc.vocab_size, "vision_hidden": vc.hidden_size, "vision_layers": vc.num_hidden_layers,
            "image_tokens": config.image_seq_length, "prompt_tokens": prompt_len, "new_tokens": preset.new_tokens,
            "train_batch": preset.train_batch, "train_sequence": batch["input_ids"].shape[1],
            "base_params": sum(p.numel() for p in base.parameters()),
            "adapter_params": {m: sum(p.numel() for n, p in models[m].named_parameters() if "lora_" in n)
                               for m in METHODS},
        },
    }
    return timings, info


# ---------------------------------------------------------------- report


def summarize(timings: dict[str, Timing]) -> dict[str, dict[str, Any]]:
    """Baseline ratios of the methods, and seconds, paired-ratio spread and looped reference per phase."""
    out: dict[str, dict[str, Any]] = {"ratios": {}, "seconds": {}, "wall_seconds": {}, "iqr": {}, "reference": {}}
    for phase, timing in timings.items():
        ratios = timing.ratios(BASELINE)
        out["ratios"][phase] = {m: ratios[m] for m in METHODS}
        out["seconds"][phase] = {m: timing.median(m) for m in timing.samples}
        out["wall_seconds"][phase] = {m: statistics.median(v) for m, v in timing.wall.items()}
        out["iqr"][phase] = {m: list(v) for m, v in timing.ratio_spread(BASELINE).items()}
        reference = {f"{NONE}/lora": ratios[NONE]}
        # Even a free Dual-LoRA could not go below the bare model: the floor of dual_lora / baseline.
        reference |= {f"floor dual_lora/{m}": timing.ratios(m)[NONE] for m in MOE_BASELINES}
        if LOOPED in timing.samples:
            reference[f"{LOOPED}/lora"] = ratios[LOOPED]
            reference[f"dual_lora/{LOOPED}"] = timing.ratios(LOOPED)["dual_lora"]
        out["reference"][phase] = reference
    return out


def targets(inference: Timing) -> dict[str, dict[str, Any]]:
    """Dual-LoRA's whole-model inference ratio against each target, paired per repetition."""
    out = {"dual_lora/lora": {"target": TARGET_VS_LORA, "measured": inference.ratios(BASELINE)["dual_lora"]}}
    for moe in MOE_BASELINES:
        out[f"dual_lora/{moe}"] = {"target": TARGET_VS_MOE, "measured": inference.ratios(moe)["dual_lora"]}
    for entry in out.values():
        entry["met"] = bool(entry["measured"] <= entry["target"])
    return out


def print_report(payload: dict[str, Any]) -> None:
    flops = payload["flop_ratio"]
    model, layer = payload["details"]["whole_model"], payload["details"]["layer"]
    print("\nWhole model (ratio to LoRA: median of per-repetition paired ratios; FLOPs: analytic ratio)")
    rows = []
    for m in METHODS:
        row: list[Any] = [m]
        for phase in ("inference", "train_step"):
            row += [model["ratios"][phase][m], flops["whole_model"][phase][m], seconds(model["seconds"][phase][m])]
        rows.append(row)
    print(format_table(["method", "inference", "FLOPs", "median", "train_step", "FLOPs", "median"], rows))
    print("\nLayer (one d x d linear)")
    phases = ("forward", "forward_1token", "forward_backward")
    rows = []
    for m in METHODS:
        row = [m]
        for phase in phases:
            row += [layer["ratios"][phase][m], flops["layer"][phase][m], seconds(layer["seconds"][phase][m])]
        rows.append(row)
    headers = ["method", "forward", "FLOPs", "median", "fwd 1 token", "FLOPs", "median", "fwd+bwd", "FLOPs",
               "median"]
    print(format_table(headers, rows))
    print(f"\nReferences: no adapter ({NONE}; floor = {NONE}/baseline), top-k MoE-LoRA with a per-expert loop "
          f"({LOOPED}, layer inference)")
    keys = list(dict.fromkeys(k for level in (model, layer) for ref in level["reference"].values() for k in ref))
    rows = [[f"{name} {phase}", *(ref.get(k, "-") for k in keys)]
            for name, level in (("whole_model", model), ("layer", layer))
            for phase, ref in level["reference"].items()]
    print(format_table(["phase", *keys], rows))
    print("\nTargets (whole-model inference, paired ratios)")
    rows = [[k, v["target"], v["measured"], "yes" if v["met"] else "no"] for k, v in payload["targets"].items()]
    print(format_table(["ratio", "target", "measured", "met"], rows))


def run(preset_name: str, device: str | None = None, dtype: str | None = None,
        json_path: str | None = None, threads: int | None = None) -> dict[str, Any]:
    preset = PRESETS[preset_name]
    threads = preset.threads if threads is None else threads
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device or preset.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset_name!r} needs a CUDA device; none is available (try --preset cpu)")
    torch_dtype = resolve_dtype(dtype or preset.dtype)
    model_timings, model_info = bench_model(preset, dev, torch_dtype)
    layer_timings = bench_layer(preset, dev, torch_dtype)
    whole, layer = summarize(model_timings), summarize(layer_timings)
    payload: dict[str, Any] = {
        "whole_model": whole["ratios"],
        "layer": layer["ratios"],
        "flop_ratio": {"whole_model": model_info["flop_ratio"], "layer": layer_flop_ratios(preset)},
        "targets": targets(model_timings["inference"]),
        "machine": machine(),
        "sizes": {
            "preset": preset_name, "device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."),
            **{k: v for k, v in asdict(preset).items() if k not in ("device", "dtype", "tiny")},
            "threads": torch.get_num_threads(), "clock": default_clock(dev),
            "expert_ranks": expert_ranks(preset.rank), "top_k": TOP_K, "dropout": DROPOUT,
            "whole_model": model_info["sizes"],
        },
        "details": {"whole_model": whole, "layer": layer},
    }
    write_json(json_path, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--dtype", help="override the preset's dtype (float32, bfloat16, float16)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    payload = run("quick" if args.quick else args.preset, args.device, args.dtype, args.json, args.threads)
    print_report(payload)


if __name__ == "__main__":
    main()
