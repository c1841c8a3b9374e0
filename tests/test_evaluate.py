"""Evaluation: prompts in the training form, left-padded greedy generation, scoring, and Ray Data replicas."""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from components.config import DuetConfig, load_config
from components.data.conversation import (
    ConversationError,
    ImageMismatchError,
    SequenceTooLongError,
    render,
)
from components.data.prepare import prepare
from components.data.synthetic import SyntheticShapes
from components.errors import ArtifactError, DuetError
from components.evaluate.generate import Generator
from components.evaluate.metrics import primary_score
from components.evaluate.prompts import PromptBuilder, generation_prompt, split_reference, visual_token_count
from components.evaluate.report import comparison_table, write_table
from components.evaluate.run import check_model_source, evaluate
from components.evaluate.score import (
    TABLE_COLUMNS,
    TEXT_COLUMNS,
    EvalResult,
    reference_for,
    score_rows,
    task_family,
)
from components.layout import split_uri
from components.model.artifact import save_stage_artifact
from components.model.llava import VCEProjector, projector_module
from components.model.stages import build_model
from components.model.tiny import save_tiny_checkpoint

NUM_SAMPLES = 20


@dataclass(frozen=True)
class EvalSetup:
    """A tiny base, a prepared synthetic dataset and stage-1/stage-2 artifacts built from them."""

    cfg: DuetConfig
    base: str
    test_split: str
    stage1: str
    stage2: str


def eval_config(root: Path, *overrides: str) -> DuetConfig:
    return load_config(None, [
        f"run.work_dir={root / 'work'}", f"data.root={root / 'data'}", "data.num_records=40",
        "data.val_fraction=0", "data.test_fraction=0.6", "data.caption_records=1", "data.records_per_shard=8",
        "data.preprocess_num_cpus=0.25", f"model.checkpoint={root / 'base'}", "model.max_length=512",
        "model.tiny.vision_layers=4", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0", "vce.anchor_layer=-1",
        "vce.reference_layers=[-2, -3]", "vce.heads=4", "adapter.r=8", "adapter.alpha=16",
        "eval.max_new_tokens=12", "eval.batch_size=4", f"eval.max_samples={NUM_SAMPLES}",
        "eval.cpus_per_replica=0.25", "eval.use_gpu=false", *overrides,
    ])


