"""Ray Serve app: an autoscaling, OpenAI-compatible TaH endpoint over the continuous-batching engine.

    serve run serve.tah:app                                    # the tiny default checkpoint, CPU
    serve run serve.tah:app model=s3://bucket/runs/tah/stage2/model max_replicas=4 device=cuda
    serve run serve.tah:app config=serve/configs/tiny.yaml threshold=0.8
    curl 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
         -d '{"model": "tah", "prompt": "What is 2+3?", "max_tokens": 32}'

Each replica holds one `tah.engine.Engine`, stepped by a background thread; HTTP handlers queue
requests into it and await their tokens (streamed as server-sent events when `stream: true`).
A client that disconnects aborts its generation and frees its slot. Bad input is a 4xx in
OpenAI's error shape; overload beyond `max_queued_requests` is Serve's 503. The decider threshold
is the deployment's `user_config` (change it on a live deployment with a new config, no restart).

One request never takes others down: every field is bounded (serve/protocol.py), bodies are capped
(`max_request_bytes`, 413), prompts are measured before and tokenized off the event loop, and a
request that fails while being admitted, stepped or streamed ends alone (4xx for bad input, 500
for our bug) with its slot and queue freed, the engine thread going on. With `api_key` (or
$TAH_API_KEY) set, /v1/* wants `Authorization: Bearer <key>` (serve/security.py); /health and
/metrics stay open. A local start binds 127.0.0.1 only.
"""

import asyncio  # (no `from __future__ import annotations`: FastAPI reads the route annotations)
import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar

from serve.security import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before `serve run` starts Ray (it calls the app builder first)

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from serve.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, Detokenizer,  # noqa: E402
                            Limits, StopMatcher, TokenizeRequest, chat_logprobs, completion_logprobs, depth_list,
                            echo_logprobs, new_id, now, parse, server_error, usage)
from serve.security import (api_key_digest, bind_replica_grpc_to_loopback, check_api_key,  # noqa: E402
                            read_body)
from tah.engine import EngineConfig  # noqa: E402

log = logging.getLogger("ray.serve")
DEFAULT_MODEL = "runs/tiny/train/tah/stage2/model"


