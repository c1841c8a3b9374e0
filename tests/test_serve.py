"""The OpenAI-compatible endpoint on a real Ray Serve (127.0.0.1), queried with the official `openai` client.

One application for the module: two registered versions in a real `mlflow server`, `@champion` on the
first, bearer auth on, the alias re-resolved every second. The answers are checked against
`pipelines/evaluate.py`'s evaluation, each version's in-process answers, and each other.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import ray
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (session fixture)
from PIL import Image
from ports import free_port
from test_evaluate import EvalSetup, eval_setup  # noqa: F401  (session fixture: a tiny base and its stage artifacts)
from test_serve_engine import second_stage2  # noqa: F401  (session fixture: a second stage-2 artifact)

from components.config import DuetConfig
from components.evaluate.generate import Generator
from components.evaluate.prompts import PromptBuilder, visual_token_count
from components.packaging import log_pyfunc
from components.registry import Registry
from components.tracking.tracker import Tracker

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV = "DUET_TEST_SERVE_TOKEN"
MAX_PIXELS = 100_000


@dataclass
class Served:
    cfg: DuetConfig
    url: str
    token: str
    registry: Registry
    artifacts: dict[str, str]  # registry version -> the stage-2 artifact it packages
    model: str  # the registered model name, one per test module

    def client(self, token: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=token or self.token, max_retries=0, timeout=120)

    def get(self, path: str) -> dict:
        request = urllib.request.Request(self.url.removesuffix("/v1") + path,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def _raw(url: str, body: bytes | None = None, token: str | None = None) -> tuple[int, dict]:
    """Status and JSON of a plain HTTP call (what a non-openai client such as curl gets)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())



@pytest.fixture(scope="module")
def served(eval_setup: EvalSetup, second_stage2: str, mlflow_server: MlflowServer,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Served]:
    from ray import serve

    from components.serve.app import SERVE_LOGGING, build_app

    work = tmp_path_factory.mktemp("serve")
    model = f"duet-{request.module.__name__.rpartition('.')[2].replace('_', '-')}"  # versions 1-3 in every module
    overrides = {
        "run": eval_setup.cfg.run.model_copy(update={"work_dir": str(work)}),
        "tracking": eval_setup.cfg.tracking.model_copy(update={"tracking_uri": mlflow_server.uri,
                                                               "experiment": "serve"}),
        "registry": eval_setup.cfg.registry.model_copy(update={"model_name": model}),
        "data": eval_setup.cfg.data.model_copy(update={"max_image_pixels": MAX_PIXELS}),
        "serve": eval_setup.cfg.serve.model_copy(update={
            "alias_refresh_s": 1.0, "max_versions_per_replica": 2, "api_key_env": TOKEN_ENV, "batch_wait_timeout_s": 0.05}),
    }
    cfg = eval_setup.cfg.model_copy(update=overrides)
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    registry = Registry(tracker, cfg.registry)
    artifacts = {}
    # Version 1 answers differently per image; version 3 packages version 2's artifact again.
    for artifact in (second_stage2, eval_setup.stage2, eval_setup.stage2):
        with tracker.parent_run(f"serve-{len(artifacts) + 1}") as run_id:
            log_pyfunc(cfg, artifact, run_id)
        artifacts[registry.register(run_id).version] = artifact
    registry.promote("1", force=True)
    token = "test-token-" + os.urandom(8).hex()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_ENV, token)  # the replicas inherit it from the Ray this process starts
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()  # after Ray has taken its own ports
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=SERVE_LOGGING)
            serve.run(build_app(cfg), name="duet", route_prefix="/", blocking=False)
            yield Served(cfg, f"http://127.0.0.1:{port}/v1", token, registry, artifacts, model)
        finally:
            serve.shutdown()
            ray.shutdown()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _ask(question: str, png: bytes | None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": question}]
    if png is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_url(png)}})
    return [{"role": "user", "content": content}]