@functools.cache
def build_setup(root: str) -> EvalSetup:
    """Built once per session (test_packaging uses it too). No LM warm-up (speed): the answers are
    deterministic gibberish, which is all these tests need; the adapter is perturbed so it matters."""
    path = Path(root)
    cfg = eval_config(path)
    prepare(cfg.data, cfg.storage)
    shapes = SyntheticShapes(0, 64)
    texts = [" ".join(t["value"].replace("<image>", "") for t in shapes.record(i)["conversations"]) for i in range(60)]
    save_tiny_checkpoint(cfg.model.tiny, path / "base", texts, seed=0)
    stage1 = save_stage_artifact(build_model(cfg, 1), cfg, 1, str(path / "stage1"), "digest")
    model = build_model(cfg, 2, stage1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    stage2 = save_stage_artifact(model, cfg, 2, str(path / "stage2"), "digest")
    return EvalSetup(cfg, str(path / "base"), split_uri(cfg.data, "test"), stage1, stage2)


@pytest.fixture(scope="session")
def eval_setup(tmp_path_factory: pytest.TempPathFactory) -> EvalSetup:
    return build_setup(str(tmp_path_factory.getbasetemp() / "duet-eval"))


@pytest.fixture(scope="session")
def builder(eval_setup: EvalSetup) -> PromptBuilder:
    return PromptBuilder.from_config(eval_setup.cfg, eval_setup.base, visual_token_count(eval_setup.cfg))


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("template", ["vicuna_v1", "plain"])
def test_generation_prompt_is_the_training_text_up_to_the_answer(template: str) -> None:
    conversations = [{"from": "human", "value": "<image>\nList the shapes."}, {"from": "gpt", "value": "red star"}]
    turns, answer = split_reference(conversations)
    prompt = generation_prompt(turns, template, "</s>")
    training = render(conversations, template, "</s>").text
    assert answer == "red star" and training.startswith(prompt)
    assert training[len(prompt):].strip() == "red star</s>"
    assert prompt.endswith("ASSISTANT:") if template == "vicuna_v1" else prompt == "<image>"


def test_generation_prompt_keeps_earlier_turns_and_refuses_a_trailing_answer() -> None:
    turns = [
        {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "count: 2"},
        {"from": "human", "value": "Which colours?"},
    ]
    prompt = generation_prompt(turns, "vicuna_v1", "</s>")
    assert prompt.endswith("ASSISTANT: count: 2</s>USER: Which colours? ASSISTANT:")
    with pytest.raises(ConversationError, match="end with a human turn"):
        generation_prompt(turns[:2], "vicuna_v1", "</s>")


def test_encode_expands_each_image_to_the_visual_tokens(builder: PromptBuilder) -> None:
    ids = builder.encode(builder.text([{"from": "human", "value": "<image>\nList the shapes."}]), 1)
    image_id = builder.encoder.image_token_id
    assert builder.num_visual_tokens == 64  # (64 / 8) ** 2 patches of the tiny CLIP
    assert int((ids == image_id).sum()) == builder.num_visual_tokens
    assert ids[0] == builder.tokenizer.bos_token_id
    with pytest.raises(ImageMismatchError):
        builder.encode("USER: <image> hi ASSISTANT:", 2)
    with pytest.raises(SequenceTooLongError):
        builder.encode("<image> " + " ".join(str(i) for i in range(3000)), 1)


# ---------------------------------------------------------------- the model replica


def _asks(builder: PromptBuilder, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    shapes = SyntheticShapes(7, 64)
    ids, images = [], []
    for i in range(count):
        record = shapes.record(i)
        turns, _ = split_reference(record["conversations"])
        ids.append(builder.encode(builder.text(turns, record["task"]), 1))
        images.append(builder.images([record["images"][0][1]]))
    return ids, images


def test_left_padded_batches_answer_as_one_prompt_at_a_time(eval_setup: EvalSetup, builder: PromptBuilder) -> None:
    generator = Generator(eval_setup.cfg, eval_setup.stage2, eval_setup.base, "cpu")
    ids, images = _asks(builder, 6)
    assert len({len(i) for i in ids}) > 1  # the batch really is padded
    batched = generator.generate(ids, images, 12)
    single = [generator.generate([i], [im], 12)[0] for i, im in zip(ids, images)]
    assert batched == single and len(batched) == 6 and any(batched)


def test_base_model_source_is_the_bare_checkpoint(eval_setup: EvalSetup, builder: PromptBuilder) -> None:
    generator = Generator(eval_setup.cfg, None, eval_setup.base, "cpu")
    assert not isinstance(projector_module(generator.model), VCEProjector)
    ids, images = _asks(builder, 2)
    assert len(generator.generate(ids, images, 4)) == 2


def test_mismatched_artifact_is_refused_before_any_replica_starts(eval_setup: EvalSetup) -> None:
    cfg = eval_config(Path(eval_setup.base).parent, "vce.points=2")
    with pytest.raises(ArtifactError, match=r"(?s)artifact .* does not match this config:.*vce\.points: artifact 4 != config 2"):
        check_model_source(cfg, eval_setup.stage2)
    with pytest.raises(ArtifactError, match="is not a stage artifact: it has no artifact.json"):
        check_model_source(eval_setup.cfg, eval_setup.base)


# ---------------------------------------------------------------- scoring


def _row(key: int, task: str, prediction: str, reference: str, fields: dict, skip: str = "") -> dict[str, str]:
    row = dict.fromkeys(TEXT_COLUMNS, "")
    row.update(key=f"{key:09d}", id=f"r{key}", task=task, reference=reference, answer_fields=json.dumps(fields),
               skip=skip, prediction=prediction)
    return row


def test_scoring_counts_unparseable_answers_and_skips_without_raising() -> None:
    numeric = {"count": 2, "area": 10.0}
    rows = pd.DataFrame([
        _row(5, "items", "red star, blue circle", "red star, blue circle", {"items": ["red star", "blue circle"]}),
        _row(1, "items", "", "red star", {"items": ["red star"]}),
        _row(2, "numeric", "count: 2, area: 10.0", "count: 2, area: 10.0", numeric),
        _row(3, "numeric", "I cannot tell", "count: 2, area: 10.0", numeric),
        _row(4, "description", "a red star", "a red star on a white background.", {"reference": "a red star"}),
        _row(0, "items", "", "", {}, skip="corrupt_image"),
        _row(6, "items", "red star", "", {"items": []}),  # ground truth without items: a data bug
    ])
    result = score_rows(rows)
    assert result.metrics["items/iou"] == pytest.approx(50.0) and result.metrics["items/f1"] == pytest.approx(50.0)
    assert result.metrics["numeric/pmae_count"] == pytest.approx(50.0)
    assert result.metrics["numeric/pmae"] == pytest.approx(50.0)
    assert result.metrics["description/rouge_l"] == pytest.approx(100.0)
    assert result.metrics["score"] == pytest.approx(primary_score({k: v for k, v in result.metrics.items()
                                                                   if k != "score"}))
    assert result.counts["unparseable"] == 2 and result.counts["items/unparseable"] == 1
    assert result.counts["numeric/unparseable"] == 1 and result.counts["samples"] == 7
    assert result.counts["skipped/corrupt_image"] == 1 and result.counts["skipped/bad_reference"] == 1
    assert result.counts["evaluated"] == 5 and result.counts["skipped"] == 2
    table = result.per_sample
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["key"]) == [f"{i:09d}" for i in range(7)]  # sorted back into split order
    by_key = table.set_index("id")
    assert by_key.at["r5", "correct"] and by_key.at["r5", "parsed"] and by_key.at["r5", "score"] == 100.0
    assert by_key.at["r1", "parsed"] is False and by_key.at["r1", "score"] == 0.0
    assert by_key.at["r3", "parsed"] is False and by_key.at["r3", "correct"] is False
    assert by_key.at["r0", "skipped"] == "corrupt_image" and math.isnan(by_key.at["r0", "score"])
    assert by_key.at["r6", "skipped"] == "bad_reference" and "no items" in by_key.at["r6", "skip_detail"]
    assert json.loads(by_key.at["r2", "sample_metrics"])["pmae"] == 0.0


def test_scoring_refuses_a_split_where_nothing_could_be_asked() -> None:
    with pytest.raises(RuntimeError, match="no sample could be evaluated"):
        score_rows(pd.DataFrame([_row(0, "items", "", "", {}, skip="corrupt_image")]))


def test_task_families_and_references() -> None:
    assert [task_family(t) for t in ("items", "numeric", "caption", "pope", "recipe", "vqa")] == [
        "set", "numeric", "text", "pope", "recipe", "text"]
    assert reference_for("set", {"items": ["a", "b"]}, "a, b") == ["a", "b"]
    assert reference_for("set", {}, "a, b") == "a, b"
    assert reference_for("numeric", {"count": 3, "note": "x", "flag": True}, "count: 3") == {"count": 3}
    assert reference_for("text", {"caption": "a red star"}, "other") == "a red star"
    assert reference_for("pope", {}, "Yes") == "Yes"


def test_comparison_table_and_per_sample_files(tmp_path: Path) -> None:
    def result(score: float, pmae: float) -> EvalResult:
        return EvalResult({"items/iou": score, "numeric/pmae": pmae, "score": score}, pd.DataFrame({"id": ["a"]}),
                          {"samples": 10, "evaluated": 9, "skipped": 1, "unparseable": 3})

    text = comparison_table({"zero-shot": result(10.0, 80.0), "fine-tuned": result(42.5, 30.0)})
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "zero-shot", "fine-tuned", "change"]
    assert any(line.split()[:4] == ["items/iou", "10.00", "42.50", "+32.50"] for line in lines)
    assert any(line.startswith("numeric/pmae (lower is better)") and "-50.00" in line for line in lines)
    assert any(line.split() == ["unparseable", "3", "3"] for line in lines)
    table = pd.DataFrame({"id": ["a", "b"], "score": [1.5, float("nan")]})
    assert pd.read_csv(write_table(table, tmp_path / "s.csv"))["id"].tolist() == ["a", "b"]
    assert [r["id"] for r in json.loads(Path(write_table(table, tmp_path / "s.json")).read_text())] == ["a", "b"]
    assert len(Path(write_table(table, tmp_path / "s.jsonl")).read_text().splitlines()) == 2
    with pytest.raises(ValueError, match=r"\.csv, \.json, \.jsonl"):
        write_table(table, tmp_path / "s.parquet")


