"""VCE: both samplers against a per-sample loop with its own bilinear reads, sizes, grads, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from components.config import DuetConfig, VCESection
from components.model.artifact import vce_signature
from components.model.vce import VisualCueEnhancer, select_vision_features
from components.model.vce_sampling import SAMPLERS, use_fused_kernel

DIM, HEADS, POINTS = 16, 2, 3


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _bilinear_zero_padded(values: torch.Tensor, height: int, width: int, x: float, y: float) -> torch.Tensor:
    """Read a row-major [H*W, C] map at normalised (x, y); cell centres sit at (i + 0.5) / W, outside reads 0."""
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(values.shape[-1], dtype=values.dtype)
    for row, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for col, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= row < height and 0 <= col < width:
                out += wy * wx * values[row * width + col]
    return out


def reference_locations(
    module: VisualCueEnhancer, anchor: torch.Tensor, shapes: list[tuple[int, int]], anchor_hw: tuple[int, int]
) -> list:
    """Normalised sampling points as nested lists [b][n][h][l][p] = (x, y), in float64."""
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    eps = module.query_norm.eps
    query = _layer_norm(anchor.double(), p["query_norm.weight"], p["query_norm.bias"], eps)
    offsets = (query @ p["sampling_offsets.weight"].T + p["sampling_offsets.bias"]).tolist()
    batch, num_queries = anchor.shape[:2]
    levels, points, heads = module.num_levels, module.points, module.heads
    out = []
    for b in range(batch):
        per_query = []
        for n in range(num_queries):
            row, col = divmod(n, anchor_hw[1])
            cx, cy = (col + 0.5) / anchor_hw[1], (row + 0.5) / anchor_hw[0]
            per_head = []
            for h in range(heads):
                per_level = []
                for lvl, (height, width) in enumerate(shapes):
                    per_point = []
                    for k in range(points):
                        base = ((h * levels + lvl) * points + k) * 2
                        ox, oy = offsets[b][n][base], offsets[b][n][base + 1]
                        per_point.append((cx + ox / width, cy + oy / height))
                    per_level.append(per_point)
                per_head.append(per_level)
            per_query.append(per_head)
        out.append(per_query)
    return out


def reference_sampling_loop(
    module: VisualCueEnhancer,
    anchor: torch.Tensor,
    references: list[torch.Tensor],
    shapes: list[tuple[int, int]],
    anchor_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """VCE written out per batch, head, level, point and query in float64, from the module's parameters."""
    anchor_hw = anchor_hw or shapes[0]
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    eps = module.query_norm.eps
    heads, points, head_dim = module.heads, module.points, module.head_dim
    anchor = anchor.double()
    query = _layer_norm(anchor, p["query_norm.weight"], p["query_norm.bias"], eps)
    logits = query @ p["attention_weights.weight"].T + p["attention_weights.bias"]
    batch, num_queries, dim = anchor.shape
    values = [
        _layer_norm(r.double(), p["value_norm.weight"], p["value_norm.bias"], eps) @ p["value_proj.weight"].T
        + p["value_proj.bias"]
        for r in references
    ]
    locations = reference_locations(module, anchor, shapes, anchor_hw)
    mixed = torch.zeros(batch, num_queries, dim, dtype=torch.float64)
    group = len(shapes) * points
    for b in range(batch):
        for h in range(heads):
            channels = slice(h * head_dim, (h + 1) * head_dim)
            for lvl, (height, width) in enumerate(shapes):
                for k in range(points):
                    for n in range(num_queries):
                        head_logits = logits[b, n, h * group:(h + 1) * group]
                        weight = torch.exp(head_logits[lvl * points + k]) / torch.exp(head_logits).sum()
                        x, y = locations[b][n][h][lvl][k]
                        read = _bilinear_zero_padded(values[lvl][b, :, channels], height, width, x, y)
                        mixed[b, n, channels] += weight * read
    out = anchor + mixed @ p["output_proj.weight"].T + p["output_proj.bias"]
    if module.norm is not None:
        out = _layer_norm(out, p["norm.weight"], p["norm.bias"], module.norm.eps)
    return out


