"""LLaVA assembly: VCE in the image path, stage trainable sets, artifacts, the meta-device inspector."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import AdapterSection, DuetConfig, load_config
from components.errors import ArtifactError
from components.model.adapters.apply import is_adapter_param
from components.model.artifact import (
    ARTIFACT_WEIGHTS,
    check_compatible,
    load_stage_model,
    save_stage_artifact,
)
from components.model.llava import VCEProjector, local_checkpoint, projector_module
from components.model.sizes import build_meta_model, component_sizes
from components.model.stages import build_model, parameter_groups

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ["lora", "dual_lora", "moe_lora_topk", "moe_lora_softmax", "rode"]


def _batch(model: torch.nn.Module, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    """A fixed multimodal batch: image tokens first, then text, labels on the text."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    image_tokens = torch.full((batch, config.image_seq_length), config.image_token_id)
    text = torch.randint(10, 200, (batch, 12), generator=gen)
    input_ids = torch.cat([image_tokens, text], dim=1)
    labels = torch.cat([torch.full_like(image_tokens, -100), text], dim=1)
    side = config.vision_config.image_size
    pixels = torch.randn(batch, 3, side, side, generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels,
            "labels": labels}


def _grads(model: torch.nn.Module) -> set[str]:
    model.zero_grad(set_to_none=True)
    model(**_batch(model)).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_attn_implementation_reaches_both_towers_with_the_same_loss(tiny_cfg: DuetConfig, kernel: str) -> None:
    cfg = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"attn_implementation": kernel})})
    torch.manual_seed(0)  # VCE's fresh weights
    model = build_model(cfg, stage=1)
    config = model.config
    assert (config.vision_config._attn_implementation, config.text_config._attn_implementation) == (kernel, kernel)
    torch.manual_seed(0)
    reference = build_model(tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(
        update={"attn_implementation": "eager" if kernel == "sdpa" else "sdpa"})}), stage=1)
    with torch.no_grad():
        assert model(**_batch(model)).loss.item() == pytest.approx(reference(**_batch(reference)).loss.item(), rel=1e-5)


def test_flash_attention_is_refused_where_it_cannot_run(tiny_cfg: DuetConfig) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: whether flash-attn runs depends on the package")
    cfg = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(
        update={"attn_implementation": "flash_attention_2"})})
    with pytest.raises(ValueError, match=r"model.attn_implementation 'flash_attention_2'.*no CUDA device.*sdpa"):
        build_model(cfg, stage=1)


def test_stage1_gradients_reach_only_projector_and_vce(tiny_cfg: DuetConfig) -> None:
    model = build_model(tiny_cfg, stage=1)
    assert isinstance(projector_module(model), VCEProjector)
    grads = _grads(model)
    bridge = {n for n, p in model.named_parameters() if "multi_modal_projector." in n}
    assert grads and grads <= bridge
    assert any(".vce." in n for n in grads) and any(".projector." in n for n in grads)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all("vision_tower" in n or "language_model" in n or "lm_head" in n for n in frozen)


def test_stage2_adds_the_adapter_on_language_q_v_only(tiny_cfg: DuetConfig) -> None:
    # The paper's targets (the config default); the demo config widens them to every linear.
    paper = AdapterSection().target_modules
    tiny_cfg = tiny_cfg.model_copy(update={"adapter": tiny_cfg.adapter.model_copy(update={"target_modules": paper})})
    model = build_model(tiny_cfg, stage=2)
    grads = _grads(model)
    adapter = {n for n in grads if is_adapter_param(n)}
    assert adapter, "the adapter gets gradients"
    assert all("language_model" in n and (".q_proj." in n or ".v_proj." in n) for n in adapter)
    assert {n for n in grads if not is_adapter_param(n)} <= {
        n for n, _ in model.named_parameters() if "multi_modal_projector." in n
    }
    groups = {g["name"]: g for g in parameter_groups(model, tiny_cfg.stage2)}
    assert groups["adapter"]["lr"] == tiny_cfg.stage2.adapter_lr
    assert groups["projector_vce"]["lr"] == tiny_cfg.stage2.lr


def test_adapter_only_stage2_freezes_projector_and_vce_and_still_saves_them(tiny_cfg: DuetConfig,
                                                                          tmp_path: Path) -> None:
    cfg = tiny_cfg.model_copy(update={"stage2": tiny_cfg.stage2.model_copy(update={"trainable": "adapter_only"})})
    model = build_model(cfg, stage=2)
    grads = _grads(model)
    assert grads and all(is_adapter_param(n) for n in grads), "only the adapter gets gradients"
    assert not any(p.requires_grad for p in projector_module(model).parameters())
    assert [g["name"] for g in parameter_groups(model, cfg.stage2)] == ["adapter"]
    # The artifact still carries the (frozen) projector and VCE: stage 2's model is whole without stage 1.
    save_stage_artifact(model, cfg, 2, str(tmp_path / "artifact"), data_digest="abc")
    saved = load_file(str(tmp_path / "artifact" / ARTIFACT_WEIGHTS))
    bridge = projector_module(model).state_dict()
    assert saved.keys() == bridge.keys() and all(torch.equal(saved[k], bridge[k]) for k in saved)


