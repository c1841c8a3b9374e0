"""Dual-LoRA as a PEFT method: the equation, init, fast path, save/load, parameter count, merge refusal."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from components.model.adapters.apply import load_adapter
from components.model.adapters.base import NotMergeableError
from components.model.adapters.dual_lora import DualLoraConfig, DualLoraLinear

D = 16


class TwoProj(nn.Module):
    """Smallest model with the paper's targets: two d x d projections."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + 2 * self.v_proj(x)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    return LlamaForCausalLM(cfg).eval()


def dual(**kwargs) -> DualLoraConfig:
    defaults = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return DualLoraConfig(**{**defaults, **kwargs})


def randomize(model: nn.Module) -> None:
    """Give every adapter tensor (B and the LayerNorm affine included) random non-trivial values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)


def by_hand(layer: DualLoraLinear, x: torch.Tensor, skill_mask: torch.Tensor | None = None) -> torch.Tensor:
    """z = W x + b + scale * B( LN(S x') * relu(T x) ), written out with plain tensor ops."""
    base = layer.base_layer
    s_w, t_w = layer.lora_S["default"].weight, layer.lora_T["default"].weight
    x_skill = x if skill_mask is None else x * skill_mask
    s = x_skill @ s_w.T
    t = x @ t_w.T
    if layer.skill_norm["default"]:
        norm = layer.lora_norm["default"]
        mean = s.mean(-1, keepdim=True)
        var = s.var(-1, unbiased=False, keepdim=True)
        s = (s - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    if layer.task_activation["default"] == "relu":
        t = t.clamp_min(0)
    r, alpha = layer.r["default"], layer.lora_alpha["default"]
    scale = alpha / (math.sqrt(r) if layer.use_rslora["default"] else r)
    return x @ base.weight.T + base.bias + scale * (s * t) @ layer.lora_B["default"].weight.T


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("task_activation", ["relu", "none"])
@pytest.mark.parametrize("skill_norm", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_matches_the_equation(skill_norm, task_activation, use_rslora, fused, monkeypatch):
    torch.manual_seed(0)
    model = get_peft_model(
        TwoProj(), dual(skill_norm=skill_norm, task_activation=task_activation, use_rslora=use_rslora)
    )
    randomize(model)
    layer = model.base_model.model.q_proj
    assert isinstance(layer, DualLoraLinear)
    if not fused:
        monkeypatch.setattr(layer, "_fusable", lambda *a: False)
    x = torch.randn(3, 5, D)
    expected = by_hand(layer, x)
    assert not torch.allclose(expected, layer.base_layer(x), atol=1e-3)  # the adapter term is really there
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert (len(layer.lora_norm) == 1) is skill_norm


def test_fused_path_equals_plain_path(monkeypatch):
    torch.manual_seed(1)
    model = get_peft_model(TwoProj(64), dual(r=8, lora_dropout=0.1, target_modules=["q_proj"])).eval()
    randomize(model)
    layer = model.base_model.model.q_proj
    x = torch.randn(2, 7, 64)
    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda inp, w, b=None: calls.append(w.shape) or real_linear(inp, w, b))
    fused = layer(x)
    assert (16, 64) in calls  # one GEMM over the stacked (2r x d_in) weight
    monkeypatch.setattr(layer, "_fusable", lambda *a: False)
    plain = layer(x)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


def test_inference_reuses_the_stacked_weight_until_it_changes():
    torch.manual_seed(6)
    model = get_peft_model(TwoProj(), dual(target_modules=["q_proj"])).eval()
    randomize(model)
    layer = model.base_model.model.q_proj
    x = torch.randn(3, D)
    with torch.no_grad():
        layer(x)
        stacked = layer._caches["stacked:default"][1]
        torch.testing.assert_close(layer(x), by_hand(layer, x))
        assert layer._caches["stacked:default"][1] is stacked  # reused, not rebuilt
        layer.lora_T["default"].weight.mul_(-1)  # an in-place update, like an optimizer step
        torch.testing.assert_close(layer(x), by_hand(layer, x))
    layer(x).sum().backward()  # with autograd the weights get gradients and no copy is kept
    assert layer.lora_S["default"].weight.grad is not None and not layer._caches
    model.delete_adapter("default")
    assert not layer._caches


class ZeroingDropout(nn.Dropout):
    """A 'dropout' that drops everything, to see which path it is applied to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_dropout_only_on_the_skill_path():
    torch.manual_seed(2)
    model = get_peft_model(TwoProj(), dual(lora_dropout=0.5, target_modules=["q_proj"])).train()
    randomize(model)
    layer = model.base_model.model.q_proj
    layer.lora_dropout["default"] = ZeroingDropout(0.5)
    x = torch.randn(4, D)
    torch.testing.assert_close(layer(x), by_hand(layer, x, skill_mask=torch.zeros_like(x)))
    # The task path still sees x: with LN's bias as the only skill signal the term is non-zero.
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_init_equals_base_model_and_follows_lora_init():
    base = tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    expected = base(input_ids=ids).logits
    model = get_peft_model(base, dual(r=8, lora_alpha=16, lora_dropout=0.05)).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(32)  # kaiming-uniform(a=sqrt(5)) bound, as for LoRA's A
    for space in (layer.lora_S, layer.lora_T):
        w = space["default"].weight
        assert w.abs().max() <= bound and w.std() > bound / 4
    assert not torch.equal(layer.lora_S["default"].weight, layer.lora_T["default"].weight)


def test_trainable_parameters_follow_the_formula(capsys):
    r, layers = 8, 2
    model = get_peft_model(tiny_llama(), dual(r=r, lora_alpha=16))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for _, p in trainable)
    assert count == layers * 2 * (3 * r * 32 + 2 * r)  # q_proj and v_proj are 32 x 32
    assert all("lora_" in n for n, _ in trainable)
    model.print_trainable_parameters()
    assert f"trainable params: {count:,}" in capsys.readouterr().out


def test_param_count_at_llava_width():
    """Paper section 4.1: one d x d layer at d = 4096 and r = 1 adds 3 d + 2 parameters."""

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(4096, 4096, bias=False, device="meta")

    model = get_peft_model(One(), dual(r=1, lora_alpha=2, target_modules=["q_proj"]))
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert added == 3 * 4096 + 2


def test_save_and_load_round_trip(tmp_path):
    ids = torch.randint(0, 64, (2, 9))
    model = get_peft_model(tiny_llama(), dual(r=4, skill_norm=False, task_activation="none", use_rslora=True))
    randomize(model)
    model.eval()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert {k.rsplit(".", 2)[-2] for k in saved} == {"lora_S", "lora_T", "lora_B"}  # no LN: skill_norm off
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapter_method"] == "dual_lora" and meta["task_activation"] == "none"

    config = DualLoraConfig.from_pretrained(tmp_path)
    assert isinstance(config, DualLoraConfig)
    assert (config.skill_norm, config.task_activation, config.use_rslora, config.r) == (
        False,
        "none",
        True,
        4,
    )
    restored = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config).eval()
    torch.testing.assert_close(restored(input_ids=ids).logits, expected, rtol=0, atol=0)

    through_switch = load_adapter(tiny_llama(), tmp_path)
    assert isinstance(through_switch.peft_config["default"], DualLoraConfig)
    torch.testing.assert_close(through_switch.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_from_pretrained_refuses_other_methods(tmp_path):
    get_peft_model(TwoProj(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="plain LoRA.*load_adapter"):
        DualLoraConfig.from_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        DualLoraConfig.from_pretrained(tmp_path / "missing")


def test_merge_is_refused_with_a_reason():
    model = get_peft_model(TwoProj(), dual())
    for call in (model.merge_and_unload, model.base_model.merge_adapter, model.base_model.unmerge_adapter):
        with pytest.raises(NotMergeableError, match="cannot be merged.*depends on the input"):
            call()
    assert isinstance(model.unload().q_proj, nn.Linear)  # dropping the adapter without merging still works


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="task_activation must be one of"):
        dual(task_activation="gelu")
    with pytest.raises(ValueError, match="use_dora"):
        dual(use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        dual(init_lora_weights="pissa")
    assert dual()._custom_modules == {nn.Linear: DualLoraLinear}  # constructing registers the layer


def test_both_constructor_call_styles():
    torch.manual_seed(3)
    flat = DualLoraLinear(nn.Linear(D, D), "default", r=4, lora_alpha=8, lora_dropout=0.0, skill_norm=False)
    styled = DualLoraLinear(nn.Linear(D, D), "default", config=dual(skill_norm=False), r=4, lora_alpha=8)
    for layer in (flat, styled):
        assert layer.r["default"] == 4 and layer.scaling["default"] == 2.0
        assert not layer.skill_norm["default"] and len(layer.lora_norm) == 0
        assert layer.lora_S["default"].weight.shape == (4, D) and layer.lora_B["default"].weight.shape == (
            D,
            4,
        )
    with pytest.raises(TypeError, match="Dual-LoRA adapters"):
        DualLoraLinear(nn.Linear(D, D), "default", config=LoraConfig(r=4), r=4, lora_alpha=8)


def test_multiple_adapters_and_disabling():
    torch.manual_seed(4)
    model = get_peft_model(TwoProj(), dual())
    model.add_adapter("other", dual(r=2, task_activation="none"))
    randomize(model)
    model.eval()
    layer = model.base_model.model.q_proj
    x = torch.randn(3, D)
    base = layer.base_layer(x)
    delta = {}
    for name in ("default", "other"):
        model.base_model.set_adapter(name)
        delta[name] = layer(x) - base
    model.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(layer(x), base + delta["default"] + delta["other"])
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), base)
    mixed = layer(x, adapter_names=["default", "__base__", "other"])
    torch.testing.assert_close(
        mixed, base + torch.stack([delta["default"][0], 0 * base[1], delta["other"][2]])
    )
    with pytest.raises(TypeError, match="Dual-LoRA adapters"):
        model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))


def test_half_precision_base_keeps_its_dtype():
    torch.manual_seed(5)
    model = get_peft_model(TwoProj().to(torch.bfloat16), dual())
    layer = model.base_model.model.q_proj
    assert layer.lora_S["default"].weight.dtype == torch.float32  # PEFT's autocast of adapter weights
    out = model(torch.randn(2, D, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
