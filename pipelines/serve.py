"""Serve the fine-tuned model over an OpenAI-compatible HTTP API on Ray Serve (components/serve/app.py).

--model is what the served name (registry.model_name) answers with: models:/NAME@ALIAS (it follows the
alias as pipelines/promote.py moves it), models:/NAME/VERSION, or a stage-2 artifact URI; default
serve.model, else models:/{registry.model_name}@{registry.alias}. Other versions are asked for as
NAME/VERSION in a request's `model`. Everything is checked before Ray starts.

Without RAY_ADDRESS a local Ray is started and the endpoint runs until Ctrl-C. With RAY_ADDRESS (a running
cluster) the application is deployed there and the script returns; --blocking keeps it attached.
`serve run pipelines/configs/serve.yaml` and `serve deploy` run the same application.

examples:
  python pipelines/serve.py --config pipelines/configs/demo.yaml
  python pipelines/serve.py --config pipelines/configs/demo.yaml --model models:/duet-demo/2 --set serve.port=8001
  curl -s 127.0.0.1:8000/v1/models
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

from components.config import ConfigError, DuetConfig, parse_cli
from components.console import run_script, say


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a stage-2 artifact URI")
    parser.add_argument("--blocking", action="store_true",
                        help="stay attached after deploying to a running cluster (RAY_ADDRESS)")


def check_serving(cfg: DuetConfig, model: str) -> None:
    """What can fail before Ray starts: the model reference, the token variable, the registry."""
    from components.serve.versions import Catalog, parse_default

    name = cfg.serve.api_key_env
    if name and not os.environ.get(name):
        raise ConfigError(f"serve.api_key_env is {name}, but {name} is not set: export the bearer token as {name} "
                          "(never in a file), or unset serve.api_key_env to serve without auth")
    try:
        served = parse_default(model, cfg.registry.model_name, cfg.storage)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if served.artifact is None:
        from components.tracking.tracker import Tracker

        Tracker(cfg.tracking, cfg.run.work_dir).check_reachable()
        Catalog(cfg, served).resolve(served)  # an alias nobody holds is named now, not in a replica


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__, argv, extra=_arguments)
    from components.serve.app import default_model

    model = args.model or default_model(cfg)
    from components.serve.protocol import APIError

    try:
        check_serving(cfg, model)
    except APIError as exc:
        raise ConfigError(exc.message) from None
    from ray import serve

    from components.cluster import init_ray
    from components.quiet import quiet_driver
    from components.serve.app import SERVE_LOGGING, build_app

    quiet_driver()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines repeat what is said here
    joined = bool(os.environ.get("RAY_ADDRESS"))
    say(init_ray(cfg))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=SERVE_LOGGING)
    say(f"deploying {model} as {cfg.registry.model_name!r} ...")
    serve.run(build_app(cfg, model), name="duet", route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    auth = f"; bearer token from ${cfg.serve.api_key_env}" if cfg.serve.api_key_env else ""
    say(f"serving at {url} (POST /chat/completions, GET /models){auth}")
    if joined and not args.blocking:
        say("deployed to the cluster; `serve status` shows it, `serve shutdown` stops it")
        return 0
    say("Ctrl-C stops the endpoint")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping the endpoint")
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
