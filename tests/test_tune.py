"""Ray Tune sweeps over stage 2: the search space, applying a search point, and a real 4-trial ASHA sweep.

The sweep test runs what pipelines/sweep.py runs on the tiny model with trials of one worker each, two at a
time, against the embedded SQLite MLflow store; the unit tests above it start no Ray.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.tune.search.sample import Categorical, Float, LogUniform

from components import storage
from components.config import ConfigError, DuetConfig, SearchSpace, load_config
from components.tracking.tags import TAG_EARLY_STOPPED, TAG_KIND, TAG_STEP, TAG_TRIAL_ID
from components.tracking.tracker import Tracker
from components.train.stage import StageData
from components.tune.ledger import TrialRow
from components.tune.space import apply_best, check_sweepable, search_space
from components.tune.sweep import concurrent_trials, format_trials, search_algorithm, trial_resources

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines/configs/demo.yaml"
STEPS = 4


def _data(val: bool = True, samples: int = 90) -> StageData:
    return StageData(train_uri="unused", num_train_samples=samples, digest="d", processor_dir="unused",
                     num_visual_tokens=64, val_uri="unused-val" if val else None)


# ---------------------------------------------------------------- search space and search points


def test_search_space_samples_choices_and_log_uniform_rates() -> None:
    space = search_space(SearchSpace(r=[4, 8], alpha_over_r=[2.0], adapter_lr=(1e-4, 1e-2), lr=(3e-5, 3e-5)))
    assert isinstance(space["r"], Categorical) and space["r"].categories == [4, 8]
    assert isinstance(space["alpha_over_r"], Categorical) and space["alpha_over_r"].categories == [2.0]
    assert space["lr"] == 3e-5, "a range with equal ends is the fixed value"
    rate = space["adapter_lr"]
    assert isinstance(rate, Float) and isinstance(rate.get_sampler(), LogUniform)
    samples = np.asarray(rate.sample(size=2000, random_state=np.random.default_rng(0)))
    assert samples.min() >= 1e-4 and samples.max() <= 1e-2
    # Log-uniform: half the mass below the geometric mean 1e-3 (a uniform draw would put ~9% there).
    assert 0.45 < float(np.mean(samples < 1e-3)) < 0.55


def test_apply_best_sets_exactly_the_searched_keys() -> None:
    cfg = load_config(DEMO)
    best = apply_best(cfg, {"r": np.int64(8), "alpha_over_r": np.float64(0.5), "adapter_lr": 3e-4, "lr": 2e-5})
    assert (best.adapter.r, best.adapter.alpha, best.stage2.adapter_lr, best.stage2.lr) == (8, 4.0, 3e-4, 2e-5)
    assert type(best.adapter.r) is int
    expected = cfg.model_dump()
    expected["adapter"].update(r=8, alpha=4.0)
    expected["stage2"].update(adapter_lr=3e-4, lr=2e-5)
    assert best.model_dump() == expected
    assert cfg.adapter.r == 16, "the base config is left alone"


def test_apply_best_keeps_alpha_over_r_when_only_r_is_given() -> None:
    cfg = load_config(DEMO, ["adapter.r=16", "adapter.alpha=48"])
    assert apply_best(cfg, {"r": 4}).adapter.alpha == 12.0
    assert apply_best(cfg, {"lr": 1e-5}).adapter == cfg.adapter


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_searchers_are_seeded_and_sample_inside_the_space(search: str) -> None:
    cfg = load_config(DEMO, [f"tune.search={search}", "tune.seed=3", "tune.space.r=[4, 8]",
                             "tune.space.adapter_lr=[1e-5, 1e-3]", "tune.space.lr=[2e-5, 2e-5]"])

    def suggestions(seed: int) -> list[dict]:
        searcher, max_concurrent = search_algorithm(cfg.model_copy(update={"tune": cfg.tune.model_copy(
            update={"seed": seed})}), concurrency=2)
        if search == "random":
            assert max_concurrent is None and searcher.max_concurrent == 2
            return [dict(sorted(space.items())) for space in _random_points(searcher, cfg)]
        assert max_concurrent == 2
        assert searcher.set_search_properties(cfg.tune.metric, cfg.tune.mode, search_space(cfg.tune.space))
        return [searcher.suggest(f"t{i}") for i in range(4)]

    first = suggestions(3)
    assert first == suggestions(3), "same seed, same points"
    assert first != suggestions(4)
    for point in first:
        assert point["r"] in (4, 8) and 1e-5 <= point["adapter_lr"] <= 1e-3
        apply_best(cfg, point)


def _random_points(generator, cfg: DuetConfig) -> list[dict]:
    from ray import tune

    tune.register_trainable("duet_points", lambda config: None)
    generator.add_configurations({"points": {"run": "duet_points", "config": search_space(cfg.tune.space),
                                             "num_samples": 4}})
    points = []
    for _ in range(4):
        trial = generator.next_trial()
        points.append(trial.config)
        generator.on_trial_complete(trial.trial_id)  # frees its slot: the generator holds 2 at a time
    return points


@pytest.mark.parametrize(
    ("point", "fragments"),
    [
        ({"r": 0}, ["r=0", "adapter.r", "tune.space"]),
        ({"r": 2.5, "alpha_over_r": 2.0}, ["adapter.r", "fractional part"]),
        ({"adapter_lr": 0.0}, ["stage2.adapter_lr", "greater than 0"]),
        ({"lr": -1e-4}, ["stage2.lr"]),
        ({"alpha_over_r": -2.0}, ["alpha_over_r", "positive", "tune.space.alpha_over_r"]),
        ({"rank": 8}, ["unknown search parameter(s) rank", "r, alpha_over_r, adapter_lr, lr"]),
    ],
)
def test_invalid_search_points_are_named(point: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        apply_best(load_config(DEMO), point)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("tune.space.lr=[1e-3, 1e-5]", "tune.space.lr: must be [low, high] with low <= high"),
        ("tune.space.adapter_lr=[0, 1e-3]", "tune.space.adapter_lr"),
        ("tune.space.r=[]", "tune.space.r"),
        ("tune.space.r=[8, 0]", "tune.space.r.1"),
        ("tune.metric=accuracy", "tune.metric: must be one of the per-step training metrics val_loss, loss"),
        ("tune.trial_driver_cpus=0", "tune.trial_driver_cpus"),
        ("tune.reduction_factor=1", "tune.reduction_factor"),
    ],
)
def test_bad_tune_config_is_refused_naming_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="invalid config") as err:
        load_config(DEMO, [override])
    assert fragment in str(err.value)


def test_check_sweepable_refuses_what_cannot_work() -> None:
    cfg = load_config(DEMO, ["stage2.max_steps=6"])
    check_sweepable(cfg, _data())
    with pytest.raises(ConfigError, match="adapter.type 'rode' cannot be swept"):
        check_sweepable(load_config(DEMO, ["adapter.type=rode"]))
    with pytest.raises(ConfigError, match="needs a validation split.*tune.metric=loss"):
        check_sweepable(cfg, _data(val=False))
    check_sweepable(load_config(DEMO, ["tune.metric=loss"]), _data(val=False))
    with pytest.raises(ConfigError, match=r"tune.grace_period \(8\) exceeds the stage-2 steps \(6\)"):
        check_sweepable(load_config(DEMO, ["stage2.max_steps=6", "tune.grace_period=8"]), _data())


def test_sweep_cli_refuses_an_unsweepable_config_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.console import run_script
    from pipelines.sweep import main

    argv = ["--config", str(DEMO), "--set", "adapter.type=moe_lora_topk", "--set", f"run.work_dir={tmp_path}"]
    assert run_script(lambda: main(argv)) == 2
    assert "[duet] error: adapter.type 'moe_lora_topk' cannot be swept" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing written"


def test_concurrency_follows_the_cluster_and_the_cap() -> None:
    cfg = load_config(DEMO, ["scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "data.preprocess_num_cpus=0.25"])
    need = trial_resources(cfg, use_gpu=False, has_validation=True)
    # driver 0.1 + worker 0.5 + two streams x (read + text actor + image actor) x 0.25
    assert need == pytest.approx({"CPU": 2.1})
    assert trial_resources(cfg, use_gpu=False, has_validation=False) == pytest.approx({"CPU": 1.35})
    assert concurrent_trials(need, {"CPU": 5.0}, None) == 2
    assert concurrent_trials(need, {"CPU": 4.2}, None) == 2
    assert concurrent_trials(need, {"CPU": 64.0}, 3) == 3
    assert concurrent_trials(need, {"CPU": 1.0}, None) == 1, "at least one: an autoscaler may add nodes"
    gpu = trial_resources(load_config(DEMO, ["scaling.num_workers=2"]), use_gpu=True, has_validation=True)
    assert gpu["GPU"] == 2.0
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 5.0}, None) == 2


def test_trials_table_lists_every_trial() -> None:
    rows = [
        TrialRow("a_00000", {"r": 8, "alpha_over_r": 2.0, "adapter_lr": 3e-4, "lr": 1e-5}, 1.2345, "TERMINATED",
                 False, 6, run_id="run-a"),
        TrialRow("a_00001", {"r": 4, "alpha_over_r": 2.0, "adapter_lr": 1e-6, "lr": 1e-6}, 2.5, "TERMINATED",
                 True, 1),
        TrialRow("a_00002", {"r": 4, "alpha_over_r": 1.0, "adapter_lr": 1e-6, "lr": 1e-6}, None, "ERROR",
                 False, 0, error="boom"),
    ]
    lines = format_trials(rows, "val_loss", 6).splitlines()
    assert lines[0].split() == ["trial", "r", "alpha_over_r", "adapter_lr", "lr", "val_loss", "steps", "status",
                                "early-stopped", "mlflow", "run"]
    assert lines[1].split() == ["a_00000", "8", "2", "0.0003", "1e-05", "1.234", "6/6", "TERMINATED", "no", "run-a"]
    assert lines[2].split()[-4:] == ["1/6", "TERMINATED", "yes", "-"]
    assert lines[3].split()[5:8] == ["-", "0/6", "ERROR"]


# ---------------------------------------------------------------- a real sweep


def _overrides(work: Path) -> list[str]:
    return [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base", "run.name=sweep",
        "data.num_records=100", "data.caption_records=40", "data.records_per_shard=50",
        "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
        "data.preprocess_num_cpus=0.25",
        "stage1.global_batch=8", "stage1.micro_batch=2", "stage1.max_steps=2", "stage1.checkpoint_every=2",
        "stage2.global_batch=8", "stage2.micro_batch=2", f"stage2.max_steps={STEPS}",
        f"stage2.checkpoint_every={STEPS}", "stage2.eval_every=1", "stage2.eval_batches=1",
        "adapter.r=8", "adapter.alpha=16",
        "tune.num_samples=4", "tune.search=random", "tune.seed=8", "tune.grace_period=1",
        "tune.reduction_factor=2", "tune.space.r=[4, 8]", "tune.space.alpha_over_r=[2.0]",
        "tune.space.adapter_lr=[1e-6, 1e-3]", "tune.space.lr=[1e-6, 1e-3]",
    ]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # 5 logical CPUs: two trials of 2.1 CPUs each side by side (see test_concurrency_follows_...).
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_sweep_stops_weak_trials_tracks_every_trial_and_writes_the_best_config(tmp_path: Path, cluster) -> None:
    from components.workflow.sweep import run_sweep

    output = tmp_path / "best.yaml"
    cfg = load_config(DEMO, _overrides(tmp_path))
    started = time.perf_counter()
    result = run_sweep(cfg, str(output))  # what pipelines/sweep.py runs
    print(f"sweep pipeline wall time: {time.perf_counter() - started:.0f} s")

    # Tune: four trials, all ended by Tune without error, at least one stopped early by ASHA.
    rows = {row.trial_id: row for row in result.trials}
    assert len(rows) == 4 and all(row.status == "TERMINATED" for row in rows.values()), result.trials
    stopped = [row for row in rows.values() if row.early_stopped]
    finished = [row for row in rows.values() if not row.early_stopped]
    assert stopped, f"ASHA stopped no trial: {result.trials}"
    assert all(row.steps < STEPS for row in stopped) and all(row.steps == STEPS for row in finished)
    assert all(storage.exists(storage.join(row.artifact_uri or "", "artifact.json")) for row in finished)
    assert len({row.artifact_uri for row in finished}) == len(finished), "one artifact folder per trial"

    # The best config: the best finished trial's values on top of the base config, loadable as it is.
    best = min(finished, key=lambda row: row.metric if row.metric is not None else math.inf)
    assert result.best_trial_id == best.trial_id and result.best_params == best.params
    loaded = load_config(output)
    assert loaded == apply_best(cfg, best.params)
    assert (loaded.adapter.r, loaded.adapter.alpha) == (best.params["r"], best.params["r"] * 2.0)
    assert (loaded.stage2.adapter_lr, loaded.stage2.lr) == (best.params["adapter_lr"], best.params["lr"])
    assert result.best_metrics["val_loss"] == pytest.approx(best.metric)

    # MLflow: every trial a finished child run of the sweep's parent run, fed per step from the driver.
    client = Tracker(cfg.tracking, cfg.run.work_dir).client
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.`duet.kind` = 'pipeline'")
    assert [p.info.run_name for p in parents] == ["sweep-sweep"]
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags[TAG_KIND] for c in children) == ["stage", "trial", "trial", "trial", "trial"]
    assert [c.data.tags[TAG_STEP] for c in children if c.data.tags[TAG_KIND] == "stage"] == ["stage1"]
    trials = {c.data.tags[TAG_TRIAL_ID]: c for c in children if c.data.tags[TAG_KIND] == "trial"}
    assert set(trials) == set(rows)
    for trial_id, run in trials.items():
        row = rows[trial_id]
        assert run.info.status == "FINISHED" and run.info.run_id == row.run_id
        assert run.data.tags[TAG_EARLY_STOPPED] == str(row.early_stopped).lower()
        assert int(run.data.params["adapter.r"]) == row.params["r"]
        assert float(run.data.params["stage2.lr"]) == pytest.approx(row.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == list(range(1, row.steps + 1))
    assert parent.data.tags["duet.sweep.best_trial"] == best.trial_id
    assert parent.data.tags["duet.sweep.best_run_id"] == best.run_id

    # Stopped trials gave their training workers and data actors back to the cluster.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0.0) < 5.0 and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0.0) == pytest.approx(5.0), ray.available_resources()


def test_default_output_is_under_the_work_dir() -> None:
    from components.layout import best_config_path

    cfg = DuetConfig.model_validate({"run": {"name": "x", "work_dir": "w"}})
    assert best_config_path(cfg) == os.path.join("w", "sweeps", "x-best.yaml")
