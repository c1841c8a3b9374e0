"""The tiny base's vision tower stands in for a pretrained CLIP: its features at VCE's layers carry the scene.

A linear probe (logistic regression) reads the colour, size and shape of every drawn shape from the tower's
hidden states at the demo's VCE anchor and reference layers, layer-normed and averaged over the shape's
grid cell. It is fitted on the shapes of some synthetic images and scored on those of held-out images; the
same probe on an untrained tower of the same size is the reference that shows the warm-up put the signal
there (colour is in the raw pixels already, shape is not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from components.config import load_config
from components.data.synthetic import COLOURS, SHAPES, SIZES, SyntheticShapes
from components.model.tiny import (
    build_tokenizer,
    cell_pooling,
    patch_cells,
    save_tiny_checkpoint,
    scene_pixels,
    tiny_llava_config,
)

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "demo.yaml"
PROBE_SEED = 4242  # neither the dataset's seed nor the warm-up's: images the tower has never seen
FIT_IMAGES, HELD_OUT_IMAGES = 400, 200
CHANCE = 1 / len(SHAPES)  # six shapes


def shape_features(tower: torch.nn.Module, image_size: int, patch_size: int, layers: list[int],
                   images: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per drawn shape: the layer-normed hidden states at `layers` averaged over the shape's grid
    cell, concatenated over the layers; with the shape's colour and kind indices."""
    generator = SyntheticShapes(PROBE_SEED, image_size)
    scenes = [generator.scene(i) for i in images]
    with torch.no_grad():
        hidden = tower(scene_pixels(generator, scenes), output_hidden_states=True).hidden_states
    pooling = cell_pooling(patch_cells(image_size, patch_size))
    cells = torch.cat([
        torch.einsum("cp,bpd->bcd", pooling, F.layer_norm(hidden[layer][:, 1:], hidden[layer].shape[-1:]))
        for layer in layers
    ], dim=-1)
    shapes = [(b, shape) for b, scene in enumerate(scenes) for shape in scene.shapes]
    features = torch.stack([cells[b, shape.cell] for b, shape in shapes])
    colours = torch.tensor([list(COLOURS).index(shape.colour) for _, shape in shapes])
    kinds = torch.tensor([SHAPES.index(shape.kind) for _, shape in shapes])
    sizes = torch.tensor([list(SIZES).index(shape.size) for _, shape in shapes])
    return features, colours, kinds, sizes


def probe_accuracy(fit_x: torch.Tensor, fit_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression on standardised features."""
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    fit_x, test_x = (fit_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(fit_x.shape[1], int(fit_y.max()) + 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(fit_x), fit_y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def probe(tower: torch.nn.Module, image_size: int, patch_size: int, layers: list[int]) -> dict[str, float]:
    fit = shape_features(tower, image_size, patch_size, layers, range(FIT_IMAGES))
    held_out = shape_features(tower, image_size, patch_size, layers, range(FIT_IMAGES, FIT_IMAGES + HELD_OUT_IMAGES))
    return {
        "colour": probe_accuracy(fit[0], fit[1], held_out[0], held_out[1]),
        "shape": probe_accuracy(fit[0], fit[2], held_out[0], held_out[2]),
        "size": probe_accuracy(fit[0], fit[3], held_out[0], held_out[3]),
    }


@pytest.mark.slow
def test_warmed_up_vision_features_carry_colour_and_size(tmp_path: Path) -> None:
    cfg = load_config(DEMO)
    # the demo's vision warm-up; neither the LM's nor the captioning one, which leave the tower as it is
    tiny = cfg.model.tiny.model_copy(update={"warmup_steps": 0, "caption_warmup_steps": 0})
    layers = [cfg.vce.anchor_layer, *cfg.vce.reference_layers]
    path = save_tiny_checkpoint(tiny, tmp_path / "base", seed=0)
    tower = LlavaForConditionalGeneration.from_pretrained(path).model.vision_tower.eval()
    torch.manual_seed(0)
    untrained = LlavaForConditionalGeneration(tiny_llava_config(tiny, build_tokenizer(tiny.vocab_size)))

    warm = probe(tower, tiny.image_size, tiny.patch_size, layers)
    cold = probe(untrained.model.vision_tower.eval(), tiny.image_size, tiny.patch_size, layers)

    print({"warm": warm, "cold": cold})
    # Measured at the demo's 150 steps: colour 1.00 (untrained 0.95), size 0.92 (0.82), shape 0.26 (0.27; chance
    # 0.17); at 300 steps: 1.00, 0.94, 0.31.
    # The warm-up puts colour, size and position into the features; shape it does not learn in this budget
    # (README, "The tiny base"), so shape is held only to what a random tower already gives.
    assert warm["colour"] >= 0.9, (warm, cold)
    assert warm["size"] >= 0.9 and warm["size"] >= cold["size"] + 0.05, (warm, cold)
    assert warm["shape"] >= 1.5 * CHANCE, (warm, cold)