# ---------------------------------------------------------------- the CLI (no Ray: it fails before starting it)


def test_cli_picks_models_and_refuses_bad_input_before_starting_ray(eval_setup: EvalSetup, tmp_path: Path) -> None:
    from components.layout import artifact_uri
    from pipelines.evaluate import main, models_to_evaluate

    ray_was_up = ray.is_initialized()
    cfg = eval_setup.cfg
    args = argparse.Namespace(model=None, baseline=True, baseline_model=None)
    assert models_to_evaluate(cfg, args) == {"zero-shot": artifact_uri(cfg, 1), "fine-tuned": artifact_uri(cfg, 2)}
    args = argparse.Namespace(model=eval_setup.stage2, baseline=False, baseline_model="base")
    assert models_to_evaluate(cfg, args) == {"zero-shot": None, "fine-tuned": eval_setup.stage2}
    overrides = [f"--set=model.checkpoint={eval_setup.base}", f"--set=data.root={cfg.data.root}",
                 "--set=model.tiny.vision_layers=4", "--set=vce.anchor_layer=-1", "--set=vce.reference_layers=[-2,-3]"]
    for argv, message in [
        (["--model", eval_setup.stage2, "--output", str(tmp_path / "t.parquet")], r"use a file name ending in \.csv"),
        (["--model", str(tmp_path)], "is not a stage artifact: it has no artifact.json"),
        (["--model", eval_setup.stage2, "--split", "validation"], "the split was never prepared"),
    ]:
        with pytest.raises(DuetError, match=message):
            main([*overrides, *argv])
    assert ray.is_initialized() == ray_was_up