def _randomise(module: VisualCueEnhancer, offset_scale: float = 0.5) -> VisualCueEnhancer:
    """Non-init weights: offsets of a few cells in all directions, non-uniform attention, non-identity norms."""
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0.0, offset_scale)
        module.sampling_offsets.bias.normal_(0.0, 1.0)
        module.attention_weights.weight.normal_(0.0, 0.5)
        module.attention_weights.bias.normal_(0.0, 0.5)
        for name, param in module.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias") and ("norm" in name or "proj" in name):
                param.normal_(0.0, 0.1)
    return module


def _inputs(shapes: list[tuple[int, int]], anchor_hw: tuple[int, int], batch: int = 2):
    anchor = torch.randn(batch, anchor_hw[0] * anchor_hw[1], DIM)
    references = [torch.randn(batch, h * w, DIM) for h, w in shapes]
    return anchor, references


CASES = {
    "square-5x5": ([(5, 5)] * 3, (5, 5)),
    "non-square-3x7": ([(3, 7)] * 3, (3, 7)),
    "per-level-grids": ([(3, 7), (2, 4), (4, 5)], (3, 7)),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_per_sample_loop_with_random_weights(case: str, final_norm: bool, sampler: str) -> None:
    torch.manual_seed(0)
    shapes, anchor_hw = CASES[case]
    module = _randomise(VisualCueEnhancer(DIM, len(shapes), heads=HEADS, points=POINTS, final_norm=final_norm,
                                          sampler=sampler))
    anchor, references = _inputs(shapes, anchor_hw)
    shared = shapes[0] if len(set(shapes)) == 1 else shapes
    got = module(anchor, references, shared, anchor_shape=anchor_hw)
    want = reference_sampling_loop(module, anchor, references, shapes, anchor_hw)
    assert got.shape == anchor.shape
    assert (got.double() - want).abs().max().item() < 1e-5

    # The comparison only means something if samples land between cells and partly outside the maps.
    pixels = [
        (x * w - 0.5, y * h - 0.5, h, w)
        for per_query in reference_locations(module, anchor, shapes, anchor_hw)
        for per_head in per_query
        for per_level in per_head
        for (h, w), per_point in zip(shapes, per_level)
        for x, y in per_point
    ]
    outside = sum(not (0 <= px <= w - 1 and 0 <= py <= h - 1) for px, py, h, w in pixels)
    off_grid = sum(abs(px - round(px)) > 1e-3 and abs(py - round(py)) > 1e-3 for px, py, _, _ in pixels)
    assert 0.1 * len(pixels) < outside < 0.9 * len(pixels)
    assert off_grid > 0.9 * len(pixels)


def test_init_is_deformable_detr_and_matches_loop() -> None:
    torch.manual_seed(1)
    module = VisualCueEnhancer(DIM, 2, heads=4, points=3)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    assert torch.count_nonzero(module.value_proj.bias) + torch.count_nonzero(module.output_proj.bias) == 0
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    # Heads point right, up, left, down (angle 2*pi*h/heads); point k lies k+1 cells out, on every level.
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    want = directions[:, None, None, :] * torch.tensor([1.0, 2.0, 3.0])[None, None, :, None]
    torch.testing.assert_close(bias, want.expand(4, 2, 3, 2), atol=1e-6, rtol=0)
    diagonal = VisualCueEnhancer(DIM, 1, heads=8, points=2).sampling_offsets.bias.view(8, 1, 2, 2)
    torch.testing.assert_close(diagonal[1, 0], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    bound = math.sqrt(6 / (2 * DIM))
    assert module.value_proj.weight.abs().max() <= bound and module.value_proj.weight.std() > bound / 4

    anchor, references = _inputs([(3, 4)] * 2, (3, 4))
    got = module(anchor, references, (3, 4))
    assert (got.double() - reference_sampling_loop(module, anchor, references, [(3, 4)] * 2)).abs().max() < 1e-5


def test_paper_size_at_clip_vit_l() -> None:
    cfg = VCESection()
    assert cfg.include_anchor_level and (cfg.heads, cfg.points) == (16, 4)
    module = VisualCueEnhancer.from_config(cfg, 1024)
    assert module.num_levels == 4
    params = sum(p.numel() for p in module.parameters())
    fp16_mib = params * 2 / 2**20
    assert abs(params - 2.89e6) / 2.89e6 < 0.01, params
    assert abs(fp16_mib - 5.52) / 5.52 < 0.01, fp16_mib
    # Without the anchor's own level the module is smaller than the paper's figure.
    smaller = VisualCueEnhancer.from_config(VCESection(include_anchor_level=False), 1024)
    assert sum(p.numel() for p in smaller.parameters()) < params - 50_000


def test_samplers_share_weights_and_agree_in_values_and_gradients() -> None:
    torch.manual_seed(5)
    shapes = [(3, 7), (2, 4), (4, 5)]
    modules = {name: VisualCueEnhancer(DIM, 3, heads=HEADS, points=POINTS, sampler=name) for name in SAMPLERS}
    _randomise(modules["pytorch"])
    state = modules["pytorch"].state_dict()
    assert modules["deformable_detr"].load_state_dict(state) is not None  # strict: the same keys, no more
    assert type(modules["deformable_detr"].deformable_attention).__name__ == "MultiScaleDeformableAttention"
    anchor, references = _inputs(shapes, (3, 7))
    results = {}
    for name, module in modules.items():
        inputs = [t.clone().requires_grad_(True) for t in (anchor, *references)]
        out = module(inputs[0], inputs[1:], shapes)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[name] = (out, [t.grad for t in inputs], {n: p.grad for n, p in module.named_parameters()})
    (out_a, input_grads_a, grads_a), (out_b, input_grads_b, grads_b) = results.values()
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5)
    for got, want in zip(input_grads_b, input_grads_a):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for name, want in grads_a.items():
        torch.testing.assert_close(grads_b[name], want, atol=1e-5, rtol=1e-4, msg=name)


def test_unknown_sampler_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"vce.sampler must be one of \['pytorch', 'deformable_detr'\]"):
        VisualCueEnhancer(DIM, 2, heads=HEADS, sampler="cuda")
    assert "sampler" not in vce_signature(DuetConfig(vce=VCESection(sampler="deformable_detr")))


