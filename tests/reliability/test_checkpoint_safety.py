"""Resuming never unpickles arbitrary objects: DeepSpeed checkpoints load weights-only, adapters and stage
artifacts are safetensors.

DeepSpeed 0.19 itself reads checkpoint files with ``torch.load(weights_only=False)``; the training loop
routes those reads through ``components.train.loop.safe_checkpoint_load``. The planted files here carry a
``__reduce__`` that writes a marker file: the test first shows that an ordinary unpickling runs it, then
that every load path of the project refuses the file without running it.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ports import free_port

from components.config import DeepSpeedSection, StageSection
from components.train.deepspeed import build_deepspeed_config, plan_batch
from components.train.loop import (
    CHECKPOINT_TAG,
    PROGRESS_FILE,
    UnsafeCheckpointError,
    cosine_with_warmup,
    load_checkpoint_dir,
    safe_checkpoint_load,
)


class Payload:
    """Unpickling this writes `marker`: what an attacker's checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant(path: Path, marker: Path) -> None:
    """Overwrite `path` with a torch file that looks like a state dict but runs code when unpickled."""
    torch.save({"module": {"weight": torch.zeros(2)}, "evil": Payload(marker)}, path)


def test_planted_pickle_really_runs_code_under_plain_unpickling(tmp_path: Path) -> None:
    """The guard's premise: what DeepSpeed does by itself (weights_only=False) executes the payload."""
    file, marker = tmp_path / "x.pt", tmp_path / "ran"
    plant(file, marker)
    torch.load(file, weights_only=False)
    assert marker.read_text() == "ran"


def test_safe_load_refuses_planted_pickle_without_running_it(tmp_path: Path) -> None:
    file, marker = tmp_path / "x.pt", tmp_path / "ran"
    plant(file, marker)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint file.*Unsupported global: GLOBAL exec"):
        safe_checkpoint_load(str(file))
    assert not marker.exists()


def test_safe_load_refuses_a_bare_pickle_of_an_os_call(tmp_path: Path) -> None:
    """Not even a torch file: a raw pickle stream whose only content is the payload."""
    file, marker = tmp_path / "raw.pt", tmp_path / "ran"
    file.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        safe_checkpoint_load(str(file))
    assert not marker.exists()


def test_gpu_precision_state_loads_through_the_allow_list(tmp_path: Path) -> None:
    """What an fp16/bf16 GPU run adds to its optimizer state (a dynamic loss scaler with a dtype, the ZeRO
    stage enum, fragment addresses) loads weights-only, so resuming on GPUs is not refused."""
    import importlib

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    fragment_address = importlib.import_module("deepspeed.utils.tensor_fragment").fragment_address
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.bfloat16)
    state = {"loss_scaler": scaler, "static": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "dtype": torch.float16}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = safe_checkpoint_load(str(tmp_path / "optim_states.pt"))
    assert (loaded["loss_scaler"].cur_scale, loaded["loss_scaler"].dtype) == (2.0**16, torch.bfloat16)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["dtype"] is torch.float16
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)


# ---------------------------------------------------------------- a real DeepSpeed engine


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """A one-process DeepSpeed ZeRO-2 engine (gloo on 127.0.0.1) with a frozen and a trainable layer."""
    import deepspeed
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = cosine_with_warmup(optimizer, 10, 0.1)
    stage = StageSection(name="stage1", lr=1e-2, global_batch=2, micro_batch=2)
    ds_engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=build_deepspeed_config(DeepSpeedSection(zero_stage=2), plan_batch(stage, 1), "fp32"),
    )
    try:
        yield ds_engine
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train_step(engine: Any) -> None:
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _trainable(engine: Any) -> torch.Tensor:
    return engine.module[1].weight.detach().clone()


def _save(engine: Any, path: Path, step: int) -> None:
    """What the training loop's _save_checkpoint writes (without the Ray Train report)."""
    engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
    (path / PROGRESS_FILE).write_text(json.dumps({"step": step}))


