"""The serving endpoint under load with hostile requests mixed in: 1,000 requests from 16 concurrent clients.

A tenth of them are malformed in varied ways (hypothesis-generated JSON bodies, bodies that are not JSON,
broken base64 images, images that are no image, oversized images, unknown models and versions). Every
malformed request must get a 4xx with OpenAI's error shape, every good one a 200 with the answer the model
gives it alone; the replica must neither restart nor grow in memory. The endpoint is tests/test_serve.py's
(two registered versions in a real `mlflow server`, bearer auth on).
"""

from __future__ import annotations

import base64
import io
import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
from adversarial import json_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow_server import mlflow_server  # noqa: F401  (session fixture)
from PIL import Image
from test_evaluate import EvalSetup, eval_setup  # noqa: F401  (session fixture)
from test_serve import Served, _in_process, served  # noqa: F401  (module fixture)
from test_serve_engine import second_stage2  # noqa: F401  (session fixture)

from components.data.synthetic import SyntheticShapes

TOTAL, MALFORMED, CLIENTS = 1000, 100, 16
TOKENS = 4  # short answers: the load is in the requests, not in long generations
QUESTIONS = ("List the shapes in the image.", "Describe the image.")


def _body(model: str, question: str, url: str) -> bytes:
    return json.dumps({"model": model, "max_tokens": TOKENS, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}).encode()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _hypothesis_bodies(count: int, model: str) -> list[bytes]:
    """JSON values of every shape, none of them a request: objects never carry `messages`."""
    bodies: list[bytes] = []

    @settings(max_examples=count, database=None, derandomize=True, suppress_health_check=list(HealthCheck),
              deadline=None)
    @given(json_like(), st.sampled_from(["raw", "with-model"]))
    def collect(value, kind) -> None:
        if isinstance(value, dict):
            value.pop("messages", None)
            if kind == "with-model":
                value["model"] = model
        bodies.append(json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass"))

    collect()
    return bodies[:count]


def _malformed(rng: random.Random, png: bytes, model: str) -> list[tuple[str, bytes]]:
    big = io.BytesIO()
    Image.new("RGB", (400, 400), (10, 200, 30)).save(big, format="PNG")
    cases = [("hypothesis-json", body) for body in _hypothesis_bodies(40, model)]
    cases += [("not-json", rng.randbytes(rng.randint(0, 300))) for _ in range(10)]
    cases += [("truncated-json", _body(model, "hi", _data_url(png))[:rng.randint(1, 200)]) for _ in range(10)]
    cases += [("broken-base64", _body(model, "What is it?", "data:image/png;base64," + "@#%" * rng.randint(1, 9)))
              for _ in range(10)]
    cases += [("not-an-image", _body(model, "What is it?", _data_url(rng.randbytes(rng.randint(1, 4000)))))
              for _ in range(10)]
    cases += [("oversized-image", _body(model, "What is it?", _data_url(big.getvalue()))) for _ in range(10)]
    cases += [("unknown-model", _body(rng.choice(["gpt-4o", f"{model}/404", f"nope-{rng.random()}"]), "hi",
                                      _data_url(png))) for _ in range(10)]
    assert len(cases) == MALFORMED
    return cases


def _replica() -> psutil.Process:
    """The one Serve replica process of the test's application (Ray titles it ray::ServeReplica:APP:NAME)."""
    found = [p for p in psutil.process_iter(["cmdline"])
             if any("ServeReplica:duet:duet" in part for part in (p.info["cmdline"] or []))]
    assert len(found) == 1, f"expected one replica process, found {len(found)}"
    return found[0]


def _post(url: str, body: bytes, token: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_a_thousand_requests_with_hostile_ones_mixed_in(served: Served, eval_setup: EvalSetup) -> None:  # noqa: F811
    rng = random.Random(0)
    shapes = SyntheticShapes(21, 64)
    pngs = [shapes.png(i) for i in range(4)]
    expected = {(q, i): _in_process(eval_setup.cfg, eval_setup.base, served.artifacts["1"], q, png, TOKENS)
                for q in QUESTIONS for i, png in enumerate(pngs)}
    good = [("good", (q, i)) for q, i in expected] * ((TOTAL - MALFORMED) // len(expected) + 1)
    requests: list[tuple[str, object]] = good[:TOTAL - MALFORMED] + _malformed(rng, pngs[0], served.model)
    rng.shuffle(requests)
    url = f"{served.url}/chat/completions"
    _post(url, _body(served.model, QUESTIONS[0], _data_url(pngs[0])), served.token)  # warm
    replica = _replica()
    memory: list[int] = []
    results: list[tuple[str, object, int, dict]] = []
    lock = threading.Lock()
    queue = list(requests)
    done = threading.Event()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                kind, payload = queue.pop()
            if kind == "good":
                question, index = payload
                body = _body(served.model, question, _data_url(pngs[index]))
            else:
                body = payload
            status, reply = _post(url, body, served.token)
            with lock:
                results.append((kind, payload, status, reply))

    def sample() -> None:
        while not done.wait(0.5):
            memory.append(replica.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()

    assert len(results) == TOTAL
    wrong = []
    for kind, payload, status, reply in results:
        if kind == "good":
            answer = reply.get("choices", [{}])[0].get("message", {}).get("content") if status == 200 else None
            if status != 200 or answer != expected[payload]:
                wrong.append((kind, status, str(reply)[:200]))
        elif not (400 <= status < 500 and reply.get("error", {}).get("message")):
            wrong.append((kind, status, str(reply)[:200]))
    assert not wrong, f"{len(wrong)} of {TOTAL} answered wrongly, e.g. {wrong[:5]}"
    kinds = {kind for kind, *_ in results}
    assert len(kinds) == 8, kinds
    assert _replica().pid == replica.pid, "the replica restarted during the run"
    quarter = max(1, len(memory) // 4)
    first, last = statistics.median(memory[:quarter]), statistics.median(memory[-quarter:])
    assert last <= first * 1.15 + 32 * 2**20, (
        f"replica memory grew from {first / 2**20:.0f} to {last / 2**20:.0f} MiB over {TOTAL} requests")
    print(f"{TOTAL} requests ({MALFORMED} malformed) from {CLIENTS} clients in {elapsed:.1f} s; replica RSS "
          f"{first / 2**20:.0f} -> {last / 2**20:.0f} MiB")
