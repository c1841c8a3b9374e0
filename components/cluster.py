"""The Ray cluster a pipeline runs on: joining or starting it, and whether it can hold a step.

A stage holds its training workers and, beside each of them, the Ray Data
processes that feed it (a shard reader, a text actor and an image actor per
stream; a second stream for validation), all at once: Ray places them as the
resources free up, so a cluster too small for the whole set does not fail, it
waits forever. `check_fits` turns that wait into an error that names the
resources, before any work is done. A cluster with an autoscaler is judged by
what it can grow to, not by what it has now.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import ray
import torch

# Private, but the call Ray Train itself makes before it waits for workers (worker_group.py).
from ray._private.state import state as ray_state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from components.config import DuetConfig
from components.console import say
from components.errors import ClusterTooSmallError

log = logging.getLogger(__name__)

# A local Ray gets at least this many logical CPUs, so training workers and the Ray Data
# actors that feed them are schedulable side by side even on a 2-core laptop.
LOCAL_MIN_CPUS = 4
# Processes per data stream that hold data.preprocess_num_cpus: reader, text actors, image actors.
_READER = 1


def init_ray(cfg: DuetConfig) -> str:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local instance of our own.

    Without RAY_ADDRESS a plain `ray.init()` would join any cluster a `ray start` left running on
    this machine (and then refuse `num_cpus`); a local run never does that by accident: it starts
    its own instance (`address="local"`). Returns a line that says which.
    """
    if ray.is_initialized():
        return "Ray: already connected"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
        keep_ray_data_bookkeeping_on_this_node()
        return f"Ray: joined the cluster at {address} ({_describe(ray.cluster_resources())})"
    loopback_only()
    token_auth_on()
    # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner polls
    # (without it, it warns every few seconds); it listens on 127.0.0.1 only.
    ray.init(address="local", num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True, logging_level=logging.WARNING)
    return (f"Ray: started a local instance ({_describe(ray.cluster_resources())}); set RAY_ADDRESS or use "
            "`ray job submit` to run on a cluster")


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Where an actor the driver depends on goes: the driver's own node, never a worker node.

    A zero-CPU actor fits anywhere, so Ray may put it on a worker node, which can be lost mid-stage
    or removed by an autoscaler; the driver would lose it with that node (and keep the node busy).
    """
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def keep_ray_data_bookkeeping_on_this_node() -> None:
    """Create Ray Data's detached bookkeeping actors here, on the driver's node, before any dataset runs.

    Ray Data creates them (its stats actor and actor-location tracker: detached, zero-CPU, one per
    cluster) on the node of the first process that executes a dataset, which for a stage is a training
    worker on a worker node. A node holding a detached actor is never idle, so an autoscaler would keep
    that (GPU) node up after the run for as long as the cluster lives. Created from the driver, they
    stay on the head, and later runs reuse them by name. Private Ray Data calls (Ray 2.60): if they
    move, the pipeline still runs, and this says so once.
    """
    try:
        from ray.data._internal.execution.node_trackers.actor_location import (
            get_or_create_actor_location_tracker,
        )
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_actor_location_tracker()
    except (ImportError, AttributeError) as exc:
        log.warning("could not place Ray Data's bookkeeping actors on the driver's node (%s); an autoscaler "
                    "may keep the node that ran the first dataset up after the run", exc)


def token_auth_on() -> None:
    """Start the local instance with Ray's token authentication on, chosen here rather than by default.

    Ray 2.60 turns token auth on for a new local cluster when RAY_AUTH_MODE is unset, and then warns
    that it did; set explicitly (for this process and the ones Ray starts) it is the same cluster, with
    a token generated on first use, and no warning. A RAY_AUTH_MODE the user set is left alone. Ray
    caches its config at import, so the private helper that sets the variable also refreshes it; if that
    helper moves, Ray's own default (and its warning) applies.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        return
    _enable_token_auth()


