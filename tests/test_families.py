"""Model families: VCE where each family's bridge is, against per-map loop references; presets; detection.

LLaVA-NeXT and LLaVA-OneVision cut an image into tiles: VCE runs per tile, on a square grid.
Qwen2.5-VL feeds its blocks merge units in window order: VCE there must undo that order, lay
each image out as its own (H, W) grid (non-square and of different sizes in one batch), and
restore it before the merger. The references below place every patch with an explicit loop, and
the processor test pins the unit layout to Qwen's own image processor.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from family_models import tiny_llava_next, tiny_llava_onevision, tiny_qwen2_5_vl
from test_vce import _randomise, reference_sampling_loop
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from components.config import DuetConfig, VCESection
from components.errors import ArtifactError
from components.model.artifact import check_compatible, load_stage_model, save_stage_artifact
from components.model.families import FAMILIES, family_of
from components.model.families.llava import VCEProjector
from components.model.families.qwen2_5_vl import QWEN2_5_VL, VCEMerger, grids_to_units, units_to_grids
from components.model.llava import attach_vce, load_base_model, projector_module
from components.model.sizes import build_meta_model, component_sizes
from components.model.stages import build_model

torch.manual_seed(0)


def _vce(anchor: int, references: list[int]) -> VCESection:
    return VCESection(anchor_layer=anchor, reference_layers=references, heads=2, points=2)


def _with_random_vce(model: torch.nn.Module, vce_cfg: VCESection) -> torch.nn.Module:
    attach_vce(model, vce_cfg)
    _randomise(projector_module(model).vce)
    return model.eval()


# ---------------------------------------------------------------- LLaVA-NeXT and OneVision: per tile


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_vce_runs_per_tile_and_matches_the_loop_reference(family: str) -> None:
    config = tiny_llava_next() if family == "llava_next" else tiny_llava_onevision()
    model_class = LlavaNextForConditionalGeneration if family == "llava_next" else LlavaOnevisionForConditionalGeneration
    anchor = -2 if family == "llava_next" else -1
    model = _with_random_vce(model_class(config), _vce(anchor, [-3, -4]))
    bridge = projector_module(model)
    assert isinstance(bridge, VCEProjector) and family_of(model) is FAMILIES[family]
    seen: dict[str, torch.Tensor] = {}
    bridge.register_forward_hook(lambda _m, args, out: seen.update(inputs=args[0], output=out))
    tiles = 5  # a 48 x 48 image: the base view and 2 x 2 tiles of 24 px
    pixel_values = torch.randn(1, tiles, 3, 24, 24)
    with torch.no_grad():
        model.model.get_image_features(pixel_values, image_sizes=torch.tensor([[48, 48]]))
    features = seen["inputs"]
    assert features.shape == (tiles, 36, 32 * 3), "one 6 x 6 map per tile, anchor and two references side by side"
    anchor_map, *references = features.split(32, dim=-1)
    want = reference_sampling_loop(bridge.vce, anchor_map, [anchor_map, *references], [(6, 6)] * 3)
    with torch.no_grad():
        want = bridge.projector(want.float())
    torch.testing.assert_close(seen["output"], want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Qwen2.5-VL: window order, varying grids


def test_unit_layout_is_the_one_qwens_image_processor_writes() -> None:
    """Each patch of a 24 x 40 px image carries its raster index; units_to_grids must put it back there."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rows, cols = 6, 10
    index = np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols)
    pixels = np.repeat(np.repeat(index, 4, axis=0), 4, axis=1)
    image = Image.fromarray(np.stack([pixels] * 3, axis=-1))
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False,
                                         do_rescale=False, do_normalize=False)
    out = processor(images=[image], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, rows, cols]]
    units = out["pixel_values"].view(-1, 4, out["pixel_values"].shape[-1])
    grid = units_to_grids(units, [(1, rows, cols)], merge=2)[0]
    assert grid[0, :, 0].round().long().tolist() == list(range(rows * cols))
    torch.testing.assert_close(grids_to_units([grid], [(1, rows, cols)], merge=2), units)


