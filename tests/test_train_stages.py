"""Stage 1 then stage 2 on Ray Train + DeepSpeed (2 CPU workers, gloo): the training promises end to end.

One module-scoped Ray cluster, one small synthetic dataset and one tiny base model
serve every test; the stage-1 reference run is shared by the comparisons.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import torch
from conftest import resize_mount
from safetensors.torch import load_file

from components.config import DuetConfig, load_config
from components.model.artifact import load_stage_model
from components.model.sizes import build_meta_model, component_sizes
from components.train.stage import RAY_TRAIN_SNAPSHOT, StageData, StageResult, run_stage
from components.train.step_time import PHASES, metric_name
from components.workflow.startup import ensure_base_model, ensure_dataset, stage_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def _config(work: Path, *overrides: str) -> DuetConfig:
    return load_config(REPO / "pipelines/configs/demo.yaml", [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
        "data.num_records=240", "data.caption_records=200", "data.records_per_shard=60",
        "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0", "scaling.cpus_per_worker=0.5", "data.preprocess_num_cpus=0.25",
        "stage1.global_batch=8", "stage1.micro_batch=2", f"stage1.max_steps={STEPS}", "stage1.checkpoint_every=2",
        "stage2.global_batch=8", "stage2.micro_batch=2", f"stage2.max_steps={STEPS}", "stage2.checkpoint_every=3",
        "stage2.eval_batches=1", *overrides,
    ])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def cluster(work: Path):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = _config(work)
    base, _ = ensure_base_model(cfg, ensure_dataset(cfg))
    yield {1: stage_data(cfg, 1, base), 2: stage_data(cfg, 2, base)}
    ray.shutdown()


@pytest.fixture(scope="module")
def stage1(work: Path, cluster: dict[int, StageData]) -> StageResult:
    cfg = _config(work, "run.name=ref")
    return run_stage(cfg, 1, cluster[1])


def _losses(result: StageResult) -> list[float]:
    assert [row["step"] for row in result.history] == list(range(1, STEPS + 1)), "every step exactly once"
    return [row["loss"] for row in result.history]


def _falls(losses: list[float]) -> bool:
    return sum(losses[-2:]) / 2 < losses[0]


def _trainable_count(cfg: DuetConfig, stage: int) -> int:
    sizes = component_sizes(build_meta_model(cfg, stage=stage))
    return sum(row["params"] for name, row in sizes.items() if name in ("vce", "projector", "adapter")
               and (stage == 2 or name != "adapter"))


def test_stage1_trains_with_falling_loss_and_saves_trainable_weights_only(
    work: Path, stage1: StageResult
) -> None:
    assert _falls(_losses(stage1)), _losses(stage1)
    cfg = _config(work, "run.name=ref")
    weights = load_file(str(Path(stage1.artifact_uri) / "vce_projector.safetensors"))
    assert all(not k.startswith(("vision_tower", "language_model")) for k in weights)
    assert sum(t.numel() for t in weights.values()) == _trainable_count(cfg, 1)
    # The Ray Train checkpoint holds DeepSpeed's state without any frozen tensor.
    assert stage1.checkpoint_path is not None
    states = torch.load(Path(stage1.checkpoint_path) / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    module = states["module"]
    assert module and all("multi_modal_projector" in k for k in module)
    assert sum(t.numel() for t in module.values()) == _trainable_count(cfg, 1)


def test_every_step_says_where_its_time_went(stage1: StageResult) -> None:
    for row in stage1.history:
        phases = {p: row[metric_name(p)] for p in PHASES}
        assert all(seconds >= 0 for seconds in phases.values()), row
        # The phases are disjoint stretches of the step's wall time; what is left is loop bookkeeping.
        assert 0.85 * row["step_time_s"] <= sum(phases.values()) <= row["step_time_s"] + 1e-3, row
        assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0, row
        assert phases["comm"] > 0, "two workers reduce their gradients every step"
        assert row["model_tflops_per_s"] > 0 and "mfu" not in row, "no MFU on CPU without scaling.peak_tflops"
    assert all(row["time/report_s"] > 0 for row in stage1.history[1:]), "the step before was reported"


def test_one_and_two_workers_give_the_same_steps(work: Path, cluster: dict[int, StageData],
                                                 stage1: StageResult) -> None:
    cfg = _config(work, "run.name=one-worker", "scaling.num_workers=1", "scaling.peak_tflops=0.5")
    single = run_stage(cfg, 1, cluster[1], artifact=str(work / "one-worker-artifact"))
    torch.testing.assert_close(_losses(single), _losses(stage1), rtol=2e-4, atol=2e-4)
    assert all(row["mfu"] == pytest.approx(row["model_tflops_per_s"] / 0.5) for row in single.history)


def test_packed_rows_train_the_same_steps_with_less_padding(work: Path, cluster: dict[int, StageData],
                                                            stage1: StageResult) -> None:
    """data.packing on the real path (Ray Data -> 2 Ray Train workers -> DeepSpeed): the same samples per step,
    so the same losses as padded rows, computed on fewer padding tokens."""
    cfg = _config(work, "run.name=packed", "data.packing=true")
    packed = run_stage(cfg, 1, cluster[1], artifact=str(work / "packed-artifact"))
    torch.testing.assert_close(_losses(packed), _losses(stage1), rtol=2e-4, atol=2e-4)
    efficiency = [row["padding_efficiency"] for row in packed.history]
    reference = [row["padding_efficiency"] for row in stage1.history]
    assert all(0 < ref <= p <= 1 for p, ref in zip(efficiency, reference)), (efficiency, reference)
    assert sum(efficiency) > sum(reference), (efficiency, reference)


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_killed_worker_resumes_without_lost_or_repeated_steps(work: Path, cluster: dict[int, StageData],
                                                             stage1: StageResult, upload: str) -> None:
    """Also with scaling.checkpoint_upload=async: checkpoints uploaded in the background resume the same."""
    cfg = _config(work, f"run.name=fault-{upload}", f"scaling.checkpoint_upload={upload}")
    killed: list[int] = []
    lock = threading.Lock()

    def kill_after_step_three(rows: list[dict[str, Any]]) -> None:
        with lock:
            if killed or max(r["step"] for r in rows) < 3:
                return
            workers = [p for p in psutil.process_iter(["pid", "cmdline"])
                       if any("RayTrainWorker" in part for part in p.info["cmdline"] or [])]
            assert workers, "no RayTrainWorker process found"
            pid = max(w.info["pid"] for w in workers)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run_stage(cfg, 1, cluster[1], on_metrics=kill_after_step_three, artifact=str(work / f"fault-{upload}"))
    assert killed, "a worker was killed mid-stage"
    # Steps 1..N exactly once after the rollback to the step-2 checkpoint, and the same losses as the
    # uninterrupted run: no optimizer step was lost or repeated and the data position was restored.
    torch.testing.assert_close(_losses(result), _losses(stage1), rtol=2e-4, atol=2e-4)


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(
    work: Path, cluster: dict[int, StageData], stage1: StageResult, capfd: pytest.CaptureFixture[str]
) -> None:
    # A copy of the reference run (Ray Train's records name checkpoints relative to the run folder), its
    # newest checkpoint (step 6) damaged by one flipped bit in a weight file; ranks 0 and 1 both wrote it.
    assert stage1.checkpoint_path is not None
    latest = Path(stage1.checkpoint_path)
    copy = latest.parent.with_name("damaged-stage1")
    shutil.copytree(latest.parent, copy)
    weights = copy / latest.name / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert len(list((copy / latest.name).glob("duet-files-rank*.json"))) == 2

    cfg = _config(work, "run.name=ref")
    result = run_stage(cfg, 1, cluster[1], run_name="damaged-stage1", artifact=str(work / "damaged-art"))
    err = capfd.readouterr().err
    assert f"checkpoint {copy / latest.name} is damaged and was not loaded: state/mp_rank_00_model_states.pt " \
           "does not match the sha256" in err, err[-2000:]
    # Resumed from the step-4 checkpoint: steps 5 and 6 once more, with the uninterrupted run's losses.
    assert [row["step"] for row in result.history] == [STEPS - 1, STEPS]
    torch.testing.assert_close([row["loss"] for row in result.history], _losses(stage1)[-2:], rtol=2e-4, atol=2e-4)
    assert (work / "damaged-art" / "artifact.json").is_file()


@pytest.mark.parametrize("zero", [2, 3])
def test_stage2_from_stage1_with_zero(work: Path, cluster: dict[int, StageData], stage1: StageResult,
                                      zero: int) -> None:
    cfg = _config(work, "run.name=ref", f"deepspeed.zero_stage={zero}", "adapter.r=8", "adapter.alpha=16")
    result = run_stage(cfg, 2, cluster[2], stage1_artifact=stage1.artifact_uri,
                       run_name=f"stage2-zero{zero}", artifact=str(work / f"stage2-zero{zero}"))
    losses = _losses(result)
    assert _falls(losses), losses
    assert all("val_loss" in row for row in result.history)
    artifact = Path(result.artifact_uri)
    bridge = load_file(str(artifact / "vce_projector.safetensors"))
    adapter = load_file(str(artifact / "adapter" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in adapter)
    assert all(t.numel() > 0 for t in [*bridge.values(), *adapter.values()]), "gathered, never empty shards"
    total = sum(t.numel() for t in [*bridge.values(), *adapter.values()])
    assert total == _trainable_count(cfg, 2)
    model = load_stage_model(cfg, result.artifact_uri)
    assert any("lora_S" in n for n, _ in model.named_parameters())


def test_stage2_refuses_a_mismatched_stage1(work: Path, cluster: dict[int, StageData],
                                            stage1: StageResult) -> None:
    cfg = _config(work, "run.name=ref", "vce.points=2")
    with pytest.raises(ValueError, match="vce.points"):
        run_stage(cfg, 2, cluster[2], stage1_artifact=stage1.artifact_uri)


def test_a_full_disk_mid_stage_keeps_the_last_checkpoint_and_a_rerun_resumes(
    work: Path, cluster: dict[int, StageData], stage1: StageResult, small_disk: Path
) -> None:
    from components.errors import StorageFullError
    from components.train.checkpoint_files import checkpoint_problems

    assert stage1.checkpoint_path is not None
    one_checkpoint = sum(f.stat().st_size for f in Path(stage1.checkpoint_path).rglob("*") if f.is_file())
    # Room for the first checkpoint (step 2) and Ray Train's records, not for the second one.
    resize_mount(small_disk, int(one_checkpoint * 1.5) // 4096 * 4096)
    cfg = _config(work, "run.name=ref", f"scaling.storage_path={small_disk}", "scaling.max_failures=0")
    with pytest.raises(StorageFullError) as err:
        run_stage(cfg, 1, cluster[1], run_name="full-disk", artifact=str(work / "full-disk-art"))
    message = str(err.value)
    assert f"no space left on the filesystem of {small_disk}/full-disk while writing stage1's checkpoint (" in message
    assert re.search(r"\(\d+(\.\d)? (bytes|KiB) free of \d+\.\d (KiB|MiB)\)", message), message
    assert re.search(r"the newest complete checkpoint \(\S+checkpoint_\S+, step 2\) is intact and still the latest",
                     message), message
    kept = Path(re.search(r"checkpoint \((\S+), step 2\)", message).group(1))
    assert checkpoint_problems(kept) == [] and json.loads((kept / "progress.json").read_text()) == {"step": 2}

    resize_mount(small_disk, 64 * 2**20)  # space freed: the same command resumes from step 2
    # Ray Train rewrites its checkpoint record in place: when the disk fills as it does, the record is left
    # empty (whether it does here depends on timing, so it is emptied here) and Ray Train would refuse the run.
    record = small_disk / "full-disk" / RAY_TRAIN_SNAPSHOT
    record.write_text("")
    result = run_stage(cfg, 1, cluster[1], run_name="full-disk", artifact=str(work / "full-disk-art"))
    assert (small_disk / "full-disk" / f"{RAY_TRAIN_SNAPSHOT}.damaged").is_file() and record.is_file()
    assert [row["step"] for row in result.history] == list(range(3, STEPS + 1))
    torch.testing.assert_close([row["loss"] for row in result.history], _losses(stage1)[2:], rtol=2e-4, atol=2e-4)