# ---------------------------------------------------------------- Ray Data (slow)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_replica(eval_setup: EvalSetup, ray_local: None) -> EvalResult:
    return evaluate(eval_setup.cfg, eval_setup.stage2, eval_setup.test_split, eval_setup.base)


@pytest.mark.slow
def test_evaluate_answers_every_sample_and_scores_each_family(eval_setup: EvalSetup, one_replica: EvalResult) -> None:
    table = one_replica.per_sample
    assert len(table) == NUM_SAMPLES  # eval.max_samples of the 24 test records, read from 3 shards of 8
    assert list(table["key"]) == [f"{i:09d}" for i in range(NUM_SAMPLES)]  # the split's first records, in order
    assert (table["skipped"] == "").all() and table["prediction"].map(lambda p: isinstance(p, str)).all()
    assert table["prediction"].str.len().gt(0).any()
    assert set(table["task"]) == {"items", "description", "numeric"}
    assert table["prompt"].str.endswith("ASSISTANT:").all()
    metrics = one_replica.metrics
    for name in ("items/iou", "items/f1", "description/bleu", "description/rouge_l", "score"):
        assert 0.0 <= metrics[name] <= 100.0, name
    assert metrics["numeric/pmae"] >= 0.0 and {"numeric/pmae_count", "numeric/pmae_area"} <= metrics.keys()
    counts = one_replica.counts
    assert counts["samples"] == counts["evaluated"] == NUM_SAMPLES
    assert counts["items/n"] + counts["description/n"] + counts["numeric/n"] == NUM_SAMPLES
    assert counts["unparseable"] == table["parsed"].eq(False).sum()


