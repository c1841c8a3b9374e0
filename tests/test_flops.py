"""Model FLOPs and MFU: the arithmetic by hand on small numbers, and the counts read off the 7B model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.data.packing import sample_lengths
from components.model.sizes import build_meta_model, component_sizes
from components.train.flops import StepFlops, device_peak_tflops, mfu, model_tflops_per_s

REPO = Path(__file__).resolve().parents[1]

SMALL = StepFlops(vision_matmul_params=10, vision_layers=2, vision_hidden=3, vision_tokens=5, bridge_params=7,
                  bridge_trained=True, visual_tokens=4, lm_matmul_params=11, lm_layers=1, lm_hidden=2,
                  adapter_params=2)


def test_flops_of_a_micro_batch_by_hand() -> None:
    # Vision forward 2*10*5 + attention 4*2*3*5^2 = 100 + 600; VCE + projector trained: 6*7*4 = 168.
    assert SMALL.per_image() == 868
    # 3 tokens: LM frozen, gradients through it 4*11*3 = 132, adapter trained 6*2*3 = 36, attention 3*4*1*2*3^2 = 216.
    assert SMALL.per_sample(3) == 384
    frozen_bridge = StepFlops(**{**SMALL.__dict__, "bridge_trained": False})
    assert frozen_bridge.per_image() == 700 + 2 * 7 * 4, "a frozen projector: forward only"
    # Two samples of 3 and 2 real tokens (padding is not counted) and one image: 868 + 384 + (112 + 96).
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert SMALL.batch(sample_lengths({"attention_mask": mask}), images=1) == 1460
    # The same two samples packed into one row: each attends only to itself, so the FLOPs are the same.
    packed = {"sample_index": torch.tensor([[0, 0, 0, 1, 1]]), "input_ids": torch.zeros(1, 5)}
    assert SMALL.batch(sample_lengths(packed), images=1) == 1460


def test_mfu_is_model_flops_per_device_over_the_peak() -> None:
    # 8e12 FLOPs over 2 devices in 2 s: 2 TFLOP/s each; against a 10 TFLOP/s peak, 20 %.
    assert model_tflops_per_s(8e12, 2.0, 2) == pytest.approx(2.0)
    assert mfu(8e12, 2.0, 2, 10.0) == pytest.approx(0.2)


def test_counts_of_the_7b_model_come_from_its_architecture() -> None:
    cfg = load_config(REPO / "pipelines/configs/llava-1.5-7b.yaml", [])
    model = build_meta_model(cfg, stage=2)
    counts = StepFlops.from_model(model)
    sizes = component_sizes(model)
    # CLIP ViT-L/14 at 336 px: 24 patches a side + CLS; Vicuna-7B: 32 layers of width 4096.
    assert (counts.vision_tokens, counts.visual_tokens, counts.vision_layers, counts.vision_hidden) == (577, 576, 24, 1024)
    assert (counts.lm_layers, counts.lm_hidden) == (32, 4096)
    vocab = model.get_base_model().config.text_config.vocab_size
    assert counts.lm_matmul_params == sizes["language_model"]["params"] - vocab * 4096, "the token embedding is a lookup"
    assert counts.adapter_params == sizes["adapter"]["params"]
    assert counts.bridge_params == sizes["vce"]["params"] + sizes["projector"]["params"] and counts.bridge_trained
    # Vicuna-7B's 6.74e9 weights less its 32064 x 4096 embedding (its LM head does multiply).
    assert counts.lm_matmul_params == pytest.approx(6.61e9, rel=0.01)
    # One token: 4N through the frozen LM (6N, the familiar figure, less the weight gradients it does not
    # compute), 6N for the adapter, and attention over itself.
    assert counts.per_sample(1) == 4 * counts.lm_matmul_params + 6 * counts.adapter_params + 12 * 32 * 4096

def test_the_peak_comes_from_the_override_or_a_known_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert device_peak_tflops(None, torch.device("cpu")) is None, "no table for CPUs: set scaling.peak_tflops"
    for name, peak in [("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
                       ("NVIDIA L4", 121.0), ("NVIDIA A10G", 70.0), ("NVIDIA GeForce GTX 1080", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert device_peak_tflops(None, torch.device("cuda", 0)) == peak, name
