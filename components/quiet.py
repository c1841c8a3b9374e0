"""Library output that is noise for the person reading duet's output, switched off where it is made.

A stage streams four Ray Data datasets on two workers, so every library's per-block, per-report and
per-process line is multiplied; what is left is the plan, a line per step, the training progress
(printed by the driver, components/console.py) and the summary. Warnings and errors of every
library still show. Each switch below says what it silences and why that is noise.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout

import ray
import torch
from ray.train.v2._internal.execution import context as ray_train_context
from ray.util.debug import log_once
from transformers.utils import logging as hf_logging

# DeepSpeed prints this each time it loads a compiled op (its CPU collectives on every rank, every stage),
# a bare print to standard output, or a record of the root logger where Ray Train patches print.
_BUILD_NOTICE = re.compile(r"^DeepSpeed \S+ built successfully$")


def quiet_driver() -> None:
    """The process that runs a pipeline: off a terminal nothing is redrawn, notices of no consequence go.

    Off a terminal (a file, CI, `ray job logs`) Hugging Face's and MLflow's progress bars are off
    (on a terminal they stay: one live display per running step). MLflow's notices that it creates
    its local SQLite tables go. DeepSpeed, which transformers imports when it saves a model, is told
    the accelerator instead of probing for one and warning.
    """
    if not sys.stdout.isatty():
        hf_logging.disable_progress_bar()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-dataset start and finish lines off, for every dataset this
    process builds (a dataset keeps the context it was built with, also where it runs): its bars
    would be redrawn for every block. duet prints its own progress."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    # Its per-dataset "execution finished" lines are INFO; its warnings still show.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data reminds once per process that its bars are off ("To enable, set ..."): they are off on
    # purpose here, so that reminder is used up now (Ray's own once-per-process switch).
    log_once("ray_data_progress_manager_disabled")


# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a warning for
# every model built, about library internals no user can act on.
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def quiet_model_worker() -> None:
    """A Ray worker that loads a model to generate (an evaluation replica): no weight-loading bar in the
    job log, and no warning about PEFT's use of a deprecated transformers attribute."""
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)


def quiet_training_worker(use_gpu: bool) -> None:
    """A Ray Train worker, before DeepSpeed is imported there.

    DeepSpeed is told its accelerator (it would otherwise probe for one and warn on every CPU
    worker); the Ray Data streams the worker iterates stay quiet; Ray Train's line per report (every
    metric of every step) goes; model loading draws no progress bar into the job log; DeepSpeed's
    "op built" notices go (its warnings do not); DeepSpeed's ZeRO-2 calls a torch collective under
    its deprecated name, which warns on every rank and is nothing a user can act on; nor is PEFT's read
    of a deprecated transformers attribute.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    quiet_ray_data()
    # Ray Train 2.60 logs every report at INFO through a logger named by its file path, outside the
    # "ray.train" tree that RunSection's LoggingConfig quiets.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    logging.getLogger().addFilter(lambda record: not _BUILD_NOTICE.match(record.getMessage()))
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)


@contextmanager
def quiet_op_builds() -> Iterator[None]:
    """Around `deepspeed.initialize`: its "DeepSpeed <op> built successfully" prints go, anything else it
    prints is printed as it was (after the call, also when it fails). Ray Train's print patch, where on,
    tees into the redirect and logs a record the root-logger filter of quiet_training_worker drops."""
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            yield
    finally:  # also when the call fails: what it printed on the way may say why
        for line in printed.getvalue().splitlines():
            if not _BUILD_NOTICE.match(line):
                print(line)


@contextmanager
def quiet_tune() -> Iterator[None]:
    """Ray Tune's console output off for one `Tuner.fit` (its experiment box, trial tables, results paths):
    a study prints its own plan and table. Tune's legacy output engine at verbose=0 prints nothing; the
    new engine still prints its header, so it is switched off (`RAY_AIR_NEW_OUTPUT=0`) while fit runs.
    Trial errors still reach the caller in the result grid."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old