def test_fused_kernel_is_only_sought_on_cuda() -> None:
    plain = VisualCueEnhancer(DIM, 2, heads=HEADS)
    assert use_fused_kernel(plain, torch.device("cpu")) == "pytorch"
    module = VisualCueEnhancer(DIM, 2, heads=HEADS, sampler="deformable_detr")
    assert use_fused_kernel(module, torch.device("cpu")).startswith("deformable_detr (PyTorch forward: no CUDA")


def test_gradients_reach_every_parameter_and_input() -> None:
    torch.manual_seed(2)
    module = _randomise(VisualCueEnhancer(DIM, 2, heads=HEADS, points=POINTS))
    anchor, references = _inputs([(3, 5), (4, 4)], (3, 5))
    anchor.requires_grad_(True)
    for ref in references:
        ref.requires_grad_(True)
    out = module(anchor, references, [(3, 5), (4, 4)])
    (out * torch.randn_like(out)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [anchor, *references])


def test_final_norm_off_is_plain_residual() -> None:
    torch.manual_seed(3)
    plain = _randomise(VisualCueEnhancer(DIM, 2, heads=HEADS, points=POINTS, final_norm=False))
    normed = VisualCueEnhancer(DIM, 2, heads=HEADS, points=POINTS, final_norm=True)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert (missing, unexpected) == (["norm.weight", "norm.bias"], [])
    assert plain.norm is None and "norm.weight" not in plain.state_dict()
    anchor, references = _inputs([(2, 3)] * 2, (2, 3))
    without = plain(anchor, references, (2, 3))
    with_norm = normed(anchor, references, (2, 3))
    torch.testing.assert_close(with_norm, torch.nn.functional.layer_norm(without, (DIM,), eps=1e-6))
    with torch.no_grad():
        plain.output_proj.weight.zero_()
        plain.output_proj.bias.zero_()
    assert torch.equal(plain(anchor, references, (2, 3)), anchor)


