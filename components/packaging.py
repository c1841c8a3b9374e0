"""The MLflow pyfunc flavour of a fine-tuned duet model: what goes into the package, how it loads, how it answers.

components/tracking/tracker.py is the module that talks to MLflow (runs, logging, the logged-model record);
this module owns only the model flavour and hands the package to ``Tracker.log_pyfunc``.

Package contents (the MLflow model's artifacts):

``config``  the resolved pipeline config (YAML, redacted like every other logged text).
``stage2``  the stage-2 artifact: VCE + projector safetensors, the PEFT adapter, artifact.json.
``base``    the base checkpoint. It is copied into the package only when it is a local tiny model
            (``model.arch: tiny``) no larger than ``EMBED_BASE_MAX_BYTES``, so test and demo models are
            self-contained. Otherwise the folder holds ``base.json`` with the checkpoint's URI: a 7B base
            is not duplicated into every model version, and the URI (``s3://...`` or a shared path)
            must be readable where the model is loaded (object-store checkpoints are downloaded once
            per machine, see ``components.model.llava.local_checkpoint``).

The model itself is logged as code (MLflow's models-from-code: a two-line script that builds
``DuetPyfunc``), never pickled, so loading it unpickles nothing. The ``components`` package travels
as ``code_paths``, so the model loads in a fresh process with no checkout on ``sys.path``; pip
requirements are pinned to the versions installed when logging.

Input: a DataFrame with ``image`` (PNG/JPEG bytes, or a base64 string, optionally a ``data:`` URL;
empty for a text-only prompt) and ``prompt`` (the question; ``<image>`` is put in front when the
prompt has none). Output: one greedy answer per row, asked in the training template exactly as the
evaluation asks (components/evaluate/prompts.py and generate.py), so the served model answers what the evaluated one answered.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd
import yaml
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import components
from components import storage
from components.config import DuetConfig, config_from_dict, dump_config
from components.data.conversation import ConversationError
from components.data.records import BadRecord
from components.evaluate.generate import Generator
from components.evaluate.prompts import IMAGE_TOKEN, PromptBuilder, visual_token_count
from components.model.artifact import ARTIFACT_ADAPTER, ARTIFACT_CONFIG, read_artifact_meta
from components.tracking.redact import redact
from components.tracking.tracker import Tracker

EMBED_BASE_MAX_BYTES = 512 * 2**20
BASE_REFERENCE = "base.json"
# The model is logged as code (MLflow's models-from-code), not as a pickle: loading it unpickles nothing.
MODEL_CODE_FILE = "duet_model.py"
MODEL_CODE = "import mlflow.models\n\nfrom components.packaging import DuetPyfunc\n\nmlflow.models.set_model(DuetPyfunc())\n"
ARTIFACT_KEYS = ("config", "stage2", "base")
# Distributions the loaded model imports (components.packaging and what it pulls in); mlflow adds itself.
MODEL_REQUIREMENTS = (
    "torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "pillow", "numpy", "pandas",
    "pydantic", "pyyaml", "pyarrow", "ray", "sacrebleu", "rouge-score", "matplotlib",
)


# ---------------------------------------------------------------- the flavour


def _image_bytes(value: Any, row: int) -> bytes | None:
    """Raw image bytes of one cell: bytes as they are, base64 text (or a data: URL) decoded, empty -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value) or None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"row {row}: 'image' is a string but not valid base64 (send PNG/JPEG bytes or base64)"
            ) from None
    raise ValueError(f"row {row}: 'image' must be PNG/JPEG bytes or a base64 string, got {type(value).__name__}")


def _turns(prompt: Any, has_image: bool, row: int) -> list[dict]:
    """The single human turn of a request; an image without a placeholder gets LLaVA's leading '<image>\\n'."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"row {row}: 'prompt' must be a non-empty string")
    if has_image and IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n{prompt}"
    if not has_image and IMAGE_TOKEN in prompt:
        raise ValueError(f"row {row}: the prompt has an {IMAGE_TOKEN!r} placeholder but 'image' is empty")
    return [{"from": "human", "value": prompt}]


class DuetPyfunc(mlflow.pyfunc.PythonModel):
    """A fine-tuned duet LLaVA (base + VCE + projector + adapter) answering image + prompt rows greedily."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.cfg = package_config(context.artifacts["config"], context.artifacts["base"])
        checkpoint = self.cfg.model.checkpoint or ""
        self.builder = PromptBuilder.from_config(self.cfg, checkpoint, visual_token_count(self.cfg))
        self.generator = Generator(self.cfg, context.artifacts["stage2"], checkpoint)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One answer per row of `model_input` (columns ``image`` and ``prompt``)."""
        if not isinstance(model_input, pd.DataFrame):
            raise ValueError(f"expected a pandas DataFrame with columns image and prompt, got {type(model_input).__name__}")
        missing = [c for c in ("image", "prompt") if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks the column(s) {missing}: send 'image' (bytes or base64) and 'prompt'")
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.cfg.eval.max_new_tokens)
        prompts, images = [], []
        for row, (image, prompt) in enumerate(zip(model_input["image"], model_input["prompt"])):
            data = _image_bytes(image, row)
            turns = _turns(prompt, data is not None, row)
            try:
                prompts.append(self.builder.encode(self.builder.text(turns), 0 if data is None else 1))
                images.append(self.builder.images([] if data is None else [data]))
            except (BadRecord, ConversationError) as exc:
                raise ValueError(f"row {row}: {exc}") from None
        answers: list[str] = []
        size = self.cfg.eval.batch_size
        for start in range(0, len(prompts), size):
            answers += self.generator.generate(prompts[start:start + size], images[start:start + size], max_new_tokens)
        return answers


def package_config(config_file: str | Path, base_dir: str | Path) -> DuetConfig:
    """A package's config with model.checkpoint set to its base (embedded, or the URI base.json names)."""
    tree = yaml.safe_load(Path(config_file).read_text())
    tree.setdefault("model", {})["checkpoint"] = base_checkpoint(str(base_dir))
    return config_from_dict(tree)


