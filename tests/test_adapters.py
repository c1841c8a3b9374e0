"""The adapter switch: config mapping, target scoping on a LLaVA, training every method, loading back."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from components.config import AdapterSection
from components.model.adapters.apply import (
    apply_adapter,
    config_class_for,
    is_adapter_param,
    load_adapter,
    peft_config_for,
    target_regex,
)
from components.model.adapters.dual_lora import DualLoraConfig
from components.model.adapters.moe_lora import MoeLoraSoftmaxConfig, MoeLoraTopkConfig, RodeLoraConfig

TYPES = ["lora", "dual_lora", "moe_lora_topk", "moe_lora_softmax", "rode"]
SMALL = dict(r=8, alpha=16, dropout=0.0, expert_rank=4, num_experts=4, top_k=2, rode_ranks=[4, 2, 1, 1])


def text_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text_config(), image_token_id=63)
    )


def adapted_layers(model: torch.nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))


@pytest.mark.parametrize("kind", TYPES)
def test_default_targets_are_the_language_models_q_and_v(kind):
    model = apply_adapter(tiny_llava(), AdapterSection(type=kind, **SMALL))
    expected = sorted(
        f"base_model.model.model.language_model.layers.{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj", "v_proj")
    )
    assert adapted_layers(model) == expected
    trainable = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(expected)  # vision tower (which also has q_proj/v_proj) and projector untouched


def test_target_names_and_regexes():
    pattern = target_regex(["q_proj", "v_proj"])
    names = {
        "model.language_model.layers.0.self_attn.q_proj": True,
        "model.layers.3.self_attn.v_proj": True,  # a bare causal LM
        "q_proj": True,
        "model.vision_tower.encoder.layers.0.self_attn.q_proj": False,
        "model.multi_modal_projector.vce.q_proj": False,
        "model.language_model.layers.0.self_attn.k_proj": False,
        "model.language_model.layers.0.self_attn.xq_proj": False,
    }
    assert {n: bool(re.fullmatch(pattern, n)) for n in names} == names
    dotted = target_regex(["mlp.down_proj"])
    assert re.fullmatch(dotted, "model.language_model.layers.1.mlp.down_proj")
    assert not re.fullmatch(dotted, "model.language_model.layers.1.mlpxdown_proj")
    custom = target_regex([r".*vision_tower.*\.q_proj", "o_proj"])  # a regex is the user's own scope
    assert re.fullmatch(custom, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert re.fullmatch(custom, "model.language_model.layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match="target_modules entry .* is not a valid regex"):
        target_regex(["q_proj(["])


def test_regex_targets_reach_any_linear():
    targets = [r".*language_model.*mlp\.\w+_proj"]
    model = apply_adapter(tiny_llava(), AdapterSection(type="dual_lora", target_modules=targets, **SMALL))
    assert len(adapted_layers(model)) == 2 * 3


def test_non_linear_targets_are_refused():
    """PEFT would put a plain LoRA on an embedding; a Dual-LoRA run must not silently contain one."""
    cfg = AdapterSection(type="dual_lora", target_modules=[r".*embed_tokens", "q_proj"], **SMALL)
    with pytest.raises(ValueError, match="cannot adapt .*nn.Linear only.*embed_tokens"):
        apply_adapter(LlamaForCausalLM(text_config()), cfg)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("lora", LoraConfig),
        ("dual_lora", DualLoraConfig),
        ("moe_lora_topk", MoeLoraTopkConfig),
        ("moe_lora_softmax", MoeLoraSoftmaxConfig),
        ("rode", RodeLoraConfig),
    ],
)
def test_peft_config_for_maps_every_field(kind, cls):
    cfg = AdapterSection(
        type=kind,
        r=16,
        alpha=32,
        dropout=0.1,
        use_rslora=True,
        skill_norm=False,
        task_activation="none",
        num_experts=3,
        expert_rank=8,
        top_k=1,
        rode_ranks=[16, 8],
    )
    peft_cfg = peft_config_for(cfg)
    assert type(peft_cfg) is cls
    assert (peft_cfg.lora_alpha, peft_cfg.lora_dropout, peft_cfg.use_rslora) == (32, 0.1, True)
    assert isinstance(peft_cfg.target_modules, str)
    expected = {
        "lora": {"r": 16},
        "dual_lora": {"r": 16, "skill_norm": False, "task_activation": "none"},
        "moe_lora_topk": {"expert_ranks": [8, 8, 8], "top_k": 1, "r": 24},
        "moe_lora_softmax": {"expert_ranks": [8, 8, 8], "r": 24},
        "rode": {"expert_ranks": [16, 8], "r": 24},
    }[kind]
    assert {k: getattr(peft_cfg, k) for k in expected} == expected


def test_none_returns_the_model_unchanged():
    model = LlamaForCausalLM(text_config())
    assert apply_adapter(model, AdapterSection(type="none")) is model
    with pytest.raises(ValueError, match="adapter.type 'none' has no PEFT config"):
        peft_config_for(AdapterSection(type="none"))


@pytest.mark.parametrize("kind", TYPES)
def test_every_method_trains_a_tiny_causal_lm(kind):
    torch.manual_seed(0)
    model = apply_adapter(LlamaForCausalLM(text_config()), AdapterSection(type=kind, **SMALL))
    ids = torch.randint(0, 64, (4, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(is_adapter_param(n) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 15  # falling, not a lucky last step


@pytest.mark.parametrize("kind", TYPES)
def test_load_adapter_picks_the_saved_method(kind, tmp_path):
    torch.manual_seed(0)
    model = apply_adapter(LlamaForCausalLM(text_config()), AdapterSection(type=kind, **SMALL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_(0.0, 0.2)
    ids = torch.randint(0, 64, (2, 10))
    expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    restored = load_adapter(LlamaForCausalLM(text_config()), tmp_path)
    assert isinstance(restored, PeftModel)
    assert type(restored.peft_config["default"]) is type(model.peft_config["default"])
    assert not any(p.requires_grad for p in restored.parameters())  # inference unless is_trainable
    torch.testing.assert_close(restored.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_config_class_for_refuses_unknown_adapters(tmp_path):
    assert config_class_for({"peft_type": "LORA"}) is LoraConfig
    assert config_class_for({"peft_type": "LORA", "adapter_method": "rode"}) is RodeLoraConfig
    with pytest.raises(ValueError, match="unknown adapter_method 'mystery'"):
        config_class_for({"peft_type": "LORA", "adapter_method": "mystery"})
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        config_class_for({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(LlamaForCausalLM(text_config()), tmp_path)


def test_is_adapter_param():
    assert is_adapter_param("base_model.model.model.layers.0.self_attn.q_proj.lora_S.default.weight")
    assert is_adapter_param("model.q_proj.lora_norm.default.bias")
    assert not is_adapter_param("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    assert not is_adapter_param("model.multi_modal_projector.vce.value_proj.weight")
    assert not is_adapter_param("model.flora_gate.weight")
