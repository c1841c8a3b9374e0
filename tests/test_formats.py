"""What earlier versions wrote still loads: stage artifacts and a DeepSpeed checkpoint kept in tests/fixtures/legacy.

The fixtures were written by duet's `save_stage_artifact` and its training loop's checkpoint call
(DeepSpeed `save_checkpoint` with frozen weights excluded, plus progress.json) before the code was
reorganised into packages; a tiny base of the same architecture is built here, and each file is
loaded through today's code and compared with what the files hold.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import DuetConfig, load_config
from components.model.adapters.apply import is_adapter_param
from components.model.artifact import (
    ARTIFACT_ADAPTER,
    ARTIFACT_META,
    ARTIFACT_WEIGHTS,
    load_stage_model,
    read_artifact_meta,
)
from components.model.llava import projector_module
from components.model.tiny import save_tiny_checkpoint

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> DuetConfig:
    base = tmp_path_factory.mktemp("legacy") / "base"
    overrides = json.loads((LEGACY / "overrides.json").read_text())
    config = load_config(None, [*overrides, f"model.checkpoint={base}"])
    save_tiny_checkpoint(config.model.tiny, base, ["a red circle", "count: 1, area: 2.0"], seed=0)
    return config


def test_a_stage2_artifact_of_the_earlier_layout_loads_with_its_weights(cfg: DuetConfig) -> None:
    meta = read_artifact_meta(str(LEGACY / "stage2"))
    assert (meta.stage, meta.adapter_type, meta.data_digest) == (2, "dual_lora", "digest-2")
    model = load_stage_model(cfg, str(LEGACY / "stage2"))
    saved = load_file(str(LEGACY / "stage2" / ARTIFACT_WEIGHTS))
    loaded = projector_module(model).state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    adapter = load_file(str(LEGACY / "stage2" / ARTIFACT_ADAPTER / "adapter_model.safetensors"))
    params = {n: p for n, p in model.named_parameters() if is_adapter_param(n)}
    assert len(adapter) == len(params) > 0
    by_suffix = {n.split("base_model.model.", 1)[-1].replace(".default", ""): p for n, p in params.items()}
    assert all(torch.equal(value, by_suffix[key.split("base_model.model.", 1)[-1]]) for key, value in adapter.items())


def test_an_artifact_from_before_lineage_and_checksums_loads(cfg: DuetConfig, tmp_path: Path) -> None:
    """Artifacts written before artifact.json recorded the run and the file checksums."""
    old = tmp_path / "stage1"
    shutil.copytree(LEGACY / "stage1", old)
    raw = json.loads((old / ARTIFACT_META).read_text())
    (old / ARTIFACT_META).write_text(json.dumps({k: v for k, v in raw.items() if k not in ("run_id", "files")}))
    meta = read_artifact_meta(str(old))
    assert (meta.stage, meta.run_id, meta.files) == (1, None, None)
    model = load_stage_model(cfg, str(old))
    saved = load_file(str(old / ARTIFACT_WEIGHTS))
    assert all(torch.equal(saved[k], v) for k, v in projector_module(model).state_dict().items())


# DeepSpeed keeps process-wide communication state, so the checkpoint is resumed in a process of its own.
_RESUME = """
import json, os, socket, sys
import torch, deepspeed
from components.config import load_config
from components.model.stages import build_model, parameter_groups
from components.train.deepspeed import build_deepspeed_config, plan_batch
from components.train.loop import CHECKPOINT_TAG, cosine_with_warmup, load_checkpoint_dir, safe_checkpoint_load
legacy, base = sys.argv[1], sys.argv[2]
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
cfg = load_config(None, [*json.load(open(legacy + "/overrides.json")), "model.checkpoint=" + base])
model = build_model(cfg, 2, legacy + "/stage1")
optimizer = torch.optim.AdamW(parameter_groups(model, cfg.stage2))
stage = cfg.stage2.model_copy(update={"global_batch": 1, "micro_batch": 1})
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=cosine_with_warmup(optimizer, 10, 0.1),
                                  config=build_deepspeed_config(cfg.deepspeed, plan_batch(stage, 1), "fp32"))
step = load_checkpoint_dir(engine, legacy + "/checkpoint")
saved = safe_checkpoint_load(legacy + "/checkpoint/" + CHECKPOINT_TAG + "/mp_rank_00_model_states.pt")["module"]
trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
same = set(saved) == set(trainable) and all(torch.equal(saved[n].float(), p.detach().float()) for n, p in trainable.items())
print("RESULT", json.dumps({"step": step, "weights_match": same, "tensors": len(trainable)}))
"""


@pytest.mark.slow
def test_a_deepspeed_checkpoint_of_the_earlier_layout_resumes(cfg: DuetConfig) -> None:
    done = subprocess.run([sys.executable, "-c", _RESUME, str(LEGACY), cfg.model.checkpoint or ""],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["step"] == 3 and result["weights_match"] and result["tensors"] > 0
