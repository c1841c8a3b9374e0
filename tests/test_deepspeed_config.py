"""DeepSpeed config building: the global batch holds for any worker count."""

from __future__ import annotations

import pytest

from components.config import DeepSpeedSection, StageSection
from components.train.deepspeed import build_deepspeed_config, plan_batch, resolve_precision


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_global_batch_holds_for_any_worker_count(world: int) -> None:
    stage = StageSection(name="stage2", lr=2e-5, adapter_lr=2e-4, global_batch=128, micro_batch=8)
    plan = plan_batch(stage, world)
    assert plan.micro_batch * plan.world_size * plan.accumulation == 128
    assert plan.micro_batch <= 8


def test_micro_batch_shrinks_to_divide_the_share() -> None:
    stage = StageSection(name="stage1", lr=1e-3, global_batch=24, micro_batch=5)
    plan = plan_batch(stage, 2)  # 12 per worker: micro 5 does not divide, 4 does
    assert (plan.micro_batch, plan.accumulation) == (4, 3)


def test_indivisible_global_batch_names_the_key() -> None:
    stage = StageSection(name="stage1", lr=1e-3, global_batch=10, micro_batch=2)
    with pytest.raises(ValueError, match=r"stage1.global_batch \(10\) is not divisible by the 3 workers"):
        plan_batch(stage, 3)


def test_precision_follows_hardware() -> None:
    assert resolve_precision(DeepSpeedSection(precision="auto"), use_gpu=False) == "fp32"
    assert resolve_precision(DeepSpeedSection(precision="fp32"), use_gpu=True) == "fp32"
    with pytest.raises(ValueError, match="deepspeed.precision=bf16 needs GPUs"):
        resolve_precision(DeepSpeedSection(precision="bf16"), use_gpu=False)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_config_has_batch_zero_and_precision(zero: int) -> None:
    stage = StageSection(name="stage2", lr=2e-5, adapter_lr=2e-4, global_batch=32, micro_batch=4)
    ds = build_deepspeed_config(DeepSpeedSection(zero_stage=zero), plan_batch(stage, 2), "bf16")
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] * 2 * ds["gradient_accumulation_steps"] == 32
    assert ds["zero_optimization"]["stage"] == zero
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (zero == 3)


@pytest.mark.parametrize(("steps", "warmup_ratio"), [(40, 0.03), (1000, 0.03), (10, 0.0), (7, 0.5)])
def test_schedule_matches_transformers_cosine_with_warmup(steps: int, warmup_ratio: float) -> None:
    """LLaVA trains with transformers' schedule: the learning rate at every step is the same here."""
    import math

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from components.train.loop import cosine_with_warmup

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours = lrs(lambda o: cosine_with_warmup(o, steps, warmup_ratio))
    theirs = lrs(lambda o: get_cosine_schedule_with_warmup(o, math.ceil(steps * warmup_ratio), steps))
    assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.slow  # DeepSpeed compiles its CPU Adam on first use (about two minutes on 2 cores)
def test_offload_uses_deepspeeds_cpu_adam_with_both_learning_rates() -> None:
    """DeepSpeed refuses a client torch optimizer under ZeRO-Offload; its own CPU Adam takes the same groups."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from components.train.loop import build_optimizer

    model = torch.nn.ModuleDict({"lora_S": torch.nn.Linear(2, 2), "projector": torch.nn.Linear(2, 2)})
    stage = StageSection(name="stage2", lr=2e-5, adapter_lr=2e-4)
    assert isinstance(build_optimizer(model, stage, offload=False), torch.optim.AdamW)
    cpu_adam = build_optimizer(model, stage, offload=True)
    assert isinstance(cpu_adam, DeepSpeedCPUAdam)
    assert [(g["name"], g["lr"]) for g in cpu_adam.param_groups] == [("projector_vce", 2e-5), ("adapter", 2e-4)]
