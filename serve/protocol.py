"""The OpenAI-compatible HTTP protocol of the TaH endpoint: request validation, detokenization, responses.

No Ray here: serve/tah.py wires these into a Ray Serve deployment. Requests are validated strictly
(wrong types and unknown fields are 400s in OpenAI's error shape); the non-OpenAI knobs top_k,
min_p, threshold (the decider's), max_depth (the deepest depth this request's tokens may run, 1..the
model's), ignore_eos, stop_token_ids are accepted as extra body fields. `usage` adds, beside OpenAI's
counts, `iterated_tokens` (completion tokens produced at depth >= 2), `depth_counts` (a list of the
model's max_depth entries: [d - 1] = completion tokens sampled from the output of exactly depth d, the
depth where their decider stopped, so it sums to completion_tokens) and `prompt_depth_counts` (the
prompt's tokens by the depth they ran at prefill, likewise). For standard clients (lm-eval, vLLM's):
`prompt` may be a list of prompts, `echo` with `logprobs` scores the prompt's tokens (`max_tokens: 0`:
scoring only), and TokenizeRequest / DetokenizeRequest are vLLM's /tokenize and /detokenize.
Every field is bounded (`parse` with the server's `Limits`): a request is refused here, with a 4xx,
before anything of it reaches the tokenizer or the engine.

    python -c "from serve.protocol import CompletionRequest; print(CompletionRequest(model='m', prompt='hi'))"
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tah.engine import SamplingParams

MAX_N = 8
MAX_PROMPTS = 64  # prompts in one completions request (lm-eval batches a few; vLLM takes lists too)
MAX_CHOICES = 128  # prompts x n
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 4096
MAX_NAME_CHARS = 64  # OpenAI's limit for a message's `name`
MAX_USER_CHARS = 512
MAX_MODEL_CHARS = 256  # the model id is echoed in the 404 message
MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4 levels deep; json itself would recurse ~1000 levels
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed is an int64

_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error the client caused or must handle (status 4xx/5xx, OpenAI error body)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def server_error() -> APIError:
    """Our bug, not the client's: the details go to the server log, not into the response."""
    return APIError(500, "The server had an error while processing your request. Sorry about that!", "server_error")


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server (known once the model and tokenizer are loaded)."""

    vocab_size: int
    max_model_len: int
    max_token_chars: int = 64
    """The longest token's text: a prompt of more characters than max_model_len x this cannot fit."""
    min_request_threshold: float = 0.0
    """The lowest decider threshold a request may ask for (lower = more tokens at depth 2)."""
    max_depth: int | None = None
    """The served model's maximum depth M: a request's max_depth may not exceed it."""

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * max(1, self.max_token_chars)


Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = Field(max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.6, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)  # accepted only at their neutral value
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    # extras (not in OpenAI's API)
    top_k: int = Field(default=20, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_depth: int | None = Field(default=None, ge=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check(self, limits: Limits) -> None:
        """The bounds that depend on the served model (APIError(400) naming the field)."""
        if self.top_k > limits.vocab_size:
            raise APIError(400, f"top_k must be at most the vocabulary size {limits.vocab_size} (0 = off)",
                           param="top_k")
        if any(not 0 <= t < limits.vocab_size for t in self.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be token ids in [0, {limits.vocab_size})",
                           param="stop_token_ids")
        if self.threshold is not None and self.threshold < limits.min_request_threshold:
            raise APIError(400, f"threshold must be at least {limits.min_request_threshold} on this server "
                                f"(a lower threshold runs more tokens at depth 2)", param="threshold")
        if self.max_depth is not None and limits.max_depth is not None and self.max_depth > limits.max_depth:
            raise APIError(400, f"max_depth must be between 1 and this model's maximum depth {limits.max_depth}, "
                                f"got {self.max_depth}", param="max_depth")

    def sampling(self, logprobs: int | None, index: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p,
                              seed=None if self.seed is None else self.seed + index,
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, threshold=self.threshold, max_depth=self.max_depth)


def _too_long(limits: Limits, what: str, n: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {limits.max_model_len} tokens. However, {what} "
                         f"({n} characters) cannot fit in it. Please reduce the length of the prompt.",
                    param="messages" if what.startswith("the messages") else "prompt", code="context_length_exceeded")


TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    """One prompt (text or token ids) or a batch of them (each its own choices, OpenAI's and vLLM's
    convention: choice index = prompt index x n + sample index)."""
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    """Prepend the prompt to each choice's text (and, with logprobs, its tokens' log-probabilities given
    the tokens before them: the first is null). With max_tokens 0: scoring only."""
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a single prompt is a batch of one)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        prompts = self.prompts()
        if len(prompts) * self.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts x n), got "
                                f"{len(prompts)} x {self.n}", param="prompt")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 is only meaningful with echo=true (scoring the prompt)",
                           param="max_tokens")
        if self.stream and (len(prompts) > 1 or self.echo):
            raise APIError(400, "stream=true serves one prompt without echo", param="stream")
        for p in prompts:
            if isinstance(p, str):
                if len(p) > limits.max_prompt_chars:  # checked before the tokenizer sees it
                    raise _too_long(limits, "the prompt", len(p))
            elif len(p) >= limits.max_model_len:
                raise APIError(400, f"This model's maximum context length is {limits.max_model_len} tokens. "
                                    f"However, the prompt has {len(p)} tokens.", param="prompt",
                               code="context_length_exceeded")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if len(self.messages) >= limits.max_model_len:  # each message is at least one token
            raise APIError(400, f"at most {limits.max_model_len - 1} messages fit this model's context",
                           param="messages")
        chars = sum(len(m.content) + len(m.name or "") for m in self.messages)
        if chars > limits.max_prompt_chars:
            raise _too_long(limits, "the messages", chars)


