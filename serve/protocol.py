"""The OpenAI-compatible HTTP protocol of the TaH endpoint: request validation, detokenization, responses.

No Ray here: serve/tah.py wires these into a Ray Serve deployment. Requests are validated strictly
(wrong types and unknown fields are 400s in OpenAI's error shape); the non-OpenAI knobs top_k,
min_p, threshold (the decider's), ignore_eos, stop_token_ids are accepted as extra body fields.

    python -c "from serve.protocol import CompletionRequest; print(CompletionRequest(model='m', prompt='hi'))"
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tah.engine import SamplingParams

MAX_N = 8


class APIError(Exception):
    """An error the client caused or must handle (status 4xx/5xx, OpenAI error body)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)  # accepted only at their neutral value
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    user: str | None = None
    # extras (not in OpenAI's API)
    top_k: int = Field(default=20, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be at most 4 non-empty strings", param="stop")
        return stops

    def sampling(self, logprobs: int | None, index: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p,
                              seed=None if self.seed is None else self.seed + index,
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, threshold=self.threshold)


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: Literal[False] = False
    suffix: None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def parse(cls: type[_Strict], raw: bytes) -> Any:
    """Body bytes -> validated request, or APIError(400) saying what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where or None) from None
    if req.stream and req.n > 1:
        raise APIError(400, "stream=true supports n=1 only", param="n")
    return req


class Detokenizer:
    """Incremental text of a growing token list; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token_id: int, final: bool = False) -> str:
        """The new text this token completes ("" while a multi-byte character is still partial;
        `final` flushes whatever is left, replacement characters included)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        new, self.text = text[len(self.text):], text
        return new


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the earliest stop string begins at or after `start` - len(longest stop), or None."""
    if not stops:
        return None
    lo = max(0, start - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, iterated: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "iterated_tokens": iterated}


def completion_logprobs(tokenizer: Any, tokens: list[int], lps: list[float],
                        tops: list[list[tuple[int, float]] | None]) -> dict[str, Any]:
    pieces = [tokenizer.decode([t]) for t in tokens]
    offsets, o = [], 0
    for p in pieces:
        offsets.append(o)
        o += len(p)
    return {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [None if t is None else {tokenizer.decode([i]): lp for i, lp in t} for t in tops]}


def chat_logprobs(tokenizer: Any, tokens: list[int], lps: list[float],
                  tops: list[list[tuple[int, float]] | None]) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, x) for i, x in (top or [])]}
                        for t, lp, top in zip(tokens, lps, tops)]}


def now() -> int:
    return int(time.time())
