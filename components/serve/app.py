"""The Ray Serve application: an OpenAI-compatible chat endpoint over duet's fine-tuned versions.

One deployment, `DuetServer`, is the HTTP ingress and the model replica at once (FastAPI routes):

- `POST /v1/chat/completions` checks the request (components/serve/protocol.py, images.py), encodes it
  with the version's training template (the evaluation's prompt builder) and hands it to `_run_batch`,
  a `@serve.batch` generator: requests arriving together run as one generate call per version and
  sampling setting, every row followed step by step, so streamed and plain answers come from the same
  batch and a streamed answer's pieces add up to the plain one.
- Versions are loaded by a `@serve.multiplexed` loader (LRU, `serve.max_versions_per_replica`) in a
  thread: loading one never holds up requests for another. A version evicted while requests still
  use it is detached when the last of them ends.
- The default model id follows the registry alias: resolved every `serve.alias_refresh_s`, the new
  holder is loaded first and then takes new requests; requests already running finish on the old one.
- With `serve.api_key_env` set, every route but /health wants `Authorization: Bearer <token>`, the
  token read from that environment variable on the replica.

`app_builder` is what `serve run` / `serve deploy` import (pipelines/configs/serve.yaml);
`pipelines/serve.py` builds the same application.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types (Request) at runtime.

import asyncio
import hmac
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application

from components.config import DuetConfig, config_from_dict, load_config
from components.data.conversation import ConversationError, SequenceTooLongError
from components.data.records import BadRecord
from components.serve.engine import Engine, Job, RowState, Version
from components.serve.images import allowed_roots, image_bytes
from components.serve.protocol import (
    STREAM_END,
    APIError,
    chunk,
    completion,
    completion_id,
    conversation,
    max_new_tokens,
    model_card,
    parse_request,
    stop_sequences,
)
from components.serve.versions import Catalog, ModelRef, parse_default, parse_request_model

logger = logging.getLogger("ray.serve")
# Serve logs each replica start, route update and request at INFO; a terminal shows its warnings and errors.
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}
api = FastAPI(title="duet", docs_url=None, redoc_url=None)


def default_model(cfg: DuetConfig) -> str:
    """What the served name answers with: serve.model, else the registry model at its alias."""
    return cfg.serve.model or f"models:/{cfg.registry.model_name}@{cfg.registry.alias}"


def _token(cfg: DuetConfig) -> str | None:
    name = cfg.serve.api_key_env
    if name is None:
        return None
    token = os.environ.get(name, "")
    if not token:
        raise RuntimeError(f"serve.api_key_env names {name}, which is not set (or empty) on this replica: set it "
                           "to the bearer token clients send, or unset serve.api_key_env to serve without auth")
    return token


@dataclass
class VersionHandle:
    """What the multiplexed loader caches; Serve calls `__del__` when it evicts the version."""

    version: Version
    retire: Any = field(repr=False)

    def __del__(self) -> None:  # Serve calls it on eviction, the GC once more: only queues the version
        try:
            self.retire(self.version)
        except Exception:  # noqa: BLE001  (at interpreter exit the queue may be gone; nothing to free then)
            pass


@serve.deployment(name="duet")
@serve.ingress(api)
class DuetServer:
    def __init__(self, tree: dict[str, Any], model: str) -> None:
        from components.quiet import quiet_model_worker

        quiet_model_worker()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a replica log is no terminal
        self.cfg = config_from_dict(tree)
        self.served = parse_default(model, self.cfg.registry.model_name, self.cfg.storage)
        self.catalog = Catalog(self.cfg, self.served)
        self.engine = Engine()
        self.roots = allowed_roots(self.cfg)
        self.token = _token(self.cfg)
        self.started = int(time.time())
        self._retired: deque[Version] = deque()
        self._retire_lock = threading.Lock()

        async def load(key: str) -> VersionHandle:  # a function: Serve keeps its LRU cache on it
            return await self._load_version_by_key(key)

        self._load = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_versions_per_replica)(load)
        self._run_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        # The default version is loaded before the replica takes traffic.
        self.alias_target = self.catalog.resolve(self.served)
        self._first = self._load_blocking(self.alias_target)
        self._refresher: asyncio.Task | None = None

    # ------------------------------------------------------------ versions

    def _load_blocking(self, ref: ModelRef) -> VersionHandle:
        package = self.catalog.fetch(ref)
        try:
            return VersionHandle(self.engine.load(package), self._queue_retired)
        except BaseException:
            package.discard()
            raise

    async def _load_version_by_key(self, key: str) -> VersionHandle:
        if self._first is not None and self._first.version.key == key:
            first, self._first = self._first, None
            return first
        name, _, version = key.rpartition("/")
        ref = self.served if self.served.artifact == key else ModelRef(name, version=version)
        return await asyncio.to_thread(self._load_blocking, ref)

    def _queue_retired(self, version: Version) -> None:
        self._retired.append(version)

    def _detach_retired(self) -> None:
        """Detach evicted versions no request uses any more (the engine lock waits for a running batch)."""
        with self._retire_lock:
            keep = []
            while self._retired:
                version = self._retired.popleft()
                if version.users:
                    keep.append(version)
                else:  # also when the same key was loaded again since: this object's adapter goes
                    self.engine.unload(version)
            self._retired.extend(keep)

    async def _version_for(self, model: str) -> Version:
        ref = parse_request_model(model, self.served)
        if ref == self.served:
            ref = self.alias_target
        elif ref.alias is not None:
            ref = await asyncio.to_thread(self.catalog.resolve, ref)
        if ref.artifact is None and ref.key not in self.engine.versions:
            # Before the multiplexed loader, which logs every failed load as a server error.
            await asyncio.to_thread(self.catalog.check, ref)
        return (await self._load(ref.key)).version

    async def _follow_alias(self) -> None:
        """Move the default model to the alias's holder whenever it changes (after loading it)."""
        failing = False
        while True:
            await asyncio.sleep(self.cfg.serve.alias_refresh_s)
            try:
                target = await asyncio.to_thread(self.catalog.resolve, self.served)
                if target != self.alias_target:
                    await self._load(target.key)
                    logger.info("%s: %s now serves %s (was %s)", self.served.name, self.served.alias,
                                target.key, self.alias_target.key)
                    self.alias_target = target
                    if self._first is not None:  # the first holder was never asked for: let it go
                        self._queue_retired(self._first.version)
                        self._first = None
                failing = False
            except Exception as exc:  # the registry is down: keep serving what is loaded
                if not failing:
                    logger.warning("alias %s@%s not re-resolved (%s); still serving %s", self.served.name,
                                   self.served.alias, str(exc)[:200], self.alias_target.key)
                failing = True

    def _start_following(self) -> None:
        if self._refresher is None and self.served.alias is not None:
            self._refresher = asyncio.get_running_loop().create_task(self._follow_alias())

    # ------------------------------------------------------------ batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _run_batch(self, items: list[tuple[Version, Job]]) -> AsyncIterator[list[Any]]:
        """Requests that arrived together: one generate call per (version, sampling); yields every step.

        Each yield is one entry per request: its state (text so far, tokens, finish) while it runs,
        None while it waits for its group, StopIteration once its final state was sent.
        """
        current: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for index, (version, job) in enumerate(items):
            groups.setdefault((id(version), job.sampling), []).append(index)
        loop = asyncio.get_running_loop()
        for rows in groups.values():
            version = items[rows[0]][0]
            queue: asyncio.Queue = asyncio.Queue()

            def on_step(states: list[RowState], queue: asyncio.Queue = queue) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, states)

            def run(version: Version = version, rows: list[int] = rows, queue: asyncio.Queue = queue) -> None:
                try:
                    self.engine.generate(version, [items[i][1] for i in rows], on_step)
                    loop.call_soon_threadsafe(queue.put_nowait, None)
                except BaseException as exc:  # noqa: BLE001  (handed to the event loop, raised there)
                    loop.call_soon_threadsafe(queue.put_nowait, exc)

            threading.Thread(target=run, name="duet-generate", daemon=True).start()
            while (states := await queue.get()) is not None:
                if isinstance(states, BaseException):
                    raise states
                for i, state in zip(rows, states):
                    current[i] = state
                yield list(current)
                for i, state in zip(rows, states):
                    if state.finish is not None:
                        current[i] = StopIteration

    # ------------------------------------------------------------ routes

    def _check_token(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, sent = header.partition(" ")
        if scheme.lower() != "bearer" or not sent:
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <token>' (the openai client's "
                                "api_key)", kind="authentication_error")
        if not hmac.compare_digest(sent.strip().encode(), self.token.encode()):
            raise APIError(401, "the bearer token is wrong", kind="authentication_error")

    async def _job(self, version: Version, body: Any) -> tuple[Job, int]:
        """The request as a generation job (every check a request can fail is made here), and its prompt length."""
        talk = conversation(body)
        builder = version.builder
        encoded = [await asyncio.to_thread(image_bytes, url, param, self.roots, self.cfg.storage)
                   for url, param in zip(talk.image_urls, talk.image_params)]
        try:  # decoding a large image takes a while: not on the event loop
            images = await asyncio.to_thread(builder.images, encoded)
        except BadRecord as exc:
            param = talk.image_params[0] if len(talk.image_params) == 1 else "messages"
            raise APIError(400, f"{param}: not a usable image ({exc.detail}); send a PNG or JPEG of at most "
                                f"{builder.max_pixels} pixels (data.max_image_pixels)", param=param) from None
        try:
            prompt = builder.encode(builder.text(talk.turns), len(encoded))
        except SequenceTooLongError as exc:
            raise APIError(400, f"messages: the prompt is {exc.length} tokens with its images expanded, over "
                                f"model.max_length {exc.max_length}: shorten it", param="messages") from None
        except ConversationError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        room = builder.max_length - len(prompt)
        asked = max_new_tokens(body, 0)
        if asked > room:
            raise APIError(400, f"max_tokens {asked} + the prompt's {len(prompt)} tokens exceed model.max_length "
                                f"{builder.max_length}: ask for at most {room}", param="max_tokens")
        budget = min(asked or version.cfg.eval.max_new_tokens, room)
        if budget < 1:
            raise APIError(400, f"the prompt's {len(prompt)} tokens leave no room in model.max_length "
                                f"{builder.max_length}", param="messages")
        job = Job(prompt, images, budget, stop_sequences(body), body.temperature, body.top_p, body.seed, body.stream)
        return job, len(prompt)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._start_following()
        try:
            self._check_token(request)
            body = parse_request(await request.body())
            version = await self._version_for(body.model)
            version.users += 1
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        try:
            job, prompt_tokens = await self._job(version, body)
        except APIError as exc:
            self._release(version)
            return JSONResponse(exc.body(), status_code=exc.status)
        cid = completion_id()
        if body.stream:
            return StreamingResponse(self._stream(cid, body.model, version, job), media_type="text/event-stream")
        try:
            final = RowState()
            async for state in self._run_batch((version, job)):
                if state is not None:
                    final = state
        finally:
            self._release(version)
        return completion(cid, body.model, final.text, final.finish or "length", prompt_tokens, final.tokens)

    async def _stream(self, cid: str, model: str, version: Version, job: Job) -> AsyncIterator[str]:
        try:
            yield chunk(cid, model, {"role": "assistant", "content": ""})
            sent, finish = "", None
            async for state in self._run_batch((version, job)):
                if state is None:
                    continue
                if state.text.startswith(sent) and len(state.text) > len(sent):
                    yield chunk(cid, model, {"content": state.text[len(sent):]})
                    sent = state.text
                finish = state.finish or finish
            yield chunk(cid, model, {}, finish or "length")
            yield STREAM_END
        finally:
            self._release(version)

    def _release(self, version: Version) -> None:
        version.users -= 1
        if self._retired:
            threading.Thread(target=self._detach_retired, name="duet-detach", daemon=True).start()

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        self._start_following()
        try:
            self._check_token(request)
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        served = self.served
        cards = [model_card(served.name, self.started, serves=self.alias_target.key,
                            alias=served.alias, source=served.artifact)]
        cards += [model_card(key, self.started, serves=key) for key in sorted(self.engine.versions)
                  if key != served.artifact]
        return {"object": "list", "data": cards}

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        """Liveness, and what this replica holds: the alias's version, the loaded versions, the bases under them."""
        return {"status": "ok", "serves": self.alias_target.key, "versions": sorted(self.engine.versions),
                "bases": len(self.engine.bases)}