@pytest.mark.slow
def test_two_replicas_give_the_same_predictions_as_one(eval_setup: EvalSetup, one_replica: EvalResult) -> None:
    cfg = eval_setup.cfg.model_copy(update={"eval": eval_setup.cfg.eval.model_copy(update={"num_replicas": 2})})
    two = evaluate(cfg, eval_setup.stage2, eval_setup.test_split, eval_setup.base)
    assert list(two.per_sample["id"]) == list(one_replica.per_sample["id"])
    assert list(two.per_sample["prediction"]) == list(one_replica.per_sample["prediction"])
    assert two.metrics == one_replica.metrics


@pytest.mark.slow
def test_the_blind_baseline_asks_the_same_samples_with_blank_images(
    eval_setup: EvalSetup, one_replica: EvalResult, builder: PromptBuilder
) -> None:
    from components.evaluate.prompts import image_digest
    from components.evaluate.report import DIFFERENCES

    blind = evaluate(eval_setup.cfg, eval_setup.stage2, eval_setup.test_split, eval_setup.base, blind=True)
    assert list(blind.per_sample["key"]) == list(one_replica.per_sample["key"]), "the same samples"
    height, width = builder.spec.output_hw
    blank = np.empty((1, height, width, 3), dtype=np.uint8)
    blank[:] = np.round(np.asarray(builder.spec.mean) * 255).astype(np.uint8)
    assert set(blind.per_sample["image_digest"]) == {image_digest(blank)}, "every image the model got was blank"
    seen = set(one_replica.per_sample["image_digest"])
    assert len(seen) == NUM_SAMPLES and image_digest(blank) not in seen, "the fine-tuned run saw the real images"

    zero = evaluate(eval_setup.cfg, eval_setup.stage1, eval_setup.test_split, eval_setup.base)
    table = comparison_table({"zero-shot": zero, "fine-tuned": one_replica, "blind": blind}, DIFFERENCES)
    header = table.splitlines()[0].split()
    assert header[:4] == ["metric", "zero-shot", "fine-tuned", "blind"] and header[4:] == ["change", "from", "vision"]
    score = next(line for line in table.splitlines() if line.startswith("score")).split()
    assert float(score[5]) == pytest.approx(one_replica.metrics["score"] - blind.metrics["score"], abs=0.01)


def test_examples_show_three_held_out_samples_per_task_with_their_images(eval_setup: EvalSetup, tmp_path: Path) -> None:
    from PIL import Image

    from components.evaluate.examples import example_grid, example_rows, examples_text, read_images

    keys = [f"{i:09d}" for i in range(12)]
    tasks = ["items", "description", "numeric"] * 4
    table = pd.DataFrame({
        "key": keys, "task": tasks, "question": [f"q{i}" for i in range(12)],
        "reference": [f"ref {i}" for i in range(12)], "prediction": [f"pred {i}" for i in range(12)],
        "skipped": ["bad_image"] + [""] * 11,
    })
    rows = example_rows(table)
    assert sorted(rows["task"].value_counts().to_dict().items()) == [("description", 3), ("items", 3), ("numeric", 3)]
    assert "000000000" not in set(rows["key"]), "skipped samples are not shown"
    text = examples_text(rows, blind=table.assign(prediction="blank answer"))
    assert text.count("reference") == 9 and text.count("blind       blank answer") == 9 and "  items:" in text

    images = read_images(eval_setup.test_split, set(rows["key"]), eval_setup.cfg.storage)
    assert set(images) == set(rows["key"])
    assert all(Image.open(io.BytesIO(b)).size == (64, 64) for b in images.values())
    png = example_grid(rows, images, tmp_path / "grid.png", "held-out examples")
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.size[0] > 600 and picture.size[1] > 600
