"""The pyfunc package: logged to a local SQLite MLflow store, loaded in a fresh process without the checkout."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import pytest
from probe_output import PROBE_MARK, probe_json
from test_evaluate import EvalSetup, eval_setup  # noqa: F401  (session fixture shared with the evaluation tests)

from components.config import DuetConfig
from components.data.synthetic import SyntheticShapes
from components.evaluate.generate import Generator
from components.evaluate.prompts import PromptBuilder, visual_token_count
from components.packaging import (
    BASE_REFERENCE,
    MODEL_REQUIREMENTS,
    base_checkpoint,
    log_pyfunc,
    should_embed_base,
    stage_package,
)
from components.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[1]
PROMPT = "List the shapes in the image."


@dataclass(frozen=True)
class Logged:
    cfg: DuetConfig
    model_uri: str
    tracking_uri: str


@pytest.fixture(scope="module")
def logged(eval_setup: EvalSetup, tmp_path_factory: pytest.TempPathFactory) -> Logged:  # noqa: F811
    work = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = eval_setup.cfg.model_copy(update={
        "run": eval_setup.cfg.run.model_copy(update={"work_dir": str(work)}),
        "tracking": eval_setup.cfg.tracking.model_copy(update={"tracking_uri": tracking_uri, "experiment": "pack"}),
    })
    with Tracker(cfg.tracking, cfg.run.work_dir).parent_run("package") as run_id:
        model_uri = log_pyfunc(cfg, eval_setup.stage2, run_id)
    return Logged(cfg, model_uri, tracking_uri)


def _image() -> bytes:
    return SyntheticShapes(11, 64).png(0)


def _in_process_answer(setup: EvalSetup) -> str:
    """The evaluation path's greedy answer for the same image and prompt."""
    builder = PromptBuilder.from_config(setup.cfg, setup.base, visual_token_count(setup.cfg))
    generator = Generator(setup.cfg, setup.stage2, setup.base, "cpu")
    ids = builder.encode(builder.text([{"from": "human", "value": f"<image>\n{PROMPT}"}]), 1)
    return generator.generate([ids], [builder.images([_image()])], setup.cfg.eval.max_new_tokens)[0]


_FRESH_PROCESS = textwrap.dedent("""
    import base64, importlib.util, json, os, sys
    # No checkout on the path: drop the editable install's finder and the repository root.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != sys.argv[2]]
    assert importlib.util.find_spec("components") is None, "the repository is still importable"
    import mlflow.pyfunc, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    image = open(sys.argv[3], "rb").read()
    frame = pd.DataFrame({"image": [image, base64.b64encode(image).decode()], "prompt": [sys.argv[4]] * 2})
    answers = list(model.predict(frame))
    print(__MARK__ + json.dumps({"answers": answers, "components": sys.modules["components"].__file__}))
""").replace("__MARK__", repr(PROBE_MARK))


@pytest.mark.slow
def test_logged_model_loads_in_a_fresh_process_and_answers_as_evaluated(
    logged: Logged, eval_setup: EvalSetup, tmp_path: Path  # noqa: F811
) -> None:
    image = tmp_path / "shapes.png"
    image.write_bytes(_image())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = logged.tracking_uri
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, logged.model_uri, str(REPO), str(image), PROMPT],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = probe_json(done.stdout)
    assert not out["components"].startswith(str(REPO))  # the package's own copy of the code was used
    expected = _in_process_answer(eval_setup)
    assert expected and out["answers"] == [expected, expected]


@pytest.mark.slow
def test_package_signature_requirements_and_input_checks(logged: Logged, monkeypatch: pytest.MonkeyPatch) -> None:
    # set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment: restored after this test, so
    # later tests (and the processes they start) do not log into this test's store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(logged.tracking_uri)
    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature.inputs.input_names() == ["image", "prompt"]
    assert info.signature.params.params[0].name == "max_new_tokens"
    pins = Path(mlflow.pyfunc.get_model_dependencies(logged.model_uri)).read_text().split()
    assert {p.split("==")[0] for p in pins} >= set(MODEL_REQUIREMENTS) | {"mlflow"}
    assert all("==" in p and "+" not in p for p in pins)
    model = mlflow.pyfunc.load_model(logged.model_uri).unwrap_python_model()
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]"):
        model.predict(None, pd.DataFrame({"image": [_image()]}))
    with pytest.raises(ValueError, match="row 1: 'image' is a string but not valid base64"):
        model.predict(None, pd.DataFrame({"image": [_image(), "not base64!"], "prompt": [PROMPT, PROMPT]}))
    with pytest.raises(ValueError, match="row 0: corrupt_image"):
        model.predict(None, pd.DataFrame({"image": [b"\x89PNG broken"], "prompt": [PROMPT]}))
    with pytest.raises(ValueError, match="placeholder but 'image' is empty"):
        model.predict(None, pd.DataFrame({"image": [None], "prompt": ["<image> what is it?"]}))
    data_url = "data:image/png;base64," + base64.b64encode(_image()).decode()
    short = model.predict(None, pd.DataFrame({"image": [data_url, None], "prompt": [PROMPT, "count: 1"]}),
                          params={"max_new_tokens": 2})
    assert len(short) == 2 and all(isinstance(a, str) for a in short)


def test_base_is_embedded_only_when_local_tiny_and_small(eval_setup: EvalSetup, tmp_path: Path) -> None:  # noqa: F811
    cfg = eval_setup.cfg
    assert should_embed_base(cfg)
    assert not should_embed_base(cfg, max_bytes=1)
    assert not should_embed_base(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"checkpoint": "s3://models/tiny"})}))
    embedded = stage_package(cfg, eval_setup.stage2, str(tmp_path / "a"))
    assert (Path(embedded["base"]) / "config.json").is_file() and base_checkpoint(embedded["base"]) == embedded["base"]
    referenced = stage_package(cfg, eval_setup.stage2, str(tmp_path / "b"), embed_max_bytes=1)
    assert [p.name for p in Path(referenced["base"]).iterdir()] == [BASE_REFERENCE]
    assert base_checkpoint(referenced["base"]) == cfg.model.checkpoint
    assert not (Path(referenced["stage2"]) / "config.yaml").exists()  # one config: the package's
    assert "model:" in Path(referenced["config"]).read_text()
    with pytest.raises(ValueError, match="stage-1 artifact: package the stage-2"):
        stage_package(cfg, eval_setup.stage1, str(tmp_path / "c"))
