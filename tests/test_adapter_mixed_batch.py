"""Serving several adapters at once: mixed-adapter batches, and PEFT's plain loaders on duet folders."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_adapters import SMALL, TYPES, text_config
from test_dual_lora import TwoProj
from transformers import LlamaForCausalLM

from components.config import AdapterSection
from components.model.adapters.apply import CUSTOM_CONFIGS, is_adapter_param, peft_config_for
from components.model.adapters.base import AdapterSlot

D = 16
NAMES = ("alpha", "beta")  # not substrings of PEFT's "lora_" prefix, which PEFT warns about
# A sub-batch runs through GEMMs of other shapes than the full batch: float32 rounding (a few ulps of
# outputs around 10), nothing more.
FP32 = dict(rtol=1e-5, atol=1e-6)


def config_for(kind: str, seed: int) -> LoraConfig:
    """A config of `kind` for TwoProj; `seed` varies the rank so the two adapters differ in shape too.

    Dropout is on: in eval mode (the only mode PEFT allows adapter_names in) it must not act.
    """
    small = {**SMALL, "r": 4 + 2 * seed, "expert_rank": 2 + seed, "dropout": 0.1}
    return peft_config_for(AdapterSection(type=kind, target_modules=["q_proj", "v_proj"], **small))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Trained-looking adapter tensors: non-zero B, routers with preferences."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def two_adapters(kind: str, dtype: torch.dtype = torch.float32) -> PeftModel:
    """TwoProj (in `dtype`) with adapters 'alpha' and 'beta' of `kind`, both random, in eval mode."""
    torch.manual_seed(0)
    model = get_peft_model(TwoProj().to(dtype), config_for(kind, 0), adapter_name=NAMES[0])
    model.add_adapter(NAMES[1], config_for(kind, 1))
    randomize(model, 1)
    return model.eval()


def fields(config: LoraConfig) -> dict:
    """The config's fields but those saving or loading sets (inference mode, the base model's class)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("inference_mode", "auto_mapping")}


def alone(model: PeftModel, name: str, x: torch.Tensor) -> torch.Tensor:
    model.set_adapter(name)
    return model(x)


@pytest.mark.parametrize("kind", TYPES)
def test_each_row_gets_its_own_adapter(kind):
    model = two_adapters(kind)
    x = torch.randn(5, 3, D)
    names = ["alpha", "__base__", "beta", "beta", "alpha"]
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        expected = {"__base__": base, **{n: alone(model, n, x) for n in NAMES}}
        model.set_adapter("alpha")
        mixed = model(x, adapter_names=names)
    assert (expected["alpha"] - base).abs().max() > 0.1  # the adapters really change the output
    assert (expected["alpha"] - expected["beta"]).abs().max() > 0.1  # and differ from each other
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], **FP32)


@pytest.mark.parametrize("kind", sorted(CUSTOM_CONFIGS))
def test_every_duet_layer_lists_its_adapters_where_peft_looks(kind):
    """PEFT checks mixed-batch names against lora_A; the entries hold no tensors, so files do not change."""
    model = two_adapters(kind)
    layer = model.base_model.model.q_proj
    assert set(layer.lora_A) == set(NAMES)
    model.delete_adapter("beta")
    assert set(layer.lora_A) == {"alpha"}
    slots = [m for m in model.modules() if isinstance(m, AdapterSlot)]
    assert len(slots) == (2 if kind == "dual_lora" else 0)  # q_proj and v_proj; the mixtures have a real A
    assert not any(list(slot.parameters()) or list(slot.buffers()) for slot in slots)