def load_json(raw: bytes) -> dict[str, Any]:
    """Body bytes -> a JSON object, or APIError(400): invalid UTF-8, invalid JSON, NaN / Infinity,
    nesting beyond MAX_JSON_DEPTH, lone surrogates (they would fail the tokenizer), a non-object."""
    try:
        text = raw.decode("utf-8")  # strict: UTF-8-encoded surrogates are errors too
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_tree(data)
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _check_tree(data: Any) -> None:
    """Walk the parsed body without recursion (its depth is what is being checked)."""
    stack = [(data, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, str):
            if _SURROGATE.search(x):
                raise APIError(400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                    "which is not text")
        elif isinstance(x, dict):
            stack.extend((k, depth) for k in x)
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)


def _is_field(loc: str) -> bool:
    """A field name, not a union member's tag ("str", "list[int]", "constrained-str") in an error's loc."""
    return re.fullmatch(r"\w+", loc) is not None and loc not in ("str", "int", "float", "bool", "list", "dict")


def parse(cls: type[_Strict], raw: bytes, limits: Limits | None = None) -> Any:
    """Body bytes -> validated request, or APIError(400) saying what is wrong."""
    data = load_json(raw)
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        # A union field (stop: str | list) reports one error per member: a bound that failed, or else
        # the deepest mismatch, says more than "not a string".
        err = max(e.errors(), key=lambda x: (not x["type"].endswith("_type"), len(x["loc"])))
        where = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or _is_field(x))
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param=where or None) from None
    if getattr(req, "stream", False) and req.n > 1:
        raise APIError(400, "stream=true supports n=1 only", param="n")
    if limits is not None:
        req.check(limits)
    return req