def _qwen_reference(plain: torch.nn.Module, vce: torch.nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor,
                    levels: list[int]) -> torch.Tensor:
    """The merged image features with VCE, every patch placed by an explicit loop over the window order."""
    visual = plain.model.visual
    with torch.no_grad():
        states = visual(pixel_values, grid_thw=grid, output_hidden_states=True).hidden_states
    window, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
    grids = grid.tolist()
    unit_offsets = np.cumsum([0] + [t * (h // 2) * (w // 2) for t, h, w in grids])
    place = []  # sequence position (window order) -> (image, frame, raster index)
    for position in range(states[-1].shape[0]):
        unit, inner = int(window[position // 4]), position % 4
        image = int(np.searchsorted(unit_offsets, unit, side="right") - 1)
        t, h, w = grids[image]
        frame, rest = divmod(unit - int(unit_offsets[image]), (h // 2) * (w // 2))
        block_row, block_col = divmod(rest, w // 2)
        inner_row, inner_col = divmod(inner, 2)
        place.append((image, frame, (2 * block_row + inner_row) * w + 2 * block_col + inner_col))

    def maps(hidden: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.zeros(t, h * w, hidden.shape[-1], dtype=torch.float64) for t, h, w in grids]
        for position, (image, frame, raster) in enumerate(place):
            out[image][frame, raster] = hidden[position]
        return out

    anchors = maps(states[-1])
    level_maps = [maps(states[k]) for k in levels]
    enhanced = [
        reference_sampling_loop(vce, anchors[i], [anchors[i], *(m[i] for m in level_maps)], [(h, w)] * 3)
        for i, (_, h, w) in enumerate(grids)
    ]
    sequence = torch.stack([enhanced[image][frame, raster] for image, frame, raster in place]).float()
    with torch.no_grad():
        merged = visual.merger(sequence)
    return merged[torch.argsort(window)]


def test_qwen_vce_inverts_the_window_order_on_non_square_grids_of_different_sizes() -> None:
    plain = tiny_qwen2_5_vl()
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration(plain).eval()
    model = _with_random_vce(copy.deepcopy(base), _vce(-1, [-2, -4]))
    merger = projector_module(model)
    assert isinstance(merger, VCEMerger) and merger.reference_blocks == [2, 0]
    grid = torch.tensor([[1, 6, 10], [1, 4, 4], [1, 10, 6]])  # 6 x 10, 4 x 4 and 10 x 6 patches
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4)
    with torch.no_grad():
        got = model.model.get_image_features(pixel_values, grid).pooler_output
    want = _qwen_reference(base, merger.vce, pixel_values, grid, levels=[3, 1])
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)
    assert not merger.block_outputs and merger.grid_thw is None, "nothing of one forward stays for the next"


def test_qwen_vce_without_attention_leaves_the_image_features_as_they_were() -> None:
    """VCE's update zeroed and no final norm: restoring the order must give back the tower's own output."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl()).eval()
    model = copy.deepcopy(base)
    attach_vce(model, VCESection(anchor_layer=-1, reference_layers=[-3], heads=2, points=2, final_norm=False))
    torch.nn.init.zeros_(projector_module(model).vce.output_proj.weight)
    grid = torch.tensor([[1, 6, 10], [2, 4, 8]])  # an image and a two-frame video's grid
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4)
    with torch.no_grad():
        want = base.model.get_image_features(pixel_values, grid).pooler_output
        got = model.model.get_image_features(pixel_values, grid).pooler_output
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_qwen_vce_anchor_must_be_the_merger_input() -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl())
    with pytest.raises(ValueError, match=r"vce.anchor_layer = -2: Qwen2.5-VL's merger reads the last block"):
        attach_vce(model, _vce(-2, [-3]))
    with pytest.raises(ValueError, match=r"vce.reference_layers\[0\] = -9 is outside the vision tower"):
        attach_vce(model, _vce(-1, [-9]))


def test_adapter_targets_stay_in_qwens_language_model() -> None:
    """Qwen's vision blocks have gate_proj/up_proj/down_proj too: plain names must not reach them."""
    import re

    from components.model.adapters.apply import target_regex

    pattern = re.compile(target_regex(["q_proj", "down_proj"]))
    assert pattern.fullmatch("model.language_model.layers.0.mlp.down_proj")
    assert not pattern.fullmatch("model.visual.blocks.0.mlp.down_proj")
    assert not pattern.fullmatch("model.visual.merger.mlp.0")


# ---------------------------------------------------------------- presets, sizes, detection


PAPER_SCALE = {  # the shipped config of each family, and what the inspector is told on top
    "llava-1.5-7b": ("llava-1.5-7b.yaml", []),
    "llava-next-7b": ("llava-1.5-7b.yaml", ["model.arch=llava-next-7b"]),
    "llava-onevision-7b": ("llava-onevision-7b.yaml", []),
    "qwen2.5-vl-7b": ("qwen2.5-vl-7b.yaml", []),
}


@pytest.mark.parametrize("arch", PAPER_SCALE)
def test_paper_scale_presets_build_on_meta_with_vce_and_adapter(arch: str) -> None:
    from components.config import load_config

    config_file, overrides = PAPER_SCALE[arch]
    cfg = load_config(Path(__file__).resolve().parents[1] / "pipelines/configs" / config_file, overrides)
    assert cfg.model.arch == arch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = component_sizes(build_meta_model(cfg, stage=2))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], "PEFT's deprecation noise"
    assert sizes["vce"]["params"] > 2_000_000 and sizes["vce"]["trainable"]
    assert sizes["adapter"]["params"] > 10_000_000 and sizes["adapter"]["trainable"]
    assert sizes["projector"]["trainable"] and not sizes["vision_tower"]["trainable"]
    assert 6e9 < sizes["language_model"]["params"] < 8e9


def test_a_known_family_duet_cannot_train_yet_is_refused_naming_what_works(tiny_cfg: DuetConfig,
                                                                           tmp_path: Path) -> None:
    folder = tmp_path / "next"
    LlavaNextForConditionalGeneration(tiny_llava_next()).save_pretrained(folder)
    model = tiny_cfg.model.model_copy(update={"arch": "checkpoint", "checkpoint": str(folder)})
    with pytest.raises(ArtifactError, match=r"is a LLaVA-NeXT checkpoint: duet attaches VCE and the adapter"):
        load_base_model(tiny_cfg.model_copy(update={"model": model}))


def test_the_artifact_records_its_family_and_another_family_is_refused(tiny_cfg: DuetConfig, tmp_path: Path) -> None:
    uri = save_stage_artifact(build_model(tiny_cfg, stage=1), tiny_cfg, 1, str(tmp_path / "s1"), data_digest="d")
    assert json.loads((tmp_path / "s1" / "artifact.json").read_text())["model_signature"]["family"] == "llava"
    assert check_compatible(tiny_cfg, uri).stage == 1
    model = tiny_cfg.model.model_copy(update={"arch": "checkpoint", "family": "llava_onevision"})
    with pytest.raises(ArtifactError, match=r"was trained on a LLaVA-1.5 base, but this config's base is "
                                            r"LLaVA-OneVision \(llava_onevision\)"):
        check_compatible(tiny_cfg.model_copy(update={"model": model}), uri)
    meta_file = tmp_path / "s1" / "artifact.json"
    meta = json.loads(meta_file.read_text())
    meta["model_signature"]["family"] = "qwen2_5_vl"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"was trained on a Qwen2.5-VL base, but this config's base is LLaVA-1.5"):
        load_stage_model(tiny_cfg, uri)  # evaluation's and packaging's loader
    del meta["model_signature"]["family"]
    meta_file.write_text(json.dumps(meta))
    assert check_compatible(tiny_cfg, uri).stage == 1, "artifacts from before families were recorded are LLaVA's"


def test_model_family_must_match_the_checkpoint(tiny_cfg: DuetConfig) -> None:
    model = tiny_cfg.model.model_copy(update={"arch": "checkpoint", "family": "qwen2_5_vl"})
    with pytest.raises(ArtifactError, match=r"is a LLaVA-1.5 checkpoint \(model_type 'llava'\) but model.family is "
                                            r"'qwen2_5_vl'"):
        load_base_model(tiny_cfg.model_copy(update={"model": model}))
    with pytest.raises(ValueError, match=r"model.family 'qwen2_5_vl' does not match model.arch 'llava-1.5-7b'"):
        tiny_cfg.model.model_validate({"arch": "llava-1.5-7b", "family": "qwen2_5_vl"})


def test_every_family_is_listed_once_with_its_class() -> None:
    assert sorted(FAMILIES) == ["llava", "llava_next", "llava_onevision", "qwen2_5_vl"]
    assert QWEN2_5_VL.model_class.__name__ == "Qwen2_5_VLForConditionalGeneration"
    for name, family in FAMILIES.items():  # the name is the model_type a checkpoint's config.json carries
        assert family.config_class.model_type == name and family.model_class.config_class is family.config_class
    assert len({f.label for f in FAMILIES.values()}) == len(FAMILIES)


@pytest.mark.parametrize("sampler", ["pytorch", "deformable_detr"])
def test_stage1_on_qwen_trains_vce_and_the_merger_only(sampler: str) -> None:
    """Gradients reach VCE through the window-order inversion, and nothing of the frozen tower moves."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from components.model.stages import set_trainable

    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl())
    attach_vce(model, VCESection(anchor_layer=-1, reference_layers=[-2, -4], heads=2, points=2, sampler=sampler))
    set_trainable(model, stage=1)
    grid = torch.tensor([[1, 6, 10], [1, 4, 4]])
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4)
    torch.cat(model.model.get_image_features(pixel_values, grid).pooler_output).square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.visual.merger.") for n in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("model.visual.merger.vce.") and "norm" not in n)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("model.visual.blocks."))
    sizes = component_sizes(model)
    assert sizes["projector"]["params"] == sum(p.numel() for p in projector_module(model).merger.parameters())
    assert sizes["vision_tower"]["params"] == sum(p.numel() for n, p in model.named_parameters()
                                                  if n.startswith("model.visual.") and ".merger." not in n)


def test_the_inspector_names_the_family_and_where_vce_sits(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.inspect_model import main

    config = Path(__file__).resolve().parents[1] / "pipelines/configs/qwen2.5-vl-7b.yaml"
    sizes = main(["--config", str(config)])
    first, header, *rows = capsys.readouterr().out.splitlines()
    assert first == ("Qwen2.5-VL (qwen2_5_vl, model.arch qwen2.5-vl-7b); VCE in front of visual.merger (per image "
                     "grid, window order undone): anchor layer -1, references [-9, -17, -25] of 32 vision layers, "
                     "1280 wide")
    assert header.split()[0] == "component" and [r.split()[0] for r in rows] == list(sizes)
    assert sizes["vce"]["mib_fp16"] == pytest.approx(8.15, abs=0.01)


def test_a_checkpoint_folder_without_config_json_names_the_fix(tmp_path: Path) -> None:
    from components.model.llava import local_checkpoint

    with pytest.raises(ArtifactError, match=r"has no config.json: point it at a checkpoint directory of one of duet's "
                                            r"model families"):
        local_checkpoint(str(tmp_path))


def test_the_presets_family_and_depth_tables_agree_with_the_preset_configs() -> None:
    """config.py names each preset's family and depth without importing the model code; they must not drift."""
    from components.config import ARCH_FAMILIES, VISION_LAYERS_BY_ARCH
    from components.model.sizes import PRESETS

    assert set(PRESETS) == set(ARCH_FAMILIES) == set(VISION_LAYERS_BY_ARCH)
    for arch, build in PRESETS.items():
        config = build()
        assert config.model_type == ARCH_FAMILIES[arch], arch
        assert FAMILIES[config.model_type].vision_layers(config) == VISION_LAYERS_BY_ARCH[arch], arch