@pytest.mark.slow
def test_deepspeed_checkpoint_resumes_weights_only_and_refuses_planted_files(engine: Any, tmp_path: Path) -> None:
    _train_step(engine)
    good = tmp_path / "good"
    _save(engine, good, step=1)
    saved_weight, saved_lr = _trainable(engine), engine.optimizer.param_groups[0]["lr"]
    files = sorted(p.relative_to(good).as_posix() for p in (good / CHECKPOINT_TAG).glob("*.pt"))
    assert any("optim_states" in f for f in files) and any("model_states" in f for f in files), files

    # A genuine checkpoint (model, ZeRO optimizer partitions, scheduler) loads through the allow-list.
    _train_step(engine)
    assert not torch.equal(_trainable(engine), saved_weight)
    assert load_checkpoint_dir(engine, good) == 1
    torch.testing.assert_close(_trainable(engine), saved_weight)
    assert engine.optimizer.param_groups[0]["lr"] == saved_lr
    assert "load" not in vars(engine.checkpoint_engine), "the safe loader is only in place during a load"

    # The same checkpoint with one file replaced by a planted pickle is refused, and nothing runs.
    for name in files:
        bad = tmp_path / f"bad-{name.replace('/', '_')}"
        _save(engine, bad, step=1)
        marker = tmp_path / f"ran-{bad.name}"
        plant(bad / name, marker)
        with pytest.raises(UnsafeCheckpointError, match=name.rsplit("/", 1)[-1]):
            load_checkpoint_dir(engine, bad)
        assert not marker.exists(), f"unpickling {name} ran the planted code"
        assert "load" not in vars(engine.checkpoint_engine)


# ---------------------------------------------------------------- adapters


def test_peft_adapter_with_a_planted_bin_is_refused(tmp_path: Path) -> None:
    """An adapter folder whose weights are a pickle (adapter_model.bin) instead of safetensors runs nothing."""
    from peft import LoraConfig, get_peft_model

    from components.model.adapters.apply import load_adapter

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    adapter_dir = tmp_path / "adapter"
    get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter_dir))
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    load_adapter(Tiny(), adapter_dir)  # the genuine folder loads

    marker = tmp_path / "ran"
    (adapter_dir / "adapter_model.safetensors").unlink()
    plant(adapter_dir / "adapter_model.bin", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_adapter(Tiny(), adapter_dir)
    assert not marker.exists()


# ---------------------------------------------------------------- stage artifacts and the code base


def test_a_stage_artifact_whose_weights_are_a_pickle_is_refused(tmp_path: Path) -> None:
    """Stage artifacts are read with safetensors, which parses a header and raw tensors, never pickles."""
    from safetensors import SafetensorError

    from components.model.artifact import ARTIFACT_WEIGHTS, load_projector_weights

    artifact, marker = tmp_path / "artifact", tmp_path / "ran"
    artifact.mkdir()
    plant(artifact / ARTIFACT_WEIGHTS, marker)
    with pytest.raises(SafetensorError):
        load_projector_weights(torch.nn.Module(), artifact, str(artifact))
    assert not marker.exists()


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def test_no_component_unpickles() -> None:
    """Every loader in components/ is weights-only: no pickle-family imports, torch.load only with
    weights_only=True, no numpy allow_pickle, no non-safetensors from_pretrained."""
    problems = []
    for path in sorted((Path(__file__).resolve().parents[2] / "components").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{path.name}: imports {n}" for n in names
                         if n.split(".")[0] in ("cloudpickle", "dill", "joblib", "shelve", "marshal")]
        for func, call in _calls(tree):
            keywords = {k.arg: k.value for k in call.keywords}
            if func == "torch.load" and not (
                isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            ):
                problems.append(f"{path.name}:{call.lineno}: torch.load without weights_only=True")
            if func.split(".")[-1] in ("loads", "load", "Unpickler") and func.split(".")[0] == "pickle":
                problems.append(f"{path.name}:{call.lineno}: {func}")
            if "allow_pickle" in keywords or keywords.get("use_safetensors") is not None and not (
                isinstance(keywords["use_safetensors"], ast.Constant) and keywords["use_safetensors"].value
            ):
                problems.append(f"{path.name}:{call.lineno}: {func} may unpickle")
    assert not problems, problems
