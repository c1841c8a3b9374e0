"""The serving endpoint's request checks, image sources, model ids and streamed-text rules, without a server."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from test_evaluate import EvalSetup, eval_setup  # noqa: F401  (session fixture: a tiny base and its stage artifacts)

from components import storage
from components.config import load_config
from components.serve.engine import Job, RowFollower, _settled
from components.serve.images import allowed_roots, image_bytes
from components.serve.protocol import APIError, conversation, parse_request, stop_sequences
from components.serve.versions import ModelRef, parse_default, parse_request_model


def _request(**fields) -> bytes:
    body = {"model": "duet-llava", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def _refused(raw: bytes, status: int = 400) -> APIError:
    with pytest.raises(APIError) as caught:
        conversation(parse_request(raw))
    assert caught.value.status == status
    return caught.value


def test_image_parts_become_placeholders_where_they_stand() -> None:
    raw = _request(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "List the shapes."},
    ]}])
    talk = conversation(parse_request(raw))
    assert talk.turns == [{"from": "human", "value": "<image>\nList the shapes."}]
    assert talk.image_urls == ["data:image/png;base64,AAAA"]
    assert talk.image_params == ["messages.0.content.0.image_url.url"]


def test_turns_alternate_and_end_with_the_user() -> None:
    raw = _request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}])
    assert [t["from"] for t in conversation(parse_request(raw)).turns] == ["human", "gpt", "human"]
    assert "last message" in _refused(_request(messages=[{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}])).message
    assert "'assistant' was expected" in _refused(_request(messages=[{"role": "user", "content": "a"},
                                                                     {"role": "user", "content": "b"}])).message


@pytest.mark.parametrize(("body", "names"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
    (_request(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]),
     "data.conversation_template"),
    (_request(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "'input_audio'"),
    (_request(messages=[{"role": "user", "content": "<image>\nwhat?"}]), "image_url parts"),
    (_request(messages=[{"role": "user", "content": ""}]), "content is empty"),
    (_request(temperature=3), "temperature"),
    (_request(max_tokens=0), "max_tokens"),
    (_request(n=2), "n is 2"),
])
def test_bad_requests_are_refused_naming_the_field(body: bytes, names: str) -> None:
    error = _refused(body)
    assert names in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored_like_openai_clients_expect() -> None:
    assert parse_request(_request(user="someone", logprobs=False)).model == "duet-llava"


def test_stop_takes_up_to_four_strings() -> None:
    assert stop_sequences(parse_request(_request(stop="\n"))) == ("\n",)
    with pytest.raises(APIError, match="up to 4"):
        stop_sequences(parse_request(_request(stop=["a", "b", "c", "d", "e"])))


# ---------------------------------------------------------------- images


def test_data_urls_decode_and_other_schemes_are_refused() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG...").decode()
    assert image_bytes(url, "p", (), None) == b"\x89PNG..."
    for bad, names in [("data:image/png,raw", "base64"), ("data:image/png;base64,@@@", "not valid base64"),
                       ("http://169.254.169.254/latest", "http URL scheme"), ("file:///etc/passwd", "file URL"),
                       ("/etc/passwd", "scheme-less")]:
        with pytest.raises(APIError, match=names) as caught:
            image_bytes(bad, "messages.0.content.0.image_url.url", (), None)
        assert caught.value.param == "messages.0.content.0.image_url.url"


def test_object_store_images_only_under_the_configured_roots(tmp_path) -> None:
    cfg = load_config(None, ["data.root=s3://bucket/datasets"])
    assert allowed_roots(cfg) == ("s3://bucket/datasets/",)
    with pytest.raises(APIError, match="outside the storage"):
        image_bytes("s3://bucket/datasets-private/x.png", "p", allowed_roots(cfg), cfg.storage)
    with pytest.raises(APIError, match="outside the storage"):
        image_bytes("s3://other/x.png", "p", allowed_roots(cfg), cfg.storage)
    local = load_config(None, [f"data.root={tmp_path}"])
    assert allowed_roots(local) == ()
    chosen = load_config(None, ["serve.image_roots=[s3://a/b/]"])
    assert allowed_roots(chosen) == ("s3://a/b/",)


def test_an_object_store_image_under_the_root_is_read(s3_endpoint, s3_bucket: str) -> None:
    storage_cfg = s3_endpoint.storage_config()
    storage.write_bytes(f"{s3_bucket}/datasets/img.png", b"\x89PNG bytes", storage_cfg)
    cfg = load_config(None, [f"data.root={s3_bucket}/datasets"])
    assert image_bytes(f"{s3_bucket}/datasets/img.png", "p", allowed_roots(cfg), storage_cfg) == b"\x89PNG bytes"
    with pytest.raises(APIError, match="no object at"):
        image_bytes(f"{s3_bucket}/datasets/missing.png", "p", allowed_roots(cfg), storage_cfg)


# ---------------------------------------------------------------- model ids


def test_request_model_ids_against_the_served_alias() -> None:
    served = ModelRef("duet-llava", alias="champion")
    assert parse_request_model("duet-llava", served) == served
    assert parse_request_model("duet-llava/3", served) == ModelRef("duet-llava", version="3")
    assert parse_request_model("duet-llava@staging", served) == ModelRef("duet-llava", alias="staging")
    for unknown in ("gpt-4o", "duet-llava/three", "other/1", "other@champion"):
        with pytest.raises(APIError) as caught:
            parse_request_model(unknown, served)
        assert caught.value.status == 404 and "GET /v1/models" in caught.value.message


def test_an_artifact_is_served_under_the_registry_name_alone(eval_setup: EvalSetup) -> None:  # noqa: F811
    served = parse_default(eval_setup.stage2, "duet-llava")
    assert served.artifact == eval_setup.stage2 and served.key == eval_setup.stage2
    assert parse_request_model("duet-llava", served) == served
    with pytest.raises(APIError):
        parse_request_model("duet-llava/1", served)
    with pytest.raises(ValueError, match="stage-1 artifact"):
        parse_default(eval_setup.stage1, "duet-llava")
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        parse_default("models:/duet-llava", "duet-llava")
    assert parse_default("models:/m@champion", "x") == ModelRef("m", alias="champion")
    assert parse_default("models:/m/4", "x").key == "m/4"


def test_token_variable_is_a_name_not_a_token() -> None:
    assert load_config(None, ["serve.api_key_env=DUET_API_KEY"]).serve.api_key_env == "DUET_API_KEY"
    with pytest.raises(Exception, match="environment variable name"):
        load_config(None, ["serve.api_key_env=sk-abc.def"])
    with pytest.raises(Exception, match="min_replicas"):
        load_config(None, ["serve.min_replicas=3", "serve.max_replicas=2"])


# ---------------------------------------------------------------- streamed text


class _Chars:
    """A tokenizer whose tokens are characters (id = code point), eos 0: the follower's decoding seen plainly."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def _follow(texts: list[str], jobs: list[Job]) -> tuple[list[list[str]], list]:
    """Run a follower over rows that generate `texts` one character per step; the text seen at each step."""
    seen: list[list[str]] = []
    follower = RowFollower(_Chars(), jobs, 2, lambda states: seen.append([s.text for s in states]))
    width = max(len(t) for t in texts)
    done = torch.zeros(len(texts), dtype=torch.bool)
    for step in range(1, width + 1):
        ids = torch.tensor([[7, 7] + [ord(c) for c in t[:step].ljust(step, "\0")] for t in texts])
        done = follower(ids, None)
        if bool(done.all()):
            break
    return seen, follower.finish()


def test_streamed_text_only_grows_and_ends_as_the_stripped_answer() -> None:
    jobs = [Job(torch.zeros(2), torch.zeros(0), 50, stop=("END",), stream=True),
            Job(torch.zeros(2), torch.zeros(0), 6, stream=True)]
    seen, rows = _follow([" red star  blue EN circle END junk", "  abcdefgh"], jobs)
    assert rows[0].text == "red star  blue EN circle" and rows[0].finish == "stop"
    assert rows[1].text == "abcd" and rows[1].finish == "length" and rows[1].tokens == 6
    for column, row in enumerate(rows):
        texts = [step[column] for step in seen]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
        assert texts[-1] == row.text
    assert len({step[0] for step in seen}) > 5, "the streamed row is followed step by step"


def test_settled_text_holds_back_what_may_still_change() -> None:
    assert _settled("red st", ("stop",)) == "red"       # "st" may become "stop"
    assert _settled("red  ", ()) == "red"               # trailing spaces may be inside the answer or not
    assert _settled("red \ufffd", ()) == "red"          # a partial character
    assert _settled("  red", ()) == "red"
