"""The synthetic shapes set: deterministic random access, answers that match the pixels."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from components.data.synthetic import COLOURS, POSITIONS, SyntheticShapes

NUMERIC = re.compile(r"^count: (\d+), area: (\d+\.\d)$")


def test_record_is_a_pure_function_of_seed_and_index() -> None:
    a, b = SyntheticShapes(7, 64), SyntheticShapes(7, 64)
    sequential = list(a.records(0, 12))
    assert b.record(11) == sequential[11]  # random access gives the same record as sequential generation
    assert b.record(3) == a.record(3)
    assert SyntheticShapes(8, 64).record(3) != a.record(3)
    assert SyntheticShapes(7, 64, "caption").record(3)["images"] != a.record(3)["images"]


def test_instruction_answers_match_structured_truth() -> None:
    gen = SyntheticShapes(0, 64)
    tasks = Counter()
    for i in range(60):
        rec = gen.record(i)
        tasks[rec["task"]] += 1
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        answer, fields = gpt["value"], rec["answer_fields"]
        scene = gen.scene(i)
        if rec["task"] == "items":
            assert answer.split(", ") == fields["items"] == [s.item for s in scene.shapes]
        elif rec["task"] == "numeric":
            count, area = NUMERIC.match(answer).groups()
            assert int(count) == fields["count"] == len(scene.shapes)
            assert float(area) == fields["area"] == max(s.area_pct for s in scene.shapes)
        else:
            assert answer == fields["reference"]
            for s in scene.shapes:
                assert f"{s.size} {s.colour} {s.kind} {POSITIONS[s.cell][1]}" in answer
    assert tasks == {"items": 20, "description": 20, "numeric": 20}


def test_caption_stream() -> None:
    rec = SyntheticShapes(0, 64, "caption").record(0)
    assert rec["task"] == "caption"
    assert rec["conversations"][1]["value"] == rec["answer_fields"]["caption"]
    assert rec["conversations"][1]["value"].startswith("a ")


def test_pixels_agree_with_the_scene() -> None:
    gen = SyntheticShapes(3, 192)
    for i in range(20):
        scene = gen.scene(i)
        pixels = np.asarray(Image.open(io.BytesIO(gen.png(i))))
        assert pixels.shape == (192, 192, 3)
        for shape in scene.shapes:
            colour = COLOURS[shape.colour]
            assert tuple(pixels[int(shape.cy), int(shape.cx)]) == colour
            # The shape's own pixels inside its grid cell match the analytic area up to the rounding of
            # area_pct (0.05% of the image) and a one-pixel band along the outline (at most 2*pi*r).
            cell = 64
            r0, c0 = (shape.cell // 3) * cell, (shape.cell % 3) * cell
            patch = pixels[r0:r0 + cell, c0:c0 + cell]
            drawn = int(np.all(patch == colour, axis=-1).sum())
            tolerance = 0.0005 * 192 * 192 + 2 * np.pi * shape.radius
            assert abs(drawn - shape.area_pct / 100 * 192 * 192) <= tolerance


def test_shapes_never_share_a_cell_and_count_is_one_to_four() -> None:
    gen = SyntheticShapes(1, 64)
    counts = Counter()
    for i in range(200):
        cells = [s.cell for s in gen.scene(i).shapes]
        assert len(cells) == len(set(cells)) and cells == sorted(cells)
        counts[len(cells)] += 1
    assert set(counts) == {1, 2, 3, 4}


def test_too_small_image_is_refused() -> None:
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(0, 16)