@pytest.mark.parametrize("kind", TYPES)
def test_unknown_names_and_training_mode_are_refused_as_peft_does(kind):
    model = two_adapters(kind)
    x = torch.randn(2, D)
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): gamma"):
        model(x, adapter_names=["alpha", "gamma"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(x, adapter_names=["alpha"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=["alpha", "beta"])


@pytest.mark.parametrize("kind", TYPES)
def test_generate_with_mixed_adapters_equals_each_adapter_alone(kind):
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(text_config()), peft_config_for(AdapterSection(type=kind, **SMALL))
    )
    model.add_adapter("beta", peft_config_for(AdapterSection(type=kind, **SMALL)))
    randomize(model, 2)
    model.eval()
    prompts = torch.randint(0, 64, (3, 6))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with model.disable_adapter():
            base = model.generate(input_ids=prompts, **options)
        each = {}
        for name in ("default", "beta"):
            model.set_adapter(name)
            each[name] = model.generate(input_ids=prompts, **options)
        names = ["beta", "__base__", "default"]
        mixed = model.generate(input_ids=prompts, adapter_names=names, **options)
    assert not torch.equal(each["default"], each["beta"])  # the adapters steer generation differently
    expected = torch.stack([each["beta"][0], base[1], each["default"][2]])
    assert torch.equal(mixed, expected)


@pytest.mark.parametrize("kind", sorted(CUSTOM_CONFIGS))
def test_plain_from_pretrained_and_load_adapter_rebuild_the_saved_method(kind, tmp_path):
    """Without config=, PEFT's loaders would build a plain LoRA; they must rebuild the duet method."""
    model = two_adapters(kind)
    x = torch.randn(4, D)
    with torch.no_grad():
        expected = {n: alone(model, n, x) for n in NAMES}
        with model.disable_adapter():
            expected["__base__"] = model(x)
    model.save_pretrained(tmp_path)  # no adapter is called "default": each gets its own folder
    torch.manual_seed(0)
    restored = PeftModel.from_pretrained(TwoProj(), tmp_path / "alpha", adapter_name="alpha")
    restored.load_adapter(tmp_path / "beta", adapter_name="beta")
    restored.eval()
    for name in NAMES:
        assert type(restored.peft_config[name]) is type(model.peft_config[name])
        assert fields(restored.peft_config[name]) == fields(model.peft_config[name])
    with torch.no_grad():
        for name in NAMES:
            torch.testing.assert_close(alone(restored, name, x), expected[name], rtol=0, atol=0)
        names = ["beta", "alpha", "__base__", "alpha"]
        mixed = restored(x, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], **FP32)


def test_plain_lora_folders_still_load_as_peft_loads_them(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(TwoProj(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(TwoProj(), tmp_path)
    assert type(restored.peft_config["default"]) is LoraConfig
    assert LoraConfig.from_pretrained(str(tmp_path)).r == 2


def test_an_unknown_saved_method_is_refused_by_name(tmp_path):
    get_peft_model(TwoProj(), config_for("dual_lora", 0)).save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_text(file.read_text().replace('"dual_lora"', '"mystery"'))
    with pytest.raises(ValueError, match="unknown adapter_method 'mystery'"):
        PeftModel.from_pretrained(TwoProj(), tmp_path)


def test_a_plain_lora_cannot_join_a_duet_layer(tmp_path):
    """The other direction: a plain LoRA folder loaded into a Dual-LoRA model is refused, not mixed in."""
    get_peft_model(TwoProj(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = get_peft_model(TwoProj(), config_for("dual_lora", 0))
    with pytest.raises(TypeError, match="Dual-LoRA layer can only hold Dual-LoRA adapters"):
        model.load_adapter(tmp_path, adapter_name="plain")


@pytest.mark.parametrize("kind", sorted(CUSTOM_CONFIGS))
def test_half_precision_rows_match_exactly(kind):
    """A bf16 base with fp32 adapter weights: the mixed path rounds exactly as the plain forward does."""
    model = two_adapters(kind, torch.bfloat16)
    assert model.base_model.model.q_proj.lora_B["alpha"].weight.dtype == torch.float32  # PEFT's autocast
    x = torch.randn(6, 4, D, dtype=torch.bfloat16)
    names = ["alpha", "beta"] * 3
    with torch.no_grad():
        expected = {n: alone(model, n, x) for n in NAMES}
        mixed = model(x, adapter_names=names)
    assert mixed.dtype == torch.bfloat16
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=0, atol=0)