def test_bfloat16_module_tracks_float32() -> None:
    torch.manual_seed(4)
    module = _randomise(VisualCueEnhancer(DIM, 2, heads=HEADS, points=POINTS))
    anchor, references = _inputs([(4, 6)] * 2, (4, 6))
    want = module(anchor, references, (4, 6))
    half = module.to(torch.bfloat16)
    got = half(anchor.bfloat16(), [r.bfloat16() for r in references], (4, 6))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda m, a, r: m(a, r[:1], (3, 4)), r"references must be a list of 2 maps \(num_levels\), got 1"),
        (lambda m, a, r: m(a, torch.stack(r), (3, 4)), "got a single tensor"),
        (lambda m, a, r: m(a[..., :8], r, (3, 4)), r"anchor must be \[batch, patches, 16\], got \[2, 12, 8\]"),
        (lambda m, a, r: m(a, r, (2, 5)), r"references\[0\] must be \[2, 10, 16\]"),
        (lambda m, a, r: m(a, r, [(3, 4)] * 3), r"spatial_shapes must be one \(H, W\) for all levels or a list of 2"),
        (lambda m, a, r: m(a, r, (0, 4)), r"spatial_shapes must be a \(height, width\) pair of positive ints"),
        (lambda m, a, r: m(a, r, [(3, 4), (12, 1)], anchor_shape=(2, 5)), "pass anchor_shape"),
        (lambda m, a, r: m(a[:, :6], r, (3, 4)), r"anchor has 6 patches but its grid \(3, 4\) holds 12"),
    ],
)
def test_shape_errors_name_the_argument(call, fragment: str) -> None:
    module = VisualCueEnhancer(DIM, 2, heads=HEADS, points=POINTS)
    anchor, references = _inputs([(3, 4)] * 2, (3, 4))
    with pytest.raises(ValueError, match=fragment):
        call(module, anchor, references)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"vce.heads \(16\) must divide the vision feature size dim \(1000\)"):
        VisualCueEnhancer(1000, 4, heads=16)
    with pytest.raises(ValueError, match=r"vce.heads \(7\) must divide .* dim \(64\)"):
        VisualCueEnhancer.from_config(VCESection(heads=7), 64)
    with pytest.raises(ValueError, match="vce.points must be a positive integer"):
        VisualCueEnhancer(64, 2, heads=4, points=0)


def _tiny_clip_states() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(5)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, image_size=32, patch_size=8
    )
    tower = CLIPVisionModel(config).eval()
    with torch.no_grad():
        return tower(pixel_values=torch.randn(2, 3, 32, 32), output_hidden_states=True).hidden_states


def test_select_vision_features_picks_layers_from_clip() -> None:
    states = _tiny_clip_states()
    assert len(states) == 7 and states[0].shape == (2, 17, 32)
    cfg = VCESection(anchor_layer=-2, reference_layers=[-3, -5], include_anchor_level=True)
    anchor, references, grid = select_vision_features(states, cfg)
    assert grid == (4, 4)
    assert torch.equal(anchor, states[5][:, 1:])
    assert len(references) == 3
    for got, layer in zip(references, [5, 4, 2]):
        assert torch.equal(got, states[layer][:, 1:])
    out = VisualCueEnhancer.from_config(cfg, 32)(anchor, references, grid)
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()

    no_anchor = cfg.model_copy(update={"include_anchor_level": False, "anchor_layer": 3})
    anchor, references, _ = select_vision_features(states, no_anchor)
    assert torch.equal(anchor, states[3][:, 1:])
    assert len(references) == 2
    assert torch.equal(references[0], states[4][:, 1:]) and torch.equal(references[1], states[2][:, 1:])


def test_select_vision_features_grid_and_layer_errors() -> None:
    states = tuple(torch.randn(1, 1 + 21, 8) for _ in range(4))
    cfg = VCESection(anchor_layer=-1, reference_layers=[-2], include_anchor_level=False)
    with pytest.raises(ValueError, match=r"21 patches do not form a square grid; pass grid=\(H, W\)"):
        select_vision_features(states, cfg)
    assert select_vision_features(states, cfg, grid=(3, 7))[2] == (3, 7)
    with pytest.raises(ValueError, match=r"grid \(4, 5\) holds 20 patches but the maps have 21"):
        select_vision_features(states, cfg, grid=(4, 5))
    with pytest.raises(ValueError, match=r"vce.reference_layers\[0\] = -9 is outside hidden_states \(4 entries"):
        select_vision_features(states, cfg.model_copy(update={"reference_layers": [-9]}))
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        select_vision_features(states[0], cfg)
