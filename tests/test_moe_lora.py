"""Mixture-of-LoRA-experts baselines: stacked GEMMs equal a per-expert loop; routing, init, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from components.model.adapters.apply import load_adapter
from components.model.adapters.base import NotMergeableError
from components.model.adapters.moe_lora import (
    MixtureLoraConfig,
    MixtureLoraLinear,
    MoeLoraSoftmaxConfig,
    MoeLoraSoftmaxLinear,
    MoeLoraTopkConfig,
    MoeLoraTopkLinear,
    RodeLoraConfig,
    RodeLoraLinear,
    expand_gates,
)

D_IN, D_OUT = 24, 20
COMMON = dict(lora_alpha=16, target_modules=["proj"], lora_dropout=0.0)
CONFIGS = {
    "topk": lambda **kw: MoeLoraTopkConfig(**{**COMMON, "expert_ranks": [4, 4, 4, 4], "top_k": 2, **kw}),
    "softmax": lambda **kw: MoeLoraSoftmaxConfig(**{**COMMON, "expert_ranks": [4, 4, 4], **kw}),
    "rode": lambda **kw: RodeLoraConfig(**{**COMMON, "expert_ranks": [8, 4, 2, 2], **kw}),
}


class OneProj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapted(kind: str, seed: int = 0, **kw) -> tuple[nn.Module, MixtureLoraLinear]:
    torch.manual_seed(seed)
    model = get_peft_model(OneProj(), CONFIGS[kind](**kw))
    with torch.no_grad():  # trained-looking weights: non-zero B, a router with clear preferences
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    return model.eval(), model.base_model.model.proj


def naive_gates(logits: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """Reference routing written independently of the layer (sort + mask instead of topk + scatter)."""
    if kind == "rode":
        return logits.clamp_min(0)
    probs = logits.softmax(-1)
    if kind == "softmax":
        return probs
    order = logits.argsort(-1, descending=True)
    keep = torch.zeros_like(probs).scatter(-1, order[..., :k], 1.0)
    return probs * keep / (probs * keep).sum(-1, keepdim=True)


def naive_forward(layer: MixtureLoraLinear, x: torch.Tensor, kind: str) -> torch.Tensor:
    """W x + b + sum_e g_e * scale * B_e A_e x, one expert at a time."""
    name = "default"
    ranks = layer.expert_ranks[name]
    a_blocks = layer.lora_A[name].weight.split(list(ranks), dim=0)
    b_blocks = layer.lora_B[name].weight.split(list(ranks), dim=1)
    gates = naive_gates(x @ layer.lora_router[name].weight.T, kind, layer.top_k[name] or 0)
    out = layer.base_layer(x)
    for e in range(len(ranks)):
        expert = (x @ a_blocks[e].T) @ b_blocks[e].T
        out = out + gates[..., e : e + 1] * layer.scaling[name] * expert
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_stacked_forward_equals_per_expert_loop(kind, fused, monkeypatch):
    model, layer = adapted(kind)
    if not fused:
        monkeypatch.setattr(layer, "_fusable", lambda *a: False)
    x = torch.randn(3, 6, D_IN)
    expected = naive_forward(layer, x, kind)
    assert not torch.allclose(expected, layer.base_layer(x), atol=1e-3)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_uses_the_total_rank(use_rslora):
    _, layer = adapted("rode", use_rslora=use_rslora)
    total = 8 + 4 + 2 + 2
    assert layer.r["default"] == total
    assert layer.scaling["default"] == pytest.approx(16 / (total**0.5 if use_rslora else total))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_uses_exactly_k_experts_per_token(k):
    _, layer = adapted("topk", top_k=k)
    gates = layer.gates("default", torch.randn(5, 7, D_IN))
    assert gates.shape == (5, 7, 4)
    assert torch.equal((gates > 0).sum(-1), torch.full((5, 7), k))
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 7))


def test_dense_and_rectified_gates():
    x = torch.randn(4, 9, D_IN)
    softmax = adapted("softmax")[1].gates("default", x)
    assert (softmax > 0).all() and torch.allclose(softmax.sum(-1), torch.ones(4, 9))
    rode = adapted("rode")[1].gates("default", x)
    assert (
        (rode >= 0).all() and (rode == 0).any() and (rode > 0).any()
    )  # rectified: some experts switched off


def test_expand_gates_repeats_each_gate_over_its_rank():
    gates = torch.randn(2, 3, 4)
    for ranks in [(2, 2, 2, 2), (5, 3, 1, 1)]:
        expected = gates.repeat_interleave(torch.tensor(ranks), dim=-1)
        torch.testing.assert_close(expand_gates(gates, ranks), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_init_equals_base_and_layout(kind):
    torch.manual_seed(0)
    base = OneProj()
    x = torch.randn(2, 5, D_IN)
    expected = base(x)
    cfg = CONFIGS[kind](lora_dropout=0.1)
    model = get_peft_model(base, cfg).eval()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    layer = model.base_model.model.proj
    total, experts = sum(cfg.expert_ranks), len(cfg.expert_ranks)
    assert type(layer) is cfg.layer_class()
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_router["default"].weight) > 0  # ReLU gates must not start dead
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == total * D_IN + D_OUT * total + experts * D_IN


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_and_load_round_trip(kind, tmp_path):
    model, _ = adapted(kind, seed=1)
    x = torch.randn(2, 5, D_IN)
    expected = model(x)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.split(".")[-2] for k in saved} == {"lora_A", "lora_B", "lora_router"}
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapter_method"] == type(model.peft_config["default"]).METHOD
    torch.manual_seed(1)
    restored = load_adapter(OneProj(), tmp_path)
    assert type(restored.peft_config["default"]) is type(model.peft_config["default"])
    restored.base_model.model.proj.base_layer.load_state_dict(
        model.base_model.model.proj.base_layer.state_dict()
    )
    torch.testing.assert_close(restored.eval()(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_merge_is_refused(kind):
    model, _ = adapted(kind)
    with pytest.raises(NotMergeableError, match="cannot be merged"):
        model.merge_and_unload()


def test_flattened_constructor_style_builds_the_class_defaults():
    for layer_cls, ranks in [
        (MoeLoraTopkLinear, (16,) * 4),
        (MoeLoraSoftmaxLinear, (16,) * 4),
        (RodeLoraLinear, (32, 16, 8, 8)),
    ]:
        layer = layer_cls(nn.Linear(D_IN, D_OUT), "default", r=8, lora_alpha=64, lora_dropout=0.0)
        assert layer.expert_ranks["default"] == ranks and layer.r["default"] == sum(ranks)
        assert layer.lora_A["default"].weight.shape == (sum(ranks), D_IN)
    assert adapted("topk")[1].top_k["default"] == 2 and adapted("rode")[1].top_k["default"] is None


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of experts"):
        MoeLoraTopkConfig(expert_ranks=[4, 4], top_k=3)
    with pytest.raises(ValueError, match="expert_ranks must be a non-empty list of positive ints"):
        RodeLoraConfig(expert_ranks=[8, 0])
    with pytest.raises(ValueError, match="rank_pattern"):
        MoeLoraSoftmaxConfig(rank_pattern={"proj": 4})
    with pytest.raises(TypeError, match="abstract"):
        MixtureLoraConfig()
    assert MoeLoraTopkConfig().r == 64 and RodeLoraConfig().r == 64


def test_meta_device_model_can_be_adapted():
    """Size checks build the 7B config on `meta`; the adapter must build there too."""
    with torch.device("meta"):
        model = get_peft_model(OneProj(), CONFIGS["rode"]())
    assert all(p.device.type == "meta" for p in model.parameters())


def test_trains_inside_a_causal_lm():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=64,
        )
    )
    model = get_peft_model(
        lm,
        MoeLoraTopkConfig(
            expert_ranks=[4, 4, 4, 4], lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
    )
    ids = torch.randint(0, 64, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    router = model.base_model.model.model.layers[0].self_attn.q_proj.lora_router["default"].weight
    assert router.grad is not None and router.grad.abs().sum() > 0  # the router learns once B is non-zero