def loopback_only() -> None:
    """Make the Ray instance this process starts listen on 127.0.0.1 only, whatever the environment.

    Ray binds its servers (GCS, raylet, agents, workers) to the node address, which it takes to be the
    host's network address and turns an explicit 127.0.0.1 back into, unless its cluster mode is off
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when Ray is imported): then everything is loopback.
    A one-machine run needs no other interface, and open Ray ports accept jobs from whoever reaches them.
    The variable is set for the processes Ray starts and the flag for this one; joining a cluster
    (RAY_ADDRESS, `ray job submit`) never comes here.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def use_gpu_for_training(cfg: DuetConfig) -> bool:
    """`scaling.use_gpu: auto` trains on GPUs when the cluster has any (the head may have none: ask the cluster)."""
    if cfg.scaling.use_gpu != "auto":
        return bool(cfg.scaling.use_gpu)
    return ray.cluster_resources().get("GPU", 0) > 0


def use_gpu_for_evaluation(cfg: DuetConfig) -> bool:
    """`eval.use_gpu: auto`: the Ray cluster (or, before Ray starts, this machine) has GPUs."""
    if cfg.eval.use_gpu != "auto":
        return bool(cfg.eval.use_gpu)
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


# ---------------------------------------------------------------- what a step holds at once


@dataclass(frozen=True)
class Need:
    """Resources a step holds at once, and how they add up (for the message when they do not fit)."""

    what: str
    resources: dict[str, float]
    breakdown: str


def data_cpus_per_worker(cfg: DuetConfig, has_validation: bool) -> float:
    """CPUs the Ray Data streams of one training worker hold at peak (see components/data/dataset.py).

    Each stream runs a reader plus up to `transform_concurrency` text and image actors at
    `preprocess_num_cpus` each; a worker keeps its training stream open while it validates.
    """
    per_stream = (_READER + 2 * cfg.data.transform_concurrency) * cfg.data.preprocess_num_cpus
    return per_stream * (2 if has_validation else 1)


def stage_need(cfg: DuetConfig, stage: int, has_validation: bool, use_gpu: bool) -> Need:
    """What one stage holds: its training workers and their data preprocessing."""
    workers = cfg.scaling.num_workers
    data = data_cpus_per_worker(cfg, has_validation)
    streams = "training and validation streams" if has_validation else "training stream"
    resources = {"CPU": workers * (cfg.scaling.cpus_per_worker + data)}
    breakdown = (f"{workers} training workers x {cfg.scaling.cpus_per_worker:g} CPU (scaling.cpus_per_worker) + "
                 f"their data preprocessing {workers} x {data:g} CPU (data.preprocess_num_cpus "
                 f"{cfg.data.preprocess_num_cpus:g} x {_READER + 2 * cfg.data.transform_concurrency} processes per "
                 f"stream, {streams})")
    if use_gpu:
        resources["GPU"] = workers * cfg.scaling.gpus_per_worker
        breakdown += f"; {workers} x {cfg.scaling.gpus_per_worker:g} GPU (scaling.gpus_per_worker)"
    for name, amount in cfg.scaling.resources_per_worker.items():
        resources[name] = resources.get(name, 0.0) + workers * amount
        breakdown += f"; {workers} x {amount:g} {name} (scaling.resources_per_worker)"
    return Need(f"stage {stage}", resources, breakdown)


def evaluation_need(cfg: DuetConfig, use_gpu: bool) -> Need:
    """What an evaluation holds: its generation replicas and the reader and prompt step feeding them."""
    replicas = cfg.eval.num_replicas
    feed = 2 * cfg.data.preprocess_num_cpus
    resources = {"CPU": replicas * cfg.eval.cpus_per_replica + feed}
    breakdown = (f"{replicas} generation replicas x {cfg.eval.cpus_per_replica:g} CPU (eval.num_replicas, "
                 f"eval.cpus_per_replica) + reader and prompt step 2 x {cfg.data.preprocess_num_cpus:g} CPU")
    if use_gpu:
        resources["GPU"] = replicas * cfg.eval.gpus_per_replica
        breakdown += f"; {replicas} x {cfg.eval.gpus_per_replica:g} GPU (eval.gpus_per_replica)"
    return Need("evaluation", resources, breakdown)


def pipeline_needs(cfg: DuetConfig, has_validation: bool) -> list[Need]:
    """Everything the full pipeline will hold at some point, one step at a time."""
    train_gpu, eval_gpu = use_gpu_for_training(cfg), use_gpu_for_evaluation(cfg)
    return [stage_need(cfg, 1, False, train_gpu), stage_need(cfg, 2, has_validation, train_gpu),
            evaluation_need(cfg, eval_gpu)]


# ---------------------------------------------------------------- does it fit


def cluster_capacity() -> tuple[dict[str, float], bool | None]:
    """The cluster's resources, and whether they come from an autoscaler's limits (what it can grow to).

    The flag is None when an autoscaler runs but does not say how far it can grow (Ray's v1 autoscaler,
    the default of `ray start --autoscaling-config`, publishes only its status): then no step is refused.
    """
    now = dict(ray.cluster_resources())
    try:
        most = ray_state.get_max_resources_from_cluster_config()
    except Exception as exc:  # an older or unusual cluster: judge by what it has now
        log.debug("no autoscaler limits (%s)", exc)
        most = None
    if most:
        return {k: max(now.get(k, 0.0), float(most.get(k, 0))) for k in set(now) | set(most)}, True
    return now, None if _autoscaler_status_published() else False


def _autoscaler_status_published() -> bool:
    """Whether an autoscaler with node types of its own runs (Ray's v1 one publishes only its status).

    The head's monitor publishes a status on every cluster; without an autoscaling config it runs Ray's
    read-only provider, which names each node's type `node_<id>`, so a node type of any other name means
    an autoscaling config (its head type, its worker types).
    """
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    try:
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception as exc:  # no status to read: no autoscaler duet can see
        log.debug("no autoscaler status (%s)", exc)
        return False
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    types |= {pending[1] for pending in report.get("pending_nodes") or [] if len(pending) > 1}
    return any(not name.startswith("node_") for name in types)


def check_fits(needs: list[Need], capacity: Mapping[str, float] | None = None,
               autoscaling: bool | None | str = "ask") -> None:
    """Refuse, naming the resources, a step the cluster can never hold at once (it would wait forever).

    A step that does not fit yet on a cluster whose autoscaler can grow to it goes ahead and waits for the
    nodes; with an autoscaler of unknown limits (`autoscaling` None) it goes ahead, saying what it waits for.
    """
    if capacity is None or autoscaling == "ask":
        capacity, autoscaling = cluster_capacity()
    waits = []
    for need in needs:
        short = {k: v for k, v in need.resources.items() if v > capacity.get(k, 0.0) + 1e-9}
        if not short:
            continue
        wanted = ", ".join(f"{v:g} {k}" for k, v in need.resources.items())
        if autoscaling is None:
            waits.append(f"{need.what} needs {wanted}")
            continue
        has = ", ".join(f"{capacity.get(k, 0.0):g} {k}" for k in need.resources)
        where = "can grow to at most" if autoscaling else "has"
        raise ClusterTooSmallError(
            f"{need.what} needs {wanted} at once ({need.breakdown}), but the Ray cluster {where} {has}: it would "
            f"wait forever. Give Ray more (`ray start --head --num-cpus N`, more or larger nodes), or lower "
            f"scaling.num_workers, scaling.cpus_per_worker, data.preprocess_num_cpus or eval.cpus_per_replica."
        )
    if waits:
        say(f"{'; '.join(waits)} at once, more than the cluster has now ({_describe(capacity)}): each waits for "
            "the autoscaler to add nodes (it does not report how far it can grow)")


def _describe(resources: Mapping[str, float]) -> str:
    shown = [f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if resources.get(k)]
    return ", ".join(shown) or "no CPUs"
