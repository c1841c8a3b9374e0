"""The serving engine in-process: versions over one shared base, answers equal to the evaluation's, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import EvalSetup, eval_setup  # noqa: F401  (session fixture: a tiny base and its stage artifacts)

from components.data.synthetic import SyntheticShapes
from components.evaluate.generate import Generator
from components.evaluate.prompts import PromptBuilder, visual_token_count
from components.model.artifact import load_stage_model, save_stage_artifact
from components.serve.engine import Engine, Job
from components.serve.versions import Package

QUESTIONS = ("List the shapes in the image.", "Describe the image.", "How many shapes are there? Answer briefly.")


def second_version(setup: EvalSetup) -> str:
    """Another stage-2 artifact on the same base: adapter and bridge perturbed away from the first (built once)."""
    uri = str(Path(setup.stage2).with_name("stage2-second"))
    if (Path(uri) / "artifact.json").is_file():
        return uri
    model = load_stage_model(setup.cfg, setup.stage2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:  # strongly: the tiny LM's answers must change
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_stage_artifact(model, setup.cfg, 2, uri, "digest")


@pytest.fixture(scope="session")
def second_stage2(eval_setup: EvalSetup) -> str:  # noqa: F811
    return second_version(eval_setup)


def requests(setup: EvalSetup, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prompts of different lengths, each with its own image, encoded as the evaluation encodes them."""
    builder = PromptBuilder.from_config(setup.cfg, setup.base, visual_token_count(setup.cfg))
    shapes = SyntheticShapes(5, 64)
    prompts = [builder.encode(builder.text([{"from": "human", "value": f"<image>\n{QUESTIONS[i % 3]}"}]), 1)
               for i in range(count)]
    return prompts, [builder.images([shapes.png(i)]) for i in range(count)]


@pytest.fixture(scope="module")
def engine(eval_setup: EvalSetup, second_stage2: str) -> Engine:  # noqa: F811
    engine = Engine("cpu")
    engine.load(Package("first", eval_setup.cfg, eval_setup.stage2))
    engine.load(Package("second", eval_setup.cfg, second_stage2))
    return engine


def test_two_versions_share_one_base_and_answer_as_the_evaluation_does(
        engine: Engine, eval_setup: EvalSetup, second_stage2: str) -> None:  # noqa: F811
    assert len(engine.bases) == 1 and len(engine.versions) == 2
    prompts, images = requests(eval_setup, 3)
    tokens = eval_setup.cfg.eval.max_new_tokens
    answers = {}
    for key, artifact in (("first", eval_setup.stage2), ("second", second_stage2)):
        expected = Generator(eval_setup.cfg, artifact, eval_setup.base, "cpu").generate(prompts, images, tokens)
        jobs = [Job(p, i, tokens) for p, i in zip(prompts, images)]
        answers[key] = [row.text for row in engine.generate(engine.versions[key], jobs)]
        assert answers[key] == expected
    assert answers["first"] != answers["second"], "the two adapters should answer differently"


def test_a_batch_answers_what_each_request_answers_alone(engine: Engine, eval_setup: EvalSetup) -> None:  # noqa: F811
    prompts, images = requests(eval_setup, 4)
    budgets = [3, 12, 7, 12]
    version = engine.versions["first"]
    jobs = [Job(p, i, b) for p, i, b in zip(prompts, images, budgets)]
    together = engine.generate(version, jobs)
    alone = [engine.generate(version, [job])[0] for job in jobs]
    assert [(r.text, r.tokens, r.finish) for r in together] == [(r.text, r.tokens, r.finish) for r in alone]
    assert [r.tokens for r in together] == budgets or any(r.finish == "stop" for r in together)


def test_a_stop_string_ends_the_answer_before_it(engine: Engine, eval_setup: EvalSetup) -> None:  # noqa: F811
    prompts, images = requests(eval_setup, 1)
    version = engine.versions["first"]
    full = engine.generate(version, [Job(prompts[0], images[0], 12)])[0].text
    assert len(full) > 3
    stop = full[2:4]
    cut = engine.generate(version, [Job(prompts[0], images[0], 12, stop=(stop,))])[0]
    assert cut.finish == "stop" and cut.text == full[:full.index(stop)].strip()


def test_streamed_states_add_up_to_the_answer(engine: Engine, eval_setup: EvalSetup) -> None:  # noqa: F811
    prompts, images = requests(eval_setup, 2)
    seen: list[list[str]] = []
    rows = engine.generate(engine.versions["second"], [Job(p, i, 12, stream=True) for p, i in zip(prompts, images)],
                           lambda states: seen.append([s.text for s in states]))
    assert len(seen) > 2
    for column, row in enumerate(rows):
        texts = [step[column] for step in seen]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert texts[-1] == row.text


def test_unloading_detaches_the_adapter_and_the_last_version_takes_the_base(
        eval_setup: EvalSetup, second_stage2: str) -> None:  # noqa: F811
    engine = Engine("cpu")
    first = engine.load(Package("first", eval_setup.cfg, eval_setup.stage2))
    engine.load(Package("second", eval_setup.cfg, second_stage2))
    base = first.base
    assert base is not None and len(base.adapters) == 2
    engine.unload("second")
    assert len(base.adapters) == 1 and set(base.model.peft_config) == {first.adapter}
    prompts, images = requests(eval_setup, 1)
    expected = Generator(eval_setup.cfg, eval_setup.stage2, eval_setup.base, "cpu").generate(prompts, images, 12)
    assert [r.text for r in engine.generate(first, [Job(prompts[0], images[0], 12)])] == expected
    engine.unload("first")
    assert not engine.bases and not engine.versions


def test_an_evicted_version_loaded_again_meanwhile_is_detached_as_itself(
        eval_setup: EvalSetup, second_stage2: str) -> None:  # noqa: F811
    engine = Engine("cpu")
    keep = engine.load(Package("keep", eval_setup.cfg, eval_setup.stage2))
    old = engine.load(Package("again", eval_setup.cfg, second_stage2))
    new = engine.load(Package("again", eval_setup.cfg, second_stage2))  # loaded again before `old` was freed
    assert engine.versions["again"] is new and keep.base is old.base is new.base
    engine.unload(old)
    assert engine.versions["again"] is new and old.adapter not in new.base.adapters
    assert set(new.base.adapters) == {keep.adapter, new.adapter}
    engine.unload(old)  # twice (Serve's eviction, then the garbage collector): nothing more happens
    prompts, images = requests(eval_setup, 1)
    expected = Generator(eval_setup.cfg, second_stage2, eval_setup.base, "cpu").generate(prompts, images, 12)
    assert [r.text for r in engine.generate(new, [Job(prompts[0], images[0], 12)])] == expected