class Detokenizer:
    """Incremental text of a growing token list, in time linear in its length.

    As vLLM's `detokenize_incrementally`: each token decodes only a short window, the tokens since
    the text last grew plus the ones that made it grow (context, so that a tokenizer that treats the
    first token of a decode specially, e.g. SentencePiece's leading space, does so in both decodes);
    the new text is what the window adds to its context. While the window ends in U+FFFD (a UTF-8
    character split across tokens) nothing is emitted; after MAX_HELD such tokens (invalid bytes, not
    a split character) the text up to the last point where decoding splits cleanly is emitted."""

    MAX_HELD = 16

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window = ids[prefix:]; context = ids[prefix:read]
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def add(self, token_id: int, final: bool = False) -> str:
        """The new text this token completes ("" while a multi-byte character is still partial;
        `final` flushes whatever is left, replacement characters included)."""
        self.ids.append(token_id)
        ctx = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        end = len(self.ids)
        if full.endswith("\ufffd") and not final:
            if end - self.read <= self.MAX_HELD:
                return ""
            # Not a split character (those span at most 4 tokens): emit up to the last token boundary
            # where the window decodes as its two halves do, so the text stays that of one decode.
            for j in range(end - 1, self.read, -1):
                head = self._decode(self.ids[self.prefix:j])
                if head + self._decode(self.ids[j:]) == full:
                    full, end = head, j
                    break
        new = full[len(ctx):]
        self.prefix, self.read = self.read, end
        self.pieces.append(new)
        return new


class StopMatcher:
    """Stop strings found in streamed text without rescanning it: the last (longest stop - 1)
    characters are held back, as they may be the start of a stop string, so each piece is searched
    once together with that short tail and text past a stop string is never sent. The text ends
    before the stop string that completes first (as if fed one character at a time), however the
    text is split into pieces."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.held = ""

    def feed(self, new: str, final: bool = False) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the text)."""
        buf = self.held + new
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)[1]], True  # the earliest end; at a tie, the longer stop
        cut = len(buf) if final else max(0, len(buf) - self.keep)
        self.held = buf[cut:]
        return buf[:cut], False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, iterated: int, depth_counts: list[int] | None = None,
          prompt_depth_counts: list[int] | None = None) -> dict[str, Any]:
    """OpenAI's usage plus TaH's: iterated_tokens, and with a model's depths depth_counts and
    prompt_depth_counts (lists indexed by depth - 1, see the module docstring)."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens, "iterated_tokens": iterated}
    if depth_counts is not None:
        out["depth_counts"] = depth_counts
    if prompt_depth_counts is not None:
        out["prompt_depth_counts"] = prompt_depth_counts
    return out


def depth_list(counts: dict[int, int], max_depth: int) -> list[int]:
    """{depth: tokens} -> [tokens at depth 1, ..., at depth max_depth]."""
    bad = [d for d in counts if not 1 <= d <= max_depth]
    if bad:
        raise ValueError(f"depths {bad} outside 1..{max_depth}")
    return [int(counts.get(d, 0)) for d in range(1, max_depth + 1)]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text prompt or chat messages -> token ids (lm-eval's remote tokenizer)."""

    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def check(self, limits: Limits) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        chars = len(self.prompt) if self.prompt is not None else sum(len(m.content) for m in self.messages)
        if chars > limits.max_prompt_chars:
            raise _too_long(limits, "the prompt", chars)


class DetokenizeRequest(_Strict):
    """vLLM's /detokenize: token ids -> text."""

    model: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    tokens: list[int]

    def check(self, limits: Limits) -> None:
        if len(self.tokens) > limits.max_model_len:
            raise APIError(400, f"at most {limits.max_model_len} tokens", param="tokens")
        if any(not 0 <= t < limits.vocab_size for t in self.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {limits.vocab_size})", param="tokens")


def echo_logprobs(prompt_lps: list[tuple[float, list[tuple[int, float]]] | None] | None
                  ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """The engine's prompt logprobs -> (token_logprobs, top_logprobs) entries for the prompt's tokens
    (the first token has neither: null, as OpenAI and vLLM write it)."""
    lps: list[float | None] = []
    tops: list[list[tuple[int, float]] | None] = []
    for e in prompt_lps or []:
        lps.append(None if e is None else e[0])
        tops.append(None if e is None else e[1])
    return lps, tops


def completion_logprobs(tokenizer: Any, tokens: list[int], lps: list[float | None],
                        tops: list[list[tuple[int, float]] | None], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completion logprobs; text_offset counts from `offset` (a stream's text sent before)."""
    pieces = [tokenizer.decode([t]) for t in tokens]
    offsets, o = [], offset
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
