"""The OpenAI chat-completions wire format: requests checked into duet conversations, answers back out.

Only what a LLaVA fine-tune can honour is accepted: user/assistant turns ending with a user turn, text and
`image_url` parts, `max_tokens`, `temperature` (0, the default, is greedy: the evaluation's decoding),
`top_p`, `stop`, `seed`, `stream`, and `n: 1`. Every refusal is an `APIError` whose message names the field
and the fix; it becomes a 4xx in OpenAI's error shape, and the server goes on serving.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.evaluate.prompts import IMAGE_TOKEN

ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "server_error"]


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP code, the message says what to change."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: ErrorType = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """OpenAI's error object, which the `openai` client turns into BadRequestError and friends."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class _Lenient(BaseModel):
    # Clients send fields this server does not use (user, logprobs: false, ...): ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1


@dataclass(frozen=True)
class Conversation:
    """A request as duet's data plane reads it: turns in the training format and the image URLs in order."""

    turns: list[dict[str, str]]
    image_urls: list[str]
    image_params: list[str] = field(default_factory=list)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The request body as a ChatCompletionRequest; malformed JSON or a bad field is an APIError naming it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}); send a chat.completions request") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None
    if request.n != 1:
        raise APIError(400, f"n is {request.n}: this server returns one choice per request (n: 1)", param="n")
    return request


def stop_sequences(request: ChatCompletionRequest) -> tuple[str, ...]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return tuple(stop)


def max_new_tokens(request: ChatCompletionRequest, default: int) -> int:
    return request.max_completion_tokens or request.max_tokens or default


def conversation(request: ChatCompletionRequest) -> Conversation:
    """User/assistant messages as duet turns; each image part becomes an `<image>` placeholder where it stands."""
    turns: list[dict[str, str]] = []
    urls: list[str] = []
    params: list[str] = []
    for i, message in enumerate(request.messages):
        where = f"messages.{i}"
        if message.role not in ("user", "assistant"):
            hint = (" (the model was trained with its template's own system prompt, data.conversation_template)"
                    if message.role == "system" else "")
            raise APIError(400, f"{where}.role is {message.role!r}: only user and assistant turns are served{hint}",
                           param=f"{where}.role")
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(400, f"{where}.role is {message.role!r} where {expected!r} was expected: turns "
                                "alternate user, assistant, ..., ending with user", param=f"{where}.role")
        turns.append({"from": "human" if message.role == "user" else "gpt", "value": _text(message, where, urls, params)})
    if turns[-1]["from"] != "human":
        raise APIError(400, "the last message must be the user's: the model answers it", param="messages")
    return Conversation(turns, urls, params)


def _text(message: Message, where: str, urls: list[str], params: list[str]) -> str:
    content = message.content
    if content is None or (isinstance(content, str) and not content.strip()):
        raise APIError(400, f"{where}.content is empty", param=f"{where}.content")
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content
    pieces: list[str] = []
    for j, part in enumerate(parts):
        param = f"{where}.content.{j}"
        if part.type == "text":
            if part.text is None:
                raise APIError(400, f"{param}: a text part needs 'text'", param=param)
            if IMAGE_TOKEN in part.text:
                raise APIError(400, f"{param}: the text holds {IMAGE_TOKEN!r}; send images as image_url parts",
                               param=param)
            pieces.append(part.text)
        elif part.type == "image_url":
            if part.image_url is None:
                raise APIError(400, f"{param}: an image_url part needs image_url.url", param=param)
            if message.role != "user":
                raise APIError(400, f"{param}: images go in user messages", param=param)
            urls.append(part.image_url.url)
            params.append(f"{param}.image_url.url")
            pieces.append(IMAGE_TOKEN)
        else:
            raise APIError(400, f"{param}.type is {part.type!r}: send 'text' and 'image_url' parts", param=param)
    return "\n".join(pieces)


# ---------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    """A non-streamed chat.completion object."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk(cid: str, model: str, delta: dict[str, str], finish_reason: str | None = None) -> str:
    """One server-sent event holding a chat.completion.chunk."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n"


STREAM_END = "data: [DONE]\n\n"


def model_card(model_id: str, created: int, **duet: Any) -> dict[str, Any]:
    """An entry of GET /v1/models; `duet` says which registry version the id serves."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "duet", "duet": duet}
