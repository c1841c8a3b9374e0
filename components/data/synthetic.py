"""A learnable synthetic multi-task set: coloured shapes on plain or lightly textured backgrounds.

It mirrors UniFood's three instruction families, so the whole pipeline (and its
metrics) can be exercised without downloading anything:

- ``caption`` (stage 1): "a large red circle and a small blue square".
- ``items`` (set answer, IoU/F1): "List the shapes in the image." -> "red circle, blue square".
- ``description`` (free text, SacreBLEU/ROUGE-L): where each shape is and how big it is.
- ``numeric`` (pMAE): "count: 3, area: 12.5" where ``count`` is the number of shapes and
  ``area`` is the area of the largest shape in percent of the image (one decimal).

Record ``i`` of a stream is a pure function of ``(seed, stream, i)``: nothing is
held in memory, any index can be generated on its own, and the set scales from
hundreds to millions of records. Shapes sit in distinct cells of a 3x3 grid (so
they never overlap and each has a unique position word) with a small jitter;
items are listed in reading order (top-left first).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("caption", "items", "description", "numeric")
INSTRUCTION_TASKS = ("items", "description", "numeric")
STREAMS = {"caption": 1, "instruct": 2}

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "gray": (190, 190, 190), "beige": (235, 222, 195)}
TEXTURES = ("plain", "noisy", "striped")
# 3x3 grid cells in reading order, with the phrase used in descriptions.
POSITIONS = (
    ("top left", "in the top left"), ("top", "at the top"), ("top right", "in the top right"),
    ("left", "on the left"), ("center", "in the center"), ("right", "on the right"),
    ("bottom left", "in the bottom left"), ("bottom", "at the bottom"), ("bottom right", "in the bottom right"),
)
# Radius as a fraction of half a grid cell.
SIZES = {"small": (0.45, 0.6), "large": (0.8, 0.95)}

ITEM_QUESTIONS = (
    "List the shapes in the image.",
    "Which shapes can you see? Answer with a comma-separated list.",
    "Name every shape in the picture with its colour.",
)
DESCRIPTION_QUESTIONS = (
    "Describe the layout of the image.",
    "Where is each shape in the picture, and how big is it?",
    "Give a short description of the scene.",
)
NUMERIC_QUESTION = (
    "How many shapes are there and how large is the biggest one? "
    "Answer as 'count: N, area: A' with A in percent of the image."
)
CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``area_pct`` is its exact geometric area in percent of the image."""

    kind: str
    colour: str
    size: str
    cell: int
    cx: float
    cy: float
    radius: float
    area_pct: float

    @property
    def item(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image and to write its questions and answers."""

    background: str
    texture: str
    shapes: tuple[Shape, ...]
    image_size: int
    seed: int
    stream: str
    index: int


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred on (cx, cy) with circumradius r (y grows downwards)."""
    if kind == "square":
        s = 0.8 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if kind == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {kind!r}")


def _area(kind: str, r: float) -> float:
    """Exact area in pixels^2 (shoelace formula on the same vertices that are drawn)."""
    if kind == "circle":
        return math.pi * r * r
    pts = _polygon(kind, 0.0, 0.0, r)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def format_numeric(fields: dict[str, float]) -> str:
    """The fixed, parseable numeric answer form: ``name: value`` pairs joined by ', '."""
    return ", ".join(f"{k}: {v:g}" if isinstance(v, int) else f"{k}: {v:.1f}" for k, v in fields.items())


class SyntheticShapes:
    """Lazy, random-access generator of shape scenes and their records for one (seed, stream)."""

    def __init__(self, seed: int, image_size: int = 64, stream: str = "instruct") -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
        if image_size < 24:
            raise ValueError(f"data.image_size must be >= 24 pixels for shapes to be drawable, got {image_size}")
        self.seed = seed
        self.image_size = image_size
        self.stream = stream

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"record index must be >= 0, got {index}")
        return np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, STREAMS[self.stream], index]))

    def scene(self, index: int) -> Scene:
        """The scene of record ``index`` (pure function of seed, stream and index)."""
        rng = self._rng(index)
        size = self.image_size
        cell = size / 3
        count = int(rng.integers(1, 5))
        cells = sorted(int(c) for c in rng.choice(9, size=count, replace=False))
        colours = list(COLOURS)
        shapes = []
        for c in cells:
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = colours[int(rng.integers(len(colours)))]
            size_name = "small" if rng.random() < 0.5 else "large"
            lo, hi = SIZES[size_name]
            radius = float(rng.uniform(lo, hi)) * cell / 2
            slack = cell / 2 - radius
            cx = (c % 3 + 0.5) * cell + float(rng.uniform(-slack, slack))
            cy = (c // 3 + 0.5) * cell + float(rng.uniform(-slack, slack))
            area = round(100 * _area(kind, radius) / (size * size), 1)
            shapes.append(Shape(kind, colour, size_name, c, cx, cy, radius, area))
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        return Scene(background, texture, tuple(shapes), size, self.seed, self.stream, index)

    def render(self, scene: Scene) -> Image.Image:
        """Draw the scene as an RGB image; the texture noise is seeded by the scene too."""
        size = scene.image_size
        base = np.empty((size, size, 3), dtype=np.int16)
        base[:] = BACKGROUNDS[scene.background]
        if scene.texture == "noisy":
            noise_rng = np.random.default_rng(np.random.SeedSequence([scene.seed & 0xFFFFFFFF, 99, scene.index]))
            base += noise_rng.integers(-10, 11, size=(size, size, 1), dtype=np.int16)
        elif scene.texture == "striped":
            base[::4] -= 18
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for shape in scene.shapes:
            fill = COLOURS[shape.colour]
            if shape.kind == "circle":
                r = shape.radius
                draw.ellipse((shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r), fill=fill)
            else:
                draw.polygon(_polygon(shape.kind, shape.cx, shape.cy, shape.radius), fill=fill)
        return image

    def png(self, index: int) -> bytes:
        """PNG bytes of record ``index``'s image (deterministic)."""
        buffer = io.BytesIO()
        self.render(self.scene(index)).save(buffer, format="PNG", optimize=False, compress_level=6)
        return buffer.getvalue()

    # ------------------------------------------------------------ texts

    @staticmethod
    def caption(scene: Scene) -> str:
        return _join([f"a {s.size} {s.colour} {s.kind}" for s in scene.shapes])

    @staticmethod
    def description(scene: Scene) -> str:
        parts = [f"a {s.size} {s.colour} {s.kind} {POSITIONS[s.cell][1]}" for s in scene.shapes]
        texture = {"plain": "plain", "noisy": "grainy", "striped": "striped"}[scene.texture]
        return f"{_join(parts)}, on a {texture} {scene.background} background."

    @staticmethod
    def numeric_fields(scene: Scene) -> dict[str, float]:
        return {"count": len(scene.shapes), "area": max(s.area_pct for s in scene.shapes)}

    def record(self, index: int) -> dict:
        """Record ``index``: conversations, task metadata, structured ground truth and the PNG image."""
        scene = self.scene(index)
        rng = self._rng(index)
        rng.integers(1 << 30, size=64)  # move away from the values the scene drew
        if self.stream == "caption":
            task = "caption"
            question, answer = CAPTION_PROMPT, self.caption(scene)
            fields: dict = {"caption": answer}
        else:
            task = INSTRUCTION_TASKS[index % len(INSTRUCTION_TASKS)]
            if task == "items":
                items = [s.item for s in scene.shapes]
                question = ITEM_QUESTIONS[int(rng.integers(len(ITEM_QUESTIONS)))]
                answer, fields = ", ".join(items), {"items": items}
            elif task == "description":
                question = DESCRIPTION_QUESTIONS[int(rng.integers(len(DESCRIPTION_QUESTIONS)))]
                answer = self.description(scene)
                fields = {"reference": answer}
            else:
                fields = self.numeric_fields(scene)
                question, answer = NUMERIC_QUESTION, format_numeric(fields)
        return {
            "id": f"shapes-{self.stream}-{self.seed}-{index:09d}",
            "task": task,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "answer_fields": fields,
            "images": [("png", self.png(index))],
        }

    def records(self, start: int, stop: int) -> Iterator[dict]:
        """Records ``start`` .. ``stop - 1``, generated one at a time."""
        for index in range(start, stop):
            yield self.record(index)