def _split_records(split_dir: str) -> dict[str, tuple[dict, bytes]]:
    """id -> (record json, its image) read straight from the split's WebDataset shards."""
    records: dict[str, tuple[dict, bytes]] = {}
    for shard in sorted(Path(split_dir).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                record = json.loads(data)
                key = name.removesuffix(".json")
                if record.get("images") == ["png"]:
                    records[str(record["id"])] = (record, members[f"{key}.png"])
    return records


@pytest.mark.slow
def test_an_answer_with_an_image_is_the_evaluations_answer(served: Served, eval_setup: EvalSetup) -> None:  # noqa: F811
    from components.evaluate.run import evaluate

    evaluated = evaluate(served.cfg, served.artifacts["1"], eval_setup.test_split, eval_setup.base).per_sample
    records = _split_records(eval_setup.test_split)
    asked = evaluated[evaluated["task"] != "caption"].head(4)
    assert len(asked) >= 3
    client = served.client()
    for row in asked.itertuples():
        record, png = records[row.id]
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        reply = client.chat.completions.create(model=served.model, messages=_ask(question, png), temperature=0)
        assert reply.choices[0].message.content == row.prediction, row.id
        assert reply.usage.completion_tokens <= served.cfg.eval.max_new_tokens
    assert asked["prediction"].nunique() >= 2, "the served version should answer differently per sample"


@pytest.mark.slow
def test_a_stream_carries_the_same_text_in_chunks(served: Served) -> None:
    client = served.client()
    png = _split_records_first_png()
    plain = client.chat.completions.create(model=served.model, messages=_ask("Describe the image.", png))
    stream = client.chat.completions.create(model=served.model, messages=_ask("Describe the image.", png), stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == plain.choices[0].message.content
    assert len(pieces) > 1
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


_FIRST_PNG: list[bytes] = []


def _split_records_first_png() -> bytes:
    if not _FIRST_PNG:
        from components.data.synthetic import SyntheticShapes

        _FIRST_PNG.append(SyntheticShapes(3, 64).png(0))
    return _FIRST_PNG[0]


def _in_process(cfg: DuetConfig, base: str, artifact: str, question: str, png: bytes,
                max_tokens: int | None = None) -> str:
    builder = PromptBuilder.from_config(cfg, base, visual_token_count(cfg))
    ids = builder.encode(builder.text([{"from": "human", "value": f"<image>\n{question}"}]), 1)
    tokens = max_tokens or cfg.eval.max_new_tokens
    return Generator(cfg, artifact, base, "cpu").generate([ids], [builder.images([png])], tokens)[0]


@pytest.mark.slow
def test_two_versions_side_by_side_on_one_replica_over_one_base(served: Served, eval_setup: EvalSetup) -> None:  # noqa: F811
    png = _split_records_first_png()
    question = "List the shapes in the image."
    expected = {v: _in_process(eval_setup.cfg, eval_setup.base, a, question, png) for v, a in served.artifacts.items()}
    assert expected["1"] != expected["2"]
    client = served.client()
    answers: dict[str, list[str]] = {"1": [], "2": []}

    def ask(version: str) -> None:
        reply = client.chat.completions.create(model=f"{served.model}/{version}", messages=_ask(question, png))
        answers[version].append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(v,)) for v in ("1", "2") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {v: [expected[v]] * 3 for v in ("1", "2")}
    health = served.get("/health")
    assert set(health["versions"]) >= {f"{served.model}/1", f"{served.model}/2"} and health["bases"] == 1
    listed = {m.id: m for m in client.models.list().data}
    assert {served.model, f"{served.model}/1", f"{served.model}/2"} <= set(listed)
    assert listed[served.model].duet["serves"] == f"{served.model}/1" and listed[served.model].duet["alias"] == "champion"


def _tall_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_bad_requests_get_a_4xx_naming_the_problem_and_serving_goes_on(served: Served) -> None:
    client = served.client()
    png = _split_records_first_png()

    def refused(error: type[openai.APIStatusError], names: str, **request) -> None:
        request.setdefault("model", served.model)
        with pytest.raises(error) as caught:
            client.chat.completions.create(**request)
        assert names in caught.value.message, caught.value.message

    def image(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}]

    refused(openai.BadRequestError, "not a usable image",
            messages=image("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()))
    refused(openai.BadRequestError, f"at most {MAX_PIXELS} pixels", messages=image(_data_url(_tall_png(400, 400))))
    refused(openai.BadRequestError, "over model.max_length", messages=_ask("word " * 600, png))
    refused(openai.BadRequestError, "max_tokens 5000", messages=_ask("hi", png), max_tokens=5000)
    refused(openai.NotFoundError, "is not served here", model="gpt-4o", messages=_ask("hi", png))
    refused(openai.NotFoundError, "has no version 99", model=f"{served.model}/99", messages=_ask("hi", png))
    refused(openai.BadRequestError, "http URL scheme is not accepted", messages=image("http://127.0.0.1:1/x.png"))
    refused(openai.BadRequestError, "outside the storage", messages=image("s3://somebody-else/x.png"))
    with pytest.raises(openai.AuthenticationError, match="bearer token is wrong"):
        served.client("wrong").chat.completions.create(model=served.model, messages=_ask("hi", png))
    status, body = _raw(f"{served.url}/chat/completions", b"{not json", served.token)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw(f"{served.url}/chat/completions", json.dumps({"model": served.model, "messages": _ask("hi", png)}).encode())
    assert status == 401 and "missing bearer token" in body["error"]["message"]
    assert _raw(f"{served.url}/models")[0] == 401
    reply = client.chat.completions.create(model=served.model, messages=_ask("Describe the image.", png))
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_a_version_past_the_replica_limit_evicts_the_least_recently_used(served: Served,
                                                                         eval_setup: EvalSetup) -> None:  # noqa: F811
    png = _split_records_first_png()
    question = "List the shapes in the image."
    client = served.client()

    def ask(version: str) -> str:
        reply = client.chat.completions.create(model=f"{served.model}/{version}", messages=_ask(question, png))
        return reply.choices[0].message.content

    answers = {v: ask(v) for v in ("1", "2", "3")}  # limit 2: asking for 3 evicts 1, the least recently used
    deadline = time.monotonic() + 30
    while (health := served.get("/health"))["versions"] != [f"{served.model}/2", f"{served.model}/3"]:
        assert time.monotonic() < deadline, f"version 1 was not detached: {health}"
        time.sleep(0.2)
    assert health["bases"] == 1
    assert answers["2"] == answers["3"] == _in_process(eval_setup.cfg, eval_setup.base, served.artifacts["2"],
                                                       question, png)
    assert ask("1") == answers["1"]  # loaded again on demand (and 2 evicted in turn)


@pytest.mark.slow
def test_promotion_moves_the_alias_traffic_with_no_failed_request(served: Served, eval_setup: EvalSetup) -> None:  # noqa: F811
    png = _split_records_first_png()
    question = "List the shapes in the image."
    expected = {v: _in_process(eval_setup.cfg, eval_setup.base, a, question, png) for v, a in served.artifacts.items()}
    client = served.client()
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    failures: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model=served.model, messages=_ask(question, png))
                seen.append((time.monotonic(), reply.choices[0].message.content))
            except BaseException as exc:  # noqa: BLE001  (every failure is the test's finding)
                failures.append(exc)

    workers = [threading.Thread(target=loop) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        moved_at = time.monotonic()
        assert served.registry.promote("2", force=True).promoted
        deadline = moved_at + 60
        while served.get("/health")["serves"] != f"{served.model}/2":
            assert time.monotonic() < deadline, "the endpoint did not follow @champion within 60 s"
            time.sleep(0.5)
        followed = time.monotonic()
        time.sleep(2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not failures, failures[:3]
    assert {text for _, text in seen} <= {expected["1"], expected["2"]}
    assert any(text == expected["1"] for at, text in seen if at < moved_at)
    late = [text for at, text in seen if at > followed + 1]
    assert late and set(late) == {expected["2"]}
    assert {m.id: m for m in client.models.list().data}[served.model].duet["serves"] == f"{served.model}/2"


# ---------------------------------------------------------------- without a server


def test_the_application_builds_from_serve_config_args() -> None:
    from ray.serve import Application

    from components.serve.app import app_builder

    app = app_builder({"config": str(REPO / "pipelines/configs/demo.yaml"),
                       "overrides": ["serve.max_replicas=3", "eval.use_gpu=false"]})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"config": "x.yaml", "modle": "models:/x@champion"})


def test_the_cli_names_a_missing_token_variable_before_ray_starts(capsys, monkeypatch, eval_setup: EvalSetup) -> None:  # noqa: F811
    from pipelines import serve as serve_cli

    monkeypatch.delenv("DUET_MISSING_TOKEN", raising=False)
    argv = ["--set", f"model.checkpoint={eval_setup.base}", "--set", "serve.api_key_env=DUET_MISSING_TOKEN",
            "--model", eval_setup.stage2]
    assert serve_cli.run_script(lambda: serve_cli.main(argv)) == 2
    out = capsys.readouterr()
    assert "DUET_MISSING_TOKEN is not set" in out.err and "Ray:" not in out.out
    assert serve_cli.run_script(lambda: serve_cli.main(["--model", eval_setup.stage1])) == 2
    assert "stage-1 artifact" in capsys.readouterr().err
