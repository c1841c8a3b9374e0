"""Sequence packing: row planning, the packed layout, and the same losses and gradients as padded rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import DuetConfig
from components.data.conversation import IGNORE_INDEX
from components.data.dataset import collate
from components.data.packing import pack, padding_efficiency, plan_rows, row_layout, sample_lengths
from components.model.stages import build_model
from components.train.loop import forward_loss, sample_losses

REPO = Path(__file__).resolve().parents[1]
PAD = 0


def _cost(lengths: list[int], rows: list[list[int]]) -> int:
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def test_rows_fit_balanced_and_compute_the_fewest_tokens() -> None:
    lengths = [900, 100, 300, 200, 500]
    rows = plan_rows(lengths, max_length=1024)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4], "every sample exactly once"
    assert rows == [[0, 1], [2, 3, 4]], "2000 tokens in two balanced rows of 1000"
    assert all(row == sorted(row) for row in rows), "batch order kept within a row"
    # No pair fits under 1000: one sample per row, the padded layout.
    assert plan_rows([600, 600, 600], max_length=1000) == [[0], [1], [2]]
    assert plan_rows([5], max_length=5) == [[0]]
    # Eight similar samples: the fewest rows (3 of at most 256) would compute 3 x 240; four rows of two, less.
    similar = [80, 80, 80, 80, 80, 80, 80, 80]
    assert _cost(similar, plan_rows(similar, max_length=256)) == 640


def test_packing_never_computes_more_than_padding() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 300, size=int(rng.integers(1, 17))).tolist()
        rows = plan_rows(lengths, max_length=300)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 300 for row in rows)
        assert _cost(lengths, rows) <= len(lengths) * max(lengths)


def test_a_sample_longer_than_a_row_is_refused_with_the_setting() -> None:
    with pytest.raises(ValueError, match=r"sample 1 of the micro-batch has 12 tokens, more than model.max_length=10"):
        plan_rows([3, 12], max_length=10)
    with pytest.raises(ValueError, match="empty micro-batch"):
        plan_rows([], max_length=10)


def _rows(lengths: list[int], images: list[int], side: int = 2) -> dict[str, list[np.ndarray]]:
    """Samples as TextPreprocessor/ImagePreprocessor leave them: ids from 1, labels on the second half."""
    rng = np.random.default_rng(0)
    ids = [np.arange(1, n + 1) + 100 * i for i, n in enumerate(lengths)]
    labels = [np.where(np.arange(n) >= n // 2, x, IGNORE_INDEX) for x, n in zip(ids, lengths)]
    pixels = [rng.standard_normal((k, 3, side, side)).astype(np.float32) for k in images]
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def test_packed_layout_positions_labels_and_images_follow_their_samples() -> None:
    rows = _rows([4, 3, 2, 5], images=[1, 0, 2, 1])
    out = pack(rows, PAD, max_length=8)
    plan = plan_rows([4, 3, 2, 5], 8)
    # 14 tokens in rows of at most 8: two rows, balanced to 7 each, so no padding at all.
    assert out["input_ids"].shape == (2, 7) and "attention_mask" not in out
    order = [i for row in plan for i in row]
    for r, row in enumerate(plan):
        start = 0
        for i in row:
            n = len(rows["input_ids"][i])
            assert out["input_ids"][r, start:start + n].tolist() == rows["input_ids"][i].tolist()
            assert out["position_ids"][r, start:start + n].tolist() == list(range(n)), "positions restart"
            assert (out["sample_index"][r, start:start + n] == i).all()
            assert out["labels"][r, start] == IGNORE_INDEX, "no prediction across the seam"
            assert out["labels"][r, start + 1:start + n].tolist() == rows["labels"][i][1:].tolist()
            start += n
        assert (out["sample_index"][r, start:] == -1).all() and (out["labels"][r, start:] == IGNORE_INDEX).all()
    expected = np.concatenate([rows["pixel_values"][i] for i in order])
    assert np.array_equal(out["pixel_values"].numpy(), expected), "images in the order their samples sit"
    assert sample_lengths(out) == [4, 3, 2, 5]
    padded = collate(rows, PAD)
    assert padding_efficiency(padded) == pytest.approx(14 / 20)
    assert padding_efficiency(out) == 1.0


def _multimodal_rows(model: torch.nn.Module, text_lengths: list[int], images: list[int]) -> dict[str, list]:
    """Samples with `images[i]` images (their image tokens first) and text of varied length."""
    config = model.config
    gen = np.random.default_rng(1)
    side = config.vision_config.image_size
    ids, labels, pixels = [], [], []
    for n, k in zip(text_lengths, images):
        text = gen.integers(10, 200, n)
        image_tokens = np.full(k * config.image_seq_length, config.image_token_id)
        ids.append(np.concatenate([image_tokens, text]))
        labels.append(np.concatenate([np.full(len(image_tokens), IGNORE_INDEX), np.where(
            np.arange(n) >= n // 3, text, IGNORE_INDEX)]))
        pixels.append(gen.standard_normal((k, 3, side, side)).astype(np.float32))
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def _losses_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    model.zero_grad(set_to_none=True)
    loss, _ = forward_loss(model, batch)
    loss.backward()
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], **row_layout(batch))
    per_sample, _ = sample_losses(out.logits, batch["labels"], batch.get("sample_index"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), per_sample.detach(), grads


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_losses_and_gradients(tiny_cfg: DuetConfig, kernel: str) -> None:
    cfg = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"attn_implementation": kernel})})
    torch.manual_seed(0)
    model = build_model(cfg, stage=2)  # Dual-LoRA on the language model, VCE + projector trained
    model.eval()  # no dropout: the two layouts see the same function
    for _, p in model.named_parameters():
        if p.requires_grad:  # the adapter's B starts at zero; move it so every trained weight gets a gradient
            p.data.add_(0.02 * torch.randn_like(p))
    tokens = model.config.image_seq_length
    rows = _multimodal_rows(model, text_lengths=[5, 31, 12, 2, 20], images=[1, 1, 0, 1, 2])
    max_length = 2 * tokens + 40
    packed = pack(rows, PAD, max_length)
    padded = collate(rows, PAD)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0], "packing needed fewer rows"
    assert any(len(row) > 1 for row in plan_rows([len(x) for x in rows["input_ids"]], max_length))
    loss_padded, samples_padded, grads_padded = _losses_and_grads(model, padded)
    loss_packed, samples_packed, grads_packed = _losses_and_grads(model, packed)
    torch.testing.assert_close(samples_packed, samples_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert grads_packed.keys() == grads_padded.keys() and any("lora_S" in n for n in grads_packed)
    assert any("multi_modal_projector" in n for n in grads_packed)
    for name, grad in grads_padded.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_per_sample_positions_the_samples_would_see_each_other(tiny_cfg: DuetConfig) -> None:
    """The check has teeth: one row of two samples with running positions, or with a KV cache, is not the same
    as two rows."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg, stage=1).eval()
    rows = _multimodal_rows(model, text_lengths=[8, 9], images=[1, 1])
    packed = pack(rows, PAD, max_length=10_000)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        good = sample_losses(model(input_ids=packed["input_ids"], pixel_values=packed["pixel_values"],
                                   **row_layout(packed)).logits, packed["labels"], packed["sample_index"])[0]
        # With a KV cache (a forward's default) transformers does not look for packed rows.
        cached = sample_losses(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                     pixel_values=packed["pixel_values"], use_cache=True).logits,
                               packed["labels"], packed["sample_index"])[0]
        leaky = sample_losses(model(input_ids=packed["input_ids"], pixel_values=packed["pixel_values"],
                                    use_cache=False).logits, packed["labels"], packed["sample_index"])[0]
        padded = collate(rows, PAD)
        reference = sample_losses(model(**{k: padded[k] for k in ("input_ids", "attention_mask", "pixel_values")}
                                        ).logits, padded["labels"])[0]
    torch.testing.assert_close(good, reference, rtol=1e-5, atol=1e-5)
    for wrong in (leaky, cached):
        torch.testing.assert_close(wrong[0], reference[0], rtol=1e-5, atol=1e-5)  # the first sees only itself
        assert abs(wrong[1] - reference[1]) > 1e-3, "the second sample would attend to the first"


def test_the_stage_summary_says_how_much_compute_padding_took(tiny_cfg: DuetConfig) -> None:
    from components.workflow.tracked_stage import _padding_note

    rows = [{"step": 1, "padding_efficiency": 0.9}, {"step": 2, "padding_efficiency": 0.96}]
    assert _padding_note(tiny_cfg, rows) == "; 93% of computed tokens real (data.packing: false)"
    assert _padding_note(tiny_cfg, [{"step": 1}]) == ""
