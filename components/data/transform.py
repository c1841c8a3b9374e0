"""CLIP image preprocessing (LLaVA-1.5 style) with PIL + numpy, normalisation vectorised over a batch.

Per image: pad to a square with the mean colour (LLaVA's ``image_aspect_ratio: pad``),
resize the shorter side to ``size`` (bicubic, as CLIPImageProcessor), centre-crop to
``crop_size``. Per batch: one vectorised rescale + normalise + HWC->CHW. The numbers
(size, crop, mean, std, resampling) come from the model directory's image processor
config, so the transform always matches the vision tower it feeds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from components.data.records import BadRecord, decode_image

PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower expects; `shortest_edge` None means resize straight to (height, width)."""

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC
    pad_to_square: bool = True

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_hw is not None:
            return self.crop_hw
        if self.resize_hw is not None:
            return self.resize_hw
        assert self.shortest_edge is not None
        return (self.shortest_edge, self.shortest_edge)


def _hw(value: object, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    raise ValueError(f"{where}: expected an int or {{height, width}}, got {value!r}")


def image_spec_from_config(config: dict, where: str, pad_to_square: bool = True) -> ImageSpec:
    """An ImageSpec from a Hugging Face image processor config dict."""
    try:
        mean = tuple(float(v) for v in config["image_mean"])
        std = tuple(float(v) for v in config["image_std"])
        size = config.get("size", config.get("crop_size"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: image processor config lacks image_mean/image_std ({exc})") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{where}: image_mean/image_std must have 3 values and std > 0")
    shortest = resize_hw = None
    if config.get("do_resize", True):
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            resize_hw = _hw(size, f"{where}: size")
    crop = _hw(config["crop_size"], f"{where}: crop_size") if config.get("do_center_crop", True) and config.get(
        "crop_size") is not None else None
    if shortest is None and resize_hw is None and crop is None:
        raise ValueError(f"{where}: neither resize nor crop is configured; the output size would vary")
    return ImageSpec(shortest, resize_hw, crop, mean, std,  # type: ignore[arg-type]
                     int(config.get("resample", Image.Resampling.BICUBIC)), pad_to_square)


def load_image_spec(processor_dir: str, pad_to_square: bool = True) -> ImageSpec:
    """Read preprocessor_config.json (or processor_config.json's image_processor) from a model directory."""
    for name in PREPROCESSOR_FILES:
        path = os.path.join(processor_dir, name)
        if os.path.isfile(path):
            with open(path) as handle:
                config = json.load(handle)
            config = config.get("image_processor", config)
            return image_spec_from_config(config, path, pad_to_square)
    raise FileNotFoundError(
        f"no {' or '.join(PREPROCESSOR_FILES)} in {processor_dir}; save the model's image processor there "
        "(e.g. CLIPImageProcessor(...).save_pretrained(dir))"
    )


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of the fill colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_and_crop(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One RGB image -> uint8 array (H, W, 3) at the spec's output size (pad, resize, centre crop)."""
    if spec.pad_to_square:
        image = expand_to_square(image, tuple(int(m * 255) for m in spec.mean))  # type: ignore[arg-type]
    width, height = image.size
    if spec.shortest_edge is not None:
        short, long = min(width, height), max(width, height)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, resample=spec.resample)
    elif spec.resize_hw is not None and (spec.resize_hw[1], spec.resize_hw[0]) != image.size:
        image = image.resize((spec.resize_hw[1], spec.resize_hw[0]), resample=spec.resample)
    array = np.asarray(image, dtype=np.uint8)
    if spec.crop_hw is None:
        return array
    return center_crop(array, spec.crop_hw)


def image_pixels(data: bytes, spec: ImageSpec, max_pixels: int) -> np.ndarray:
    """Encoded image -> uint8 (H, W, 3) at the spec's output size; bad images raise BadRecord (corrupt_image).

    Padding to a square allocates a side x side canvas, so the pixel limit applies to that canvas too:
    a 1 x 100000 strip passes the area check of decode_image but its canvas would take 30 GB.
    """
    image = decode_image(data, max_pixels)
    side = max(image.size)
    if spec.pad_to_square and side * side > max_pixels:
        raise BadRecord(
            "corrupt_image",
            f"{image.width}x{image.height}: its {side}x{side} square padding exceeds the {max_pixels}-pixel limit",
        )
    return resize_and_crop(image, spec)


def center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Centre crop (zero-padding when the image is smaller), as CLIPImageProcessor does."""
    crop_h, crop_w = crop_hw
    height, width = array.shape[:2]
    if height < crop_h or width < crop_w:
        padded = np.zeros((max(height, crop_h), max(width, crop_w), 3), dtype=array.dtype)
        top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
        padded[top:top + height, left:left + width] = array
        array, height, width = padded, padded.shape[0], padded.shape[1]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return array[top:top + crop_h, left:left + crop_w]


def normalize(batch: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W): rescale to [0, 1], subtract mean, divide by std."""
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    out = (batch.astype(np.float32) * np.float32(1 / 255) - mean) / std
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