def build_app(cfg: DuetConfig, model: str | None = None) -> Application:
    """The application for `cfg`: replicas, autoscaling and CPUs/GPUs as the config says."""
    from components.cluster import use_gpu_for_evaluation

    section = cfg.serve
    gpu = use_gpu_for_evaluation(cfg)
    actor = {"num_cpus": cfg.eval.cpus_per_replica, "num_gpus": cfg.eval.gpus_per_replica if gpu else 0}
    # The token is never put in the deployment's options (Ray shows those): replicas read serve.api_key_env
    # from their own environment, which a local Ray inherits from this process and a cluster from its nodes.
    deployment = DuetServer.options(
        autoscaling_config={"min_replicas": section.min_replicas, "max_replicas": section.max_replicas,
                            "initial_replicas": max(section.min_replicas, 1),
                            "target_ongoing_requests": section.target_ongoing_requests},
        max_ongoing_requests=section.max_ongoing_requests, ray_actor_options=actor,
        logging_config=SERVE_LOGGING,
    )
    return deployment.bind(cfg.model_dump(mode="json"), model or default_model(cfg))


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run` / `serve deploy`: args `config` (a duet YAML), optional `model` and `overrides`."""
    unknown = sorted(set(args) - {"config", "model", "overrides"})
    if unknown:
        raise ValueError(f"unknown application args {unknown}: the duet app takes config, model, overrides")
    if "config" not in args:
        raise ValueError("the duet app needs args.config: the path of a duet config YAML")
    cfg = load_config(str(args["config"]), [str(o) for o in args.get("overrides") or []])
    return build_app(cfg, args.get("model"))
