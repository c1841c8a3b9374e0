"""The per-worker training function of both stages (Ray Train + DeepSpeed).

Data order is what makes runs reproducible across worker counts: each worker
reads the global record stream in manifest order and keeps the records whose
index is its rank modulo the world size (see `components.data.dataset`). One
optimizer step then always covers global records [s*G, (s+1)*G), and the loss
is the mean over samples of each sample's token-mean cross-entropy, so the
step's loss and gradient do not depend on how the batch was split.

Resume: checkpoints hold the trainable weights, optimizer, scheduler, the
step and a manifest per rank (`components.train.checkpoint_files`: a damaged
latest checkpoint is passed over for the newest intact one); a restarted worker loads them and skips the micro-batches already consumed
in the current epoch, so no optimizer step is repeated or lost.
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm.comm
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from ray.train import CheckpointUploadMode

from components.config import StageSection, config_from_dict
from components.data.dataset import make_collate
from components.data.packing import row_layout, sample_lengths
from components.errors import DuetError
from components.model.artifact import artifact_parameters, artifact_state_dict, save_stage_artifact
from components.model.stages import build_model, parameter_groups
from components.model.vce_sampling import use_fused_kernel
from components.quiet import quiet_op_builds
from components.train.checkpoint_files import (
    PROGRESS_FILE,
    intact_checkpoint,
    run_checkpoints,
    write_manifest,
)
from components.train.deepspeed import BatchPlan, build_deepspeed_config, plan_batch, resolve_precision
from components.train.flops import StepFlops, device_peak_tflops, mfu, model_tflops_per_s
from components.train.settings import VAL_MEASURED, LoopSettings, total_steps
from components.train.step_time import StepClock, time_collectives

CHECKPOINT_TAG = "state"


def cosine_with_warmup(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> Any:
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to zero.

    The same factor as transformers' `get_cosine_schedule_with_warmup`, which LLaVA trains with:
    `step / warmup` during warm-up (so the first step has learning rate 0), then
    `0.5 * (1 + cos(pi * progress))`.
    """
    warmup = math.ceil(steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: torch.nn.Module, stage_cfg: StageSection, offload: bool) -> torch.optim.Optimizer:
    """AdamW over the stage's two learning-rate groups (adapter; projector + VCE).

    Under ZeRO-Offload DeepSpeed steps the optimizer on the CPU and accepts only its own CPU Adam
    (`DeepSpeedCPUAdam`, the same AdamW update, compiled on first use); otherwise torch's AdamW.
    """
    groups = parameter_groups(model, stage_cfg)
    if offload:
        return DeepSpeedCPUAdam(groups, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def sample_losses(
    logits: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean next-token loss and its label-token count.

    Padded rows hold one sample each; packed rows (`sample_index`, see `components.data.packing`) several,
    and each predicted token is booked to the sample it belongs to, so both give the same losses.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(shift_labels)
    if sample_index is None:
        sums, counts = (token_loss * mask).sum(dim=1), mask.sum(dim=1)
    else:
        owner = sample_index[:, 1:].clamp_min(0).reshape(-1)  # padding has no labels: its share is zero
        samples = int(sample_index.max()) + 1
        sums = token_loss.new_zeros(samples).index_add(0, owner, (token_loss * mask).reshape(-1))
        counts = mask.new_zeros(samples, dtype=torch.long).index_add(0, owner, mask.reshape(-1).long())
    return sums / counts.clamp_min(1), counts


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over samples (those with labels) of each sample's mean next-token loss; also the label-token count."""
    losses, counts = sample_losses(logits, labels, sample_index)
    has_labels = counts > 0
    loss = losses[has_labels].mean() if bool(has_labels.any()) else losses.sum() * 0.0
    return loss, counts.sum()


def forward_loss(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one micro-batch, padded or packed (`per_sample_loss`), and its label-token count;
    `engine` is a DeepSpeed engine or the plain model."""
    pixels = batch["pixel_values"]
    out = engine(
        input_ids=batch["input_ids"], **row_layout(batch),
        pixel_values=pixels if pixels.shape[0] else None,  # a batch of text-only samples has no images
    )
    return per_sample_loss(out.logits, batch["labels"], batch.get("sample_index"))


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()


def _save_checkpoint(engine: Any, step: int, metrics: dict[str, float], rank: int, world: int, upload: str) -> None:
    """DeepSpeed state (trainable weights only) + progress + this rank's manifest of what it wrote, reported
    through Ray Train on every rank.

    `upload` is `scaling.checkpoint_upload`: with "async" Ray Train copies the folder to storage in the
    background and deletes it afterwards; with "sync" the report returns once it is stored.
    """
    folder = Path(tempfile.mkdtemp(prefix="duet-checkpoint-"))
    try:
        engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
        Path(folder, PROGRESS_FILE).write_text(json.dumps({"step": step}))
        write_manifest(folder, rank, world, step)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        if upload == "async":
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            return  # the folder is Ray Train's now: removed once uploaded
        ray.train.report(metrics, checkpoint=checkpoint)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- safe resume
#
# DeepSpeed 0.19 reads its checkpoint files with torch.load(weights_only=False) (TorchCheckpointEngine.load),
# so a pickle planted in a checkpoint directory would run code on resume. Its checkpoints hold tensors,
# plain containers and these few DeepSpeed types, so they load with weights_only=True and this allow-list;
# anything else in a file is refused before it is built.
CHECKPOINT_SAFE_GLOBALS = [
    LossScaler, DynamicLossScaler, ZeroStageEnum,
    # `deepspeed.utils.tensor_fragment` is shadowed by a function of the same name in deepspeed.utils.
    importlib.import_module("deepspeed.utils.tensor_fragment").fragment_address,
]


class UnsafeCheckpointError(DuetError, RuntimeError):
    """A checkpoint file holds objects outside the allow-list: it was not written by this training loop."""


def safe_checkpoint_load(path: str, map_location: Any = None) -> Any:
    """torch.load restricted to tensors, containers and CHECKPOINT_SAFE_GLOBALS (no arbitrary unpickling)."""
    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"WeightsUnpickler error: ([^\n]+)", str(exc))
            reason = (found.group(1) if found else str(exc).splitlines()[0]).split(". Please use")[0]
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint file {path}: it holds objects a DeepSpeed checkpoint never holds "
                f"({reason[:300]}); delete the checkpoint or restore it from a trusted copy"
            ) from None


@contextmanager
def weights_only_checkpoint_loads(engine: Any) -> Iterator[None]:
    """Route every file the engine's checkpoint engine reads through `safe_checkpoint_load` for a block."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = safe_checkpoint_load  # shadows the class's method on this instance only
    try:
        yield
    finally:
        del checkpoint_engine.load


def load_checkpoint_dir(engine: Any, path: str | Path) -> int:
    """Load a checkpoint saved by `_save_checkpoint` into `engine` without unpickling; returns its step."""
    with weights_only_checkpoint_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(path), tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' in {path}")
    return int(json.loads(Path(path, PROGRESS_FILE).read_text())["step"])


def _restore(engine: Any, sink: Any, rank: int) -> int:
    """Load the newest intact checkpoint of the run (0 when there is none); rank 0 tells the driver which
    damaged ones it passed over."""
    checkpoint = ray.train.get_checkpoint()
    unregistered = None
    if checkpoint is None:  # a new run, or one whose checkpoint record was set aside as damaged
        run = ray.train.get_context().get_storage()
        unregistered = run_checkpoints(run.storage_filesystem, run.experiment_fs_path)
    with intact_checkpoint(checkpoint, unregistered) as resume:
        if resume.damaged and rank == 0 and sink is not None:
            sink.damaged.remote(resume.damaged, resume.name)
        return 0 if resume.folder is None else load_checkpoint_dir(engine, resume.folder)


def _batches(dataset_name: str, plan: BatchPlan, collate: Any):
    shard = ray.train.get_dataset_shard(dataset_name)
    return shard.iter_torch_batches(batch_size=plan.micro_batch, collate_fn=collate, drop_last=True, prefetch_batches=2)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _timed_batches(
    batches: Iterable[dict[str, torch.Tensor]], skip: int, device: torch.device, clock: StepClock
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index, batch on the device) from micro-batch `skip` on; the wait for each is the clock's data wait."""
    iterator = iter(batches)
    index = -1
    while True:
        with clock.phase("data_wait"):
            try:
                batch = next(iterator)
                index += 1
                while index < skip:  # consumed before the resume
                    batch = next(iterator)
                    index += 1
            except StopIteration:
                return
            batch = _to_device(batch, device)
        yield index, batch


def _validation_loss(engine: Any, dataset_name: str, plan: BatchPlan, collate: Any, max_batches: int) -> float:
    engine.eval()
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(_batches(dataset_name, plan, collate)):
            if i >= max_batches:
                break
            losses.append(forward_loss(engine, _to_device(batch, engine.device))[0].item())
    engine.train()
    total, count = _all_mean([sum(losses), float(len(losses))], engine.device)
    return total / max(count, 1.0)


def _group_rates(optimizer: Any) -> dict[str, float]:
    """The current rate of each parameter group (`parameter_groups` names them); 0.0 for a group not trained."""
    rates = {"lr_projector_vce": 0.0, "lr_adapter": 0.0}
    for group in optimizer.param_groups:
        if group.get("name") in ("projector_vce", "adapter"):
            rates[f"lr_{group['name']}"] = float(group["lr"])
        else:
            raise KeyError(f"optimizer parameter group without a duet name: {sorted(group)}")
    return rates


def _gather_artifact_state(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Complete artifact weights (trainable + projector/VCE) on every rank; under ZeRO-3 gathered from their
    shards first."""
    module = engine.module
    if zero_stage == 3:
        params = [p for _, p in artifact_parameters(module)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return artifact_state_dict(module)
    return artifact_state_dict(module)


def train_loop_per_worker(raw: dict[str, Any]) -> None:
    """Build, (resume,) train and checkpoint one stage on this worker."""
    settings = LoopSettings(**raw)
    cfg = config_from_dict(settings.config)
    stage_cfg = cfg.stage(settings.stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    plan = plan_batch(stage_cfg, world)
    steps = total_steps(stage_cfg, settings.num_train_samples)
    steps_per_epoch = max(1, settings.num_train_samples // stage_cfg.global_batch)
    precision = resolve_precision(cfg.deepspeed, settings.use_gpu)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, settings.stage, settings.stage1_artifact)
    offload = cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage >= 1
    optimizer = build_optimizer(model, stage_cfg, offload)
    scheduler = cosine_with_warmup(optimizer, steps, stage_cfg.warmup_ratio)
    with quiet_op_builds():
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=build_deepspeed_config(cfg.deepspeed, plan, precision),
        )
    use_fused_kernel(engine.module, engine.device)  # vce.sampler: deformable_detr on CUDA; warns if it cannot
    step = _restore(engine, settings.metrics_sink, rank)
    if step and rank == 0 and settings.metrics_sink is not None:  # the driver says so, also with no step left
        settings.metrics_sink.resumed.remote(step)
    collate = make_collate(settings.processor_dir, cfg.storage, cfg.model.max_length if cfg.data.packing else None)
    val_name = f"{settings.val_dataset}_{rank}" if settings.val_dataset else None
    eval_every = stage_cfg.eval_every or stage_cfg.checkpoint_every
    # Validated before the first step too, so every report carries a val_loss (schedulers such as ASHA need it).
    val_loss = _validation_loss(engine, val_name, plan, collate, stage_cfg.eval_batches) if val_name else None

    engine.train()
    clock = StepClock(torch.cuda.synchronize if settings.use_gpu else None)
    flops = StepFlops.from_model(engine.module)
    peak_tflops = device_peak_tflops(cfg.scaling.peak_tflops, engine.device)
    time_collectives(clock, deepspeed.comm.comm.cdb)
    started = window_start = time.perf_counter()
    done_at_start = step
    window_loss, window_tokens, window_computed, window_samples, window_flops = 0.0, 0, 0, 0, 0.0
    while step < steps:
        skip = (step % steps_per_epoch) * plan.accumulation  # micro-batches of this epoch already consumed
        batches = _batches(f"{settings.train_dataset}_{rank}", plan, collate)
        for index, batch in _timed_batches(batches, skip, engine.device, clock):
            with clock.phase("forward"):
                loss, _ = forward_loss(engine, batch)
            with clock.phase("backward"):
                engine.backward(loss)
            with clock.phase("optimizer"):
                engine.step()
                window_loss += loss.item() / plan.accumulation
            lengths = sample_lengths(batch)
            window_tokens += sum(lengths)
            window_computed += batch["input_ids"].numel()  # rows x row length: padding included
            window_samples += len(lengths)
            window_flops += flops.batch(lengths, batch["pixel_values"].shape[0])
            if (index + 1) % plan.accumulation:
                continue
            step += 1
            with clock.phase("report"):
                loss_mean, tokens_total, computed_total, samples_total, flops_total = _all_mean(
                    [window_loss, float(window_tokens), float(window_computed), float(window_samples), window_flops],
                    engine.device,
                )
            now = time.perf_counter()
            elapsed = now - window_start  # since the previous step ended: its reporting included
            rate = (step - done_at_start) / max(now - started, 1e-9)
            metrics = {
                "step": step, "total_steps": steps, "epoch": (step - 1) // steps_per_epoch,
                "loss": loss_mean,
                **_group_rates(optimizer),
                "tokens_per_s": tokens_total * world / max(elapsed, 1e-9),
                "samples_per_s": samples_total * world / max(elapsed, 1e-9),
                "padding_efficiency": tokens_total / max(computed_total, 1.0),
                "step_time_s": elapsed,
                "eta_s": (steps - step) / max(rate, 1e-9),
                "model_tflops_per_s": model_tflops_per_s(flops_total * world, elapsed, world),
                **clock.take(),
            }
            if peak_tflops is not None:
                metrics["mfu"] = mfu(flops_total * world, elapsed, world, peak_tflops)
            with clock.phase("report"):  # booked in the next step's row
                if val_name is not None:
                    if step % eval_every == 0 or step == steps:
                        val_loss = _validation_loss(engine, val_name, plan, collate, stage_cfg.eval_batches)
                        metrics[VAL_MEASURED] = 1.0
                    # Always reported (Tune's schedulers compare every report); logged only where measured.
                    metrics["val_loss"] = val_loss
                if rank == 0 and settings.metrics_sink is not None:
                    settings.metrics_sink.push.remote(settings.stage, metrics)
                if step % stage_cfg.checkpoint_every == 0 or step == steps:
                    _save_checkpoint(engine, step, metrics, rank, world, cfg.scaling.checkpoint_upload)
                elif metrics.get(VAL_MEASURED):
                    # Ray Train (and Tune's scheduler through it) hears of the steps that change what it
                    # decides on: checkpoints and validations. Each report waits for the controller to
                    # collect the one before (Ray Train V2 polls every 2 s), so one per step would cap
                    # training at a step per 2 s; every step's metrics reach the driver through the sink.
                    ray.train.report(metrics)
            window_loss, window_tokens, window_computed, window_samples, window_flops = 0.0, 0, 0, 0, 0.0
            window_start = now
            if step >= steps or step % steps_per_epoch == 0:
                break  # done, or the epoch's complete global batches are used up
    state = _gather_artifact_state(engine, cfg.deepspeed.zero_stage)
    if rank == 0:
        save_stage_artifact(engine.module, cfg, settings.stage, settings.artifact_uri, settings.data_digest, state,
                            run_id=settings.run_id)
    if dist.is_initialized():
        dist.barrier()