def base_checkpoint(base_dir: str | Path) -> str:
    """The base checkpoint of a loaded package: the embedded folder, or the URI its base.json names."""
    reference = Path(base_dir) / BASE_REFERENCE
    if reference.is_file():
        return str(json.loads(reference.read_text())["uri"])
    return base_dir


# ---------------------------------------------------------------- building the package


def signature(max_new_tokens: int) -> ModelSignature:
    """image (bytes; base64 text is accepted too) + prompt -> answer, with max_new_tokens as a parameter."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]),
    )


def pinned_requirements(names: tuple[str, ...] = MODEL_REQUIREMENTS) -> list[str]:
    """``name==version`` of the installed distributions; local build labels (``+cpu``) are dropped."""
    pins = []
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{name} is not installed, but the packaged model needs it; install the project") from None
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return pins


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def should_embed_base(cfg: DuetConfig, max_bytes: int = EMBED_BASE_MAX_BYTES) -> bool:
    """Copy the base into the package only for a local tiny checkpoint no larger than `max_bytes`."""
    checkpoint = cfg.model.checkpoint
    if cfg.model.arch != "tiny" or not checkpoint or storage.is_remote(checkpoint):
        return False
    path = Path(storage.resolve(checkpoint)[1])
    return path.is_dir() and _dir_size(path) <= max_bytes


def stage_package(cfg: DuetConfig, stage2_artifact_uri: str, out_dir: str,
                  embed_max_bytes: int = EMBED_BASE_MAX_BYTES) -> dict[str, str]:
    """Write the package's artifacts under `out_dir`; returns MLflow's artifacts mapping (key -> local path)."""
    meta = read_artifact_meta(stage2_artifact_uri, cfg.storage)
    if meta.stage != 2:
        raise ValueError(
            f"{stage2_artifact_uri!r} is a stage-{meta.stage} artifact: package the stage-2 (fine-tuned) artifact"
        )
    if not cfg.model.checkpoint:
        raise ValueError("model.checkpoint is not set: the package needs the base checkpoint (path or URI)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(redact(dump_config(cfg)))
    stage2 = out / "stage2"
    storage.download_dir(stage2_artifact_uri, stage2, cfg.storage)
    (stage2 / ARTIFACT_CONFIG).unlink(missing_ok=True)  # the package's own config is the one that loads
    if meta.adapter_type not in (None, "none") and not (stage2 / ARTIFACT_ADAPTER).is_dir():
        raise ValueError(f"stage-2 artifact {stage2_artifact_uri!r} has no {ARTIFACT_ADAPTER}/ folder; was it finished?")
    base = out / "base"
    if should_embed_base(cfg, embed_max_bytes):
        shutil.copytree(storage.resolve(cfg.model.checkpoint)[1], base)
    else:
        base.mkdir()
        (base / BASE_REFERENCE).write_text(json.dumps({"uri": cfg.model.checkpoint}))
    return {"config": str(config), "stage2": str(stage2), "base": str(base)}


def log_pyfunc(cfg: DuetConfig, stage2_artifact_uri: str, run_id: str, artifact_path: str = "model",
               embed_max_bytes: int = EMBED_BASE_MAX_BYTES) -> str:
    """Log the fine-tuned model as a pyfunc under `run_id`; returns its ``runs:/RUN/PATH`` URI."""
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    with tempfile.TemporaryDirectory(prefix="duet-package-") as tmp:
        artifacts = stage_package(cfg, stage2_artifact_uri, tmp, embed_max_bytes)
        code = Path(tmp, MODEL_CODE_FILE)
        code.write_text(MODEL_CODE)
        model_uri = tracker.log_pyfunc(
            run_id, artifact_path, str(code), artifacts=artifacts,  # type: ignore[arg-type]  # models from code
            pip_requirements=pinned_requirements(),
            code_paths=[str(Path(components.__file__).resolve().parent)],
            signature=signature(cfg.eval.max_new_tokens),  # given, so MLflow does not try type hints and warn
        )
    return model_uri