@dataclass
class ServeConfig:
    """What `serve run serve.tah:app key=value ...` accepts (or a YAML file given as config=...)."""

    ALIASES: ClassVar[dict[str, str]] = {k: f"engine.{k}" for k in (
        "max_num_seqs", "max_model_len", "max_prefill_tokens", "depth_policy", "threshold")}
    """The engine's flat names users type (`serve run serve.tah:app max_num_seqs=8`) still work."""

    model: str = DEFAULT_MODEL
    """A TaH checkpoint (jobs/train.py's `<stage>/model`): local directory or s3:// prefix."""
    tokenizer: str | None = None
    """Tokenizer directory; None = the checkpoint's own, else the shipped task's."""
    model_name: str = "tah"
    """The id clients send as `model`."""
    device: str = "cpu"
    dtype: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Each replica's engine (engine.threshold: the decider's, None = the checkpoint's; reconfigurable
    live through the deployment's user_config)."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16
    max_ongoing_requests: int = 64
    max_queued_requests: int = 128
    num_cpus: float = 1
    num_gpus: float = 0
    api_key: str | None = field(default=None, repr=False)
    """Clients must send `Authorization: Bearer <api_key>` to /v1/*; None: $TAH_API_KEY, else open.
    Replicas get only its SHA-256, so the key is in no deployment config or log."""
    min_request_threshold: float = 0.0
    """The lowest decider threshold a request may ask for (body field `threshold`): a lower one sends
    more tokens to depth 2, so this caps the depth one client can buy (the `threshold` above is not bound by it)."""
    max_request_bytes: int = 4 * 2**20
    """Request bodies larger than this are refused with a 413 (before being read)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_request_threshold <= 1:
            raise ValueError(f"min_request_threshold must be in [0, 1], got {self.min_request_threshold}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")


fastapi_app = FastAPI(title="TaH", docs_url=None, redoc_url=None)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@fastapi_app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error(e)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(APIError(e.status_code, str(e.detail), kind))


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return _error(APIError(400, str(e.errors()[:1])))


class _Metrics:
    """Prometheus metrics of one replica (GET /metrics)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("tah_time_to_first_token_seconds", "Time to first token", registry=r, buckets=buckets)
        self.itl = Histogram("tah_inter_token_latency_seconds", "Time between tokens", registry=r, buckets=buckets)
        self.e2e = Histogram("tah_e2e_request_latency_seconds", "Request latency", registry=r, buckets=buckets)
        self.prompt = Counter("tah_prompt_tokens", "Prompt tokens", registry=r)
        self.generated = Counter("tah_generation_tokens", "Generated tokens", registry=r)
        self.iterated = Counter("tah_iterated_tokens", "Generated tokens that ran depth >= 2", registry=r)
        self.by_depth = Counter("tah_generation_tokens_by_depth", "Generated tokens by the depth that produced them",
                                ["depth"], registry=r)
        self.prompt_by_depth = Counter("tah_prompt_tokens_by_depth", "Prompt tokens by the depth they ran",
                                       ["depth"], registry=r)
        self.running = Gauge("tah_num_requests_running", "Requests decoding", registry=r)
        self.waiting = Gauge("tah_num_requests_waiting", "Requests waiting for a slot", registry=r)
        self.share = Gauge("tah_iterated_token_share", "Share of generated tokens that iterated", registry=r)
        self.requests = Counter("tah_requests", "Finished requests", ["finish_reason"], registry=r)
        # The engine's KV pool and scheduler, under vLLM's names where it has one (gauges set from
        # Engine.stats() at scrape time; its counters are cumulative, exported as gauges of the total).
        self.kv_usage = Gauge("tah_kv_cache_usage_perc", "KV-cache usage: share of KV blocks held, a block split "
                              "into deep blocks counted in full (1 = full)", registry=r)
        self.kv_blocks = Gauge("tah_kv_cache_blocks", "KV blocks by state (split: held as deep blocks)", ["state"],
                               registry=r)
        self.kv_deep_blocks = Gauge("tah_kv_cache_deep_blocks", "Deeper depths' blocks (deep_block_size tokens, "
                                    "carved from split KV blocks) by state: used by requests, free in split blocks",
                                    ["state"], registry=r)
        self.prefix_queries = Gauge("tah_prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                    "(cumulative)", registry=r)
        self.prefix_hits = Gauge("tah_prefix_cache_hits", "Prompt tokens served from the prefix cache (cumulative)",
                                 registry=r)
        self.preemptions = Gauge("tah_num_preemptions", "Requests preempted for KV blocks (cumulative)", registry=r)
        self.deep_reserve = Gauge("tah_deep_reserve_share", "Admission reserve: expected share of tokens at depth 2",
                                  registry=r)
        self.tokens_ran = Gauge("tah_engine_tokens_by_depth", "Tokens the engine ran at each depth (prompt and "
                                "generated, cumulative)", ["depth"], registry=r)
        self.n_generated = self.n_iterated = 0

    def token(self, depth: int) -> None:
        self.generated.inc()
        self.by_depth.labels(str(depth)).inc()
        self.n_generated += 1
        if depth >= 2:
            self.iterated.inc()
            self.n_iterated += 1


def _longest_token(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (a byte-level token's text is never longer than
    its entry): no prompt of more than max_model_len x this many characters can fit the window."""
    try:
        return max(len(t) for t in tokenizer.get_vocab())
    except Exception:  # a tokenizer without a vocabulary listing: a generous bound
        return 64


# (Serve pickles the class when it is decorated: what its methods call must be defined above.)
@serve.deployment
@serve.ingress(fastapi_app)
class TaHServer:
    """One replica: the model, its engine, and the thread that steps it."""

    def __init__(self, cfg: dict[str, Any], api_key_sha256: str | None = None) -> None:
        import torch

        from tah import TaHForCausalLM
        from tah.config import from_dict
        from tah.engine import Engine
        from tah.tokenizer import checkpoint_tokenizer, end_token_ids, load_tokenizer

        self.cfg = c = from_dict(ServeConfig, cfg)
        self.api_key_sha256 = api_key_sha256
        bind_replica_grpc_to_loopback()
        dtype = None if c.dtype == "auto" else getattr(torch, c.dtype)
        self.model = TaHForCausalLM.from_pretrained(c.model, dtype=dtype, device=c.device)
        self.tokenizer = load_tokenizer(checkpoint_tokenizer(c.model, c.tokenizer))
        # the same end tokens as evaluation: the tokenizer's eos and the checkpoint's generation_config
        self.engine = Engine(self.model, c.engine, eos_token_ids=end_token_ids(self.tokenizer, c.model))
        self.max_depth = self.model.config.max_depth  # (read once: the engine owns the model from here on)
        self.limits = Limits(vocab_size=self.engine.vocab_size, max_model_len=c.engine.max_model_len,
                             max_token_chars=_longest_token(self.tokenizer),
                             min_request_threshold=c.min_request_threshold, max_depth=self.max_depth)
        # One thread: prompts are tokenized off the event loop, and a fast tokenizer is not used
        # from two threads at once.
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tah-tokenize")
        self.metrics = _Metrics()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.wake = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="tah-engine", daemon=True)
        self.thread.start()
        log.info("TaH replica ready: %s on %s, %d slots x %d tokens%s", c.model, c.device, c.engine.max_num_seqs,
                 c.engine.max_model_len, ", API key required" if api_key_sha256 else "")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        thr = user_config.get("threshold")
        if thr is not None:
            if not 0 <= float(thr) <= 1:
                raise ValueError(f"threshold must be in [0, 1], got {thr}")
            self.engine.threshold = float(thr)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread is gone is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        self.stopped = True

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while not self.stopped:
            try:
                if not self.engine.has_work():
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                events = self.engine.step()  # a failing request comes back as its own "error" event
            except Exception as e:  # a bug in the engine's own guards: fail what runs, keep serving
                log.exception("engine step failed")
                try:
                    events = self.engine.fail_running(e)
                except Exception:  # the engine is beyond repair: answer every request still waiting here
                    log.exception("could not fail the running requests")
                    events = []
                    for rid in list(self.queues):
                        self.engine.abort(rid)
                        self._deliver(rid, e)
            for ev in events:
                self._deliver(ev.request_id, ev)

    def _deliver(self, rid: str, item: Any) -> None:
        target = self.queues.get(rid)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # that request's event loop is closed: nobody is waiting
                pass

    async def _tokens(self, prompt: list[int], params, stops: list[str]) -> AsyncIterator[dict[str, Any]]:
        """Submit one request; yield {"text", "token", "logprob", "top", "depth", "prompt_depths",
        "finish_reason"} per token (prompt_depths: {depth: prompt tokens} on the first token, else None).

        Stop strings are matched on the detokenized text; leaving the loop early (client gone, a stop
        string, an error) aborts the request in the engine and frees its slot."""
        from tah.engine import RequestError

        rid = new_id("req")
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = (asyncio.get_running_loop(), q)
        try:
            self.engine.add_request(prompt, params, rid)
        except RequestError as e:
            self.queues.pop(rid, None)
            raise APIError(400, str(e)) from None
        except Exception:
            self.queues.pop(rid, None)
            log.exception("add_request failed")
            raise server_error() from None
        self.wake.set()
        t0, last, engine_done, answered = time.perf_counter(), None, False, False
        detok, stopper = Detokenizer(self.tokenizer), StopMatcher(stops)
        self.metrics.prompt.inc(len(prompt))
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, Exception):  # from the loop's last-resort handler
                    engine_done = answered = True
                    raise server_error()
                if ev.finish_reason == "error":
                    engine_done = answered = True
                    self.metrics.requests.labels("error").inc()
                    if isinstance(ev.error, RequestError):
                        raise APIError(400, str(ev.error))
                    raise server_error()
                if ev.token_id < 0:  # aborted
                    engine_done = answered = True
                    return
                engine_done = ev.finished
                t = time.perf_counter()
                (self.metrics.ttft if last is None else self.metrics.itl).observe(t - (t0 if last is None else last))
                last = t
                self.metrics.token(ev.depth)
                for d, k in (ev.prompt_depth_counts or {}).items():
                    self.metrics.prompt_by_depth.labels(str(d)).inc(k)
                text, hit = stopper.feed(detok.add(ev.token_id, final=ev.finished), final=ev.finished)
                reason = "stop" if hit else ev.finish_reason
                chunk = {"text": text, "token": ev.token_id, "logprob": ev.logprob, "top": ev.top_logprobs,
                         "depth": ev.depth, "prompt_depths": ev.prompt_depth_counts,
                         "prompt_logprobs": ev.prompt_logprobs, "finish_reason": reason}
                if reason is not None:
                    answered = True
                    self.metrics.e2e.observe(t - t0)
                    self.metrics.requests.labels(reason).inc()
                    yield chunk
                    return
                yield chunk
        finally:
            if not engine_done:  # a stop string, the client gone, or the handler failed: free the slot
                self.engine.abort(rid)
                self.wake.set()
            if not answered:
                self.metrics.requests.labels("abort").inc()
            self.queues.pop(rid, None)

    # ------------------------------------------------------------------ routes
    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model", "model_not_found")

    def _chat_ids(self, messages: list, add_generation_prompt: bool = True) -> list[int]:
        msgs = [m.model_dump(exclude_none=True) for m in messages]
        out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def _prompt_ids(self, req: CompletionRequest | ChatRequest | TokenizeRequest) -> list[list[int]]:
        """Each prompt's token ids (a chat or a /tokenize request has one)."""
        if isinstance(req, ChatRequest):
            return [self._chat_ids(req.messages)]
        if isinstance(req, TokenizeRequest):
            if req.messages is not None:
                return [self._chat_ids(req.messages, req.add_generation_prompt)]
            return [self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]]
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
                for p in req.prompts()]

    async def _tokenize(self, req: CompletionRequest | ChatRequest | TokenizeRequest) -> list[list[int]]:
        """Prompt token ids, computed in the tokenizer thread (its length was bounded by `parse`)."""
        from jinja2 import TemplateError

        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, self._prompt_ids, req)
        except TemplateError as e:  # the chat template refused these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    async def _guarded(self, request: Request, what: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """Every route's envelope but /health: the API key first (strangers get nothing parsed), then
        the route's work; a bad request gets its 4xx and our bug a logged 500, both in OpenAI's error
        shape and both this request's alone."""
        try:
            check_api_key(request.headers.get("authorization"), self.api_key_sha256)
            return await work()
        except APIError as e:
            return _error(e)
        except Exception:
            log.exception("%s failed", what)
            return _error(server_error())

    async def _parse(self, request: Request, cls: type, model_required: bool = False):
        """The body, capped, parsed into `cls` with every field bounded; its model name checked (the
        tokenizer routes may leave it out, as vLLM's do)."""
        req = parse(cls, await read_body(request, self.cfg.max_request_bytes), self.limits)
        if model_required or req.model is not None:
            self._check_model(req.model)
        return req

    @fastapi_app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        async def work():
            # No `root`: the checkpoint's path or bucket is the operator's business, not the client's.
            return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": now(),
                                                "owned_by": "tah", "max_model_len": self.cfg.engine.max_model_len}]}
        return await self._guarded(request, "models", work)

    @fastapi_app.get("/metrics")
    async def prom(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        m = self.metrics
        m.running.set(self.engine.num_running)
        m.waiting.set(self.engine.num_waiting)
        m.share.set(m.n_iterated / m.n_generated if m.n_generated else 0.0)
        st = self.engine.stats()
        m.kv_usage.set(st["kv_cache_usage_perc"])
        m.kv_blocks.labels(state="used").set(st["kv_blocks_used"])
        m.kv_blocks.labels(state="total").set(st["kv_blocks_total"])
        m.kv_blocks.labels(state="split").set(st["kv_blocks_split"])
        m.kv_deep_blocks.labels(state="used").set(st["kv_deep_blocks_used"])
        m.kv_deep_blocks.labels(state="free").set(st["kv_deep_blocks_free"])
        m.prefix_queries.set(st["prefix_cache_queries"])
        m.prefix_hits.set(st["prefix_cache_hits"])
        m.preemptions.set(st["num_preemptions"])
        m.deep_reserve.set(st["deep_reserve_share"])
        for k, v in st.items():
            if k.startswith("tokens_at_depth_"):
                m.tokens_ran.labels(depth=k.rsplit("_", 1)[1]).set(v)
        return PlainTextResponse(generate_latest(m.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @fastapi_app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's tokenizer endpoints (lm-eval's `tokenizer_backend=remote` uses them)."""
        async def work():
            ids = (await self._tokenize(await self._parse(request, TokenizeRequest)))[0]
            return {"count": len(ids), "max_model_len": self.cfg.engine.max_model_len, "tokens": ids}
        return await self._guarded(request, "tokenize", work)

    @fastapi_app.post("/detokenize")
    async def detokenize(self, request: Request):
        async def work():
            req = await self._parse(request, DetokenizeRequest)
            loop = asyncio.get_running_loop()
            return {"prompt": await loop.run_in_executor(self.tokenize_pool, self.tokenizer.decode, req.tokens)}
        return await self._guarded(request, "detokenize", work)

    @fastapi_app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        async def work():
            t = self.tokenizer
            return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                    "pad_token": t.pad_token, "chat_template": t.chat_template,
                    "model_max_length": self.cfg.engine.max_model_len}
        return await self._guarded(request, "tokenizer_info", work)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._guarded(request, "completion", lambda: self._handle(request, CompletionRequest))

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._guarded(request, "chat completion", lambda: self._handle(request, ChatRequest))

    async def _handle(self, request: Request, cls: type):
        """Parse, tokenize, generate (inside `_guarded`)."""
        req = await self._parse(request, cls, model_required=True)
        chat = cls is ChatRequest
        if chat and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        return await self._serve(req, await self._tokenize(req), chat=chat)

    async def _serve(self, req, prompts: list[list[int]], chat: bool):
        stops = req.stops()
        lp = (req.top_logprobs or 0) if chat and req.logprobs else (None if chat else req.logprobs)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion" if chat else "text_completion"
        if req.stream:  # (one prompt, no echo: checked by the protocol)
            gen = self._tokens(prompts[0], req.sampling(lp, 0), stops)
            first = await gen.__anext__()  # errors (context length, ...) become a 4xx before streaming starts
            return StreamingResponse(self._sse(gen, first, req, rid, created, len(prompts[0]), chat),
                                     media_type="text/event-stream")
        echo = not chat and req.echo
        scoring = echo and req.max_tokens == 0  # the engine samples one token, which is then dropped

        def params(i: int):
            sp = req.sampling(lp, i) if not scoring else dataclasses.replace(req.sampling(lp, i), max_tokens=1)
            # seed + i per prompt: a batch of prompts answers as the same prompts sent one by one would
            # the prompt is scored once, by its first choice; its other choices echo that scoring
            return dataclasses.replace(sp, prompt_logprobs=lp if echo and i == 0 else None)

        try:
            # A TaskGroup, not gather: when one choice fails the others are cancelled (their slots freed).
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._collect(p, params(i), stops)) for p in prompts for i in range(req.n)]
        except ExceptionGroup as eg:  # one choice's error is the response's
            raise next((e for e in eg.exceptions if isinstance(e, APIError)), eg.exceptions[0]) from None
        results = [t.result() for t in tasks]
        choices, n_gen, n_it, depths, prompt_depths = [], 0, 0, {}, {}
        for i, (text, toks, lps, tops, reason, it, tok_depths, p_depths, p_lps) in enumerate(results):
            if scoring:
                text, toks, lps, tops, reason, it, tok_depths = "", [], [], [], "length", 0, []
            n_gen, n_it = n_gen + len(toks), n_it + it
            for d in tok_depths:
                depths[d] = depths.get(d, 0) + 1
            if i % req.n == 0:  # each prompt is counted once (OpenAI's prompt_tokens), as its first choice ran it
                for d, k in p_depths.items():
                    prompt_depths[d] = prompt_depths.get(d, 0) + k
            if echo:
                prompt = prompts[i // req.n]
                source = req.prompts()[i // req.n]
                text = (source if isinstance(source, str) else self.tokenizer.decode(prompt)) + text
                e_lps, e_tops = echo_logprobs(results[i - i % req.n][8])  # its prompt's first choice's
                toks, lps, tops = prompt + toks, e_lps + lps, e_tops + tops
            logprobs = None
            if lp is not None:
                logprobs = (chat_logprobs if chat else completion_logprobs)(self.tokenizer, toks, lps, tops)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return {"id": rid, "object": obj, "created": created, "model": self.cfg.model_name, "choices": choices,
                "usage": usage(sum(len(p) for p in prompts), n_gen, n_it, depth_list(depths, self.max_depth),
                               depth_list(prompt_depths, self.max_depth))}

    async def _collect(self, prompt: list[int], params, stops: list[str]):
        pieces, toks, lps, tops, reason, it, depths, prompt_depths, prompt_lps = [], [], [], [], None, 0, [], {}, None
        async for c in self._tokens(prompt, params, stops):
            pieces.append(c["text"])
            toks.append(c["token"])
            lps.append(c["logprob"])
            tops.append(c["top"])
            it += c["depth"] >= 2
            depths.append(c["depth"])
            prompt_depths = c["prompt_depths"] or prompt_depths
            prompt_lps = c["prompt_logprobs"] or prompt_lps
            reason = c["finish_reason"]
        return "".join(pieces), toks, lps, tops, reason, it, depths, prompt_depths, prompt_lps

    async def _sse(self, gen, first, req, rid: str, created: int, n_prompt: int, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        n, it, depths, prompt_depths = 0, 0, {}, {}
        sent = 0  # characters of text streamed so far (completions' text_offset counts from it)

        def chunk(c: dict[str, Any] | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": c["text"]}
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": None if role else c["finish_reason"]}
                if c is not None and c["logprob"] is not None:
                    choice["logprobs"] = chat_logprobs(self.tokenizer, [c["token"]], [c["logprob"]], [c["top"]])
            else:
                choice = {"index": 0, "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                if c["logprob"] is not None:
                    choice["logprobs"] = completion_logprobs(self.tokenizer, [c["token"]], [c["logprob"]], [c["top"]],
                                                             offset=sent)
            body = {"id": rid, "object": obj, "created": created, "model": self.cfg.model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None, role=True)
            c = first
            while c is not None:
                n, it = n + 1, it + (c["depth"] >= 2)
                depths[c["depth"]] = depths.get(c["depth"], 0) + 1
                prompt_depths = c["prompt_depths"] or prompt_depths
                yield chunk(c)
                sent += len(c["text"])
                c = await gen.__anext__() if c["finish_reason"] is None else None
            if req.stream_options is not None and req.stream_options.include_usage:
                body = {"id": rid, "object": obj, "created": created, "model": self.cfg.model_name, "choices": [],
                        "usage": usage(n_prompt, n, it, depth_list(depths, self.max_depth),
                                       depth_list(prompt_depths, self.max_depth))}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        except StopAsyncIteration:
            yield "data: [DONE]\n\n"
        except APIError as e:  # the stream has started (status 200): the error is its last event
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception:
            log.exception("stream failed")
            yield f"data: {json.dumps(server_error().body())}\n\n"
        finally:
            await gen.aclose()  # client gone mid-stream: aborts the generation, frees the slot


def deployment(cfg: ServeConfig):
    """The bound deployment for a config (autoscaling, resources, queue limits, user_config)."""
    from tah.config import to_dict

    if not (str(cfg.model).startswith("s3://") or Path(cfg.model, "tah_config.json").exists()
            or Path(cfg.model, "config.json").exists()):  # a plain HF model serves as Standard (depth 1)
        raise SystemExit(f"no TaH checkpoint or HF model at {cfg.model!r}: run `make run` (it trains the tiny default) "
                         f"or pass model=<dir or s3:// prefix>")
    args = {k: v for k, v in to_dict(cfg).items() if k != "api_key"}  # replicas get its digest only
    return TaHServer.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        user_config={"threshold": cfg.engine.threshold},
    ).bind(args, api_key_digest(cfg.api_key))


def app(args: dict[str, str]):
    """Application builder for `serve run serve.tah:app [config=FILE] [key=value ...]`."""
    from tah.config import load_config

    args = dict(args)
    path = args.pop("config", None)
    return deployment(load_config(ServeConfig, path, [f"{k}={v}" for k, v in args.items()]))