def test_adapter_at_init_keeps_stage1_outputs(tiny_cfg: DuetConfig) -> None:
    torch.manual_seed(0)
    stage1 = build_model(tiny_cfg, stage=1).eval()
    torch.manual_seed(0)
    stage2 = build_model(tiny_cfg, stage=2).eval()
    batch = _batch(stage1)
    with torch.no_grad():
        torch.testing.assert_close(stage1(**batch).logits, stage2(**batch).logits)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_adapter_trains_the_tiny_llava(tiny_cfg: DuetConfig, adapter: str) -> None:
    cfg = tiny_cfg.model_copy(update={"adapter": tiny_cfg.adapter.model_copy(update={"type": adapter})})
    torch.manual_seed(0)
    model = build_model(cfg, stage=2)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.stage2.model_copy(update={"adapter_lr": 3e-3})))
    batch = _batch(model, seed=1)
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses


def test_artifact_round_trip_in_a_fresh_process(tiny_cfg: DuetConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg, stage=2)
    with torch.no_grad():  # move away from init so the check means something
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    uri = str(tmp_path / "artifact")
    save_stage_artifact(model, tiny_cfg, 2, uri, data_digest="abc")
    names = set(json.loads((tmp_path / "artifact" / "artifact.json").read_text()))
    assert {"stage", "model_signature", "vce_signature", "data_digest", "adapter_type"} <= names
    model.eval()
    batch = _batch(model, seed=3)
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save({"batch": batch}, tmp_path / "batch.pt")
    (tmp_path / "cfg.json").write_text(tiny_cfg.model_dump_json())
    script = (
        "import json,sys,torch\n"
        "from components.config import config_from_dict\n"
        "from components.model.artifact import load_stage_model\n"
        f"cfg=config_from_dict(json.load(open({str(tmp_path / 'cfg.json')!r})))\n"
        f"m=load_stage_model(cfg,{uri!r})\n"
        f"b=torch.load({str(tmp_path / 'batch.pt')!r},weights_only=True)['batch']\n"
        "with torch.no_grad(): out=m(**b).logits\n"
        f"torch.save(out,{str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected)
    # And in-process, through the same loader.
    with torch.no_grad():
        torch.testing.assert_close(load_stage_model(tiny_cfg, uri)(**batch).logits, expected)


def test_a_checkpoint_of_another_family_is_refused_before_loading(tiny_cfg: DuetConfig, tmp_path: Path) -> None:
    """transformers would load it into LLaVA with a warning and random weights; duet names what it is."""
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "architectures": ["X"]}))
    cfg = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"checkpoint": str(qwen)})})
    with pytest.raises(ArtifactError, match=r"is a Qwen2.5-VL checkpoint \(model_type 'qwen2_5_vl'\) but model.arch "
                                            r"'tiny' is a LLaVA-1.5 architecture"):
        build_model(cfg, stage=1)
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ArtifactError, match=r"is a Qwen2-VL checkpoint \(config.json model_type 'qwen2_vl'\); duet "
                                            r"builds on LLaVA-1.5, LLaVA-NeXT"):
        local_checkpoint(str(qwen))
    with pytest.raises(ArtifactError, match=r"model_type 'mystery'"):
        (qwen / "config.json").write_text(json.dumps({"model_type": "mystery"}))
        local_checkpoint(str(qwen))
    (qwen / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json does not parse"):
        local_checkpoint(str(qwen))
    assert local_checkpoint(tiny_cfg.model.checkpoint) == tiny_cfg.model.checkpoint


def test_stage2_refuses_an_artifact_with_another_vce(tiny_cfg: DuetConfig, tmp_path: Path) -> None:
    save_stage_artifact(build_model(tiny_cfg, stage=1), tiny_cfg, 1, str(tmp_path / "s1"), data_digest="d")
    assert check_compatible(tiny_cfg, str(tmp_path / "s1")).stage == 1
    other = tiny_cfg.model_copy(update={"vce": tiny_cfg.vce.model_copy(update={"points": 2})})
    with pytest.raises(ValueError, match=r"vce.points: artifact 4 != config 2"):
        check_compatible(other, str(tmp_path / "s1"))
    with pytest.raises(ArtifactError, match="no stage artifact at .*nothing is there"):
        check_compatible(tiny_cfg, str(tmp_path / "nothing"))


def _inspect(*overrides: str) -> dict:
    return component_sizes(build_meta_model(load_config(REPO / "pipelines/configs/llava-1.5-7b.yaml", overrides)))


def test_inspector_cli_reproduces_the_paper_sizes() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "pipelines/inspect_model.py"), "--config",
         str(REPO / "pipelines/configs/llava-1.5-7b.yaml"), "--json"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    sizes = json.loads(out[out.index("{"):])
    assert sizes["vce"]["mib_fp16"] == pytest.approx(5.52, abs=0.01)
    assert sizes["projector"]["mib_fp16"] == pytest.approx(40.02, abs=0.01)
    assert sizes["adapter"]["mib_fp16"] == pytest.approx(192, rel=0.001)
    assert sizes["adapter"]["mib_fp16"] / 128 == pytest.approx(1.5, rel=0.01)  # ~1.5 MiB per unit of rank
    assert [sizes[c]["trainable"] for c in ("vision_tower", "vce", "projector", "language_model", "adapter")] == [
        False, True, True, False, True,
    ]
    assert sizes["language_model"]["params"] > 6.5e9 and sizes["vision_tower"]["params"] > 3e8


@pytest.mark.parametrize(("rank", "lora_mib", "dual_mib"), [(32, 32, 48), (64, 64, 96), (128, 128, 192)])
def test_inspector_table5_adapter_sizes(rank: int, lora_mib: float, dual_mib: float) -> None:
    assert _inspect("adapter.type=lora", f"adapter.r={rank}")["adapter"]["mib_fp16"] == pytest.approx(lora_mib, rel=1e-3)
    assert _inspect(f"adapter.r={rank}")["adapter"]["mib_fp16"] == pytest.approx(dual_mib, rel=1e-3)
