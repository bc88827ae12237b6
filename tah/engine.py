"""The serving engine: continuous batching with per-row dynamic depth over one preallocated TaHCache.

Token ids in, token ids out (detokenizing and stop strings belong to the caller, e.g. serve/tah.py).
Requests wait in a queue until a slot is free (never more than `max_num_seqs` run; the KV memory is
reserved once for max_num_seqs x max_model_len x max_depth and never grows). Each `step()`:

1. admits waiting requests into free slots (within a prefill token budget);
2. decodes every running request in ONE pass of the weights, each row at its own depth
   (`TaHForCausalLM.decode_step`): rows feed their last token at depth 1, rows the decider sent deeper
   at the previous step run that depth now (soft input, LoRA on for those rows only, duo-causal keys
   of their own depths). A row's token is final when the decider (threshold per request, changeable
   at run time) stops it; only rows that iterate write depth-2 K/V. Iterating therefore costs a row
   one step, not the whole batch a second pass;
3. prefills the admitted requests (their prompts also go through the decider, as in the reference
   `generate()`), which yields their first token;
4. samples every row with its own parameters and generator, and frees finished rows at once: the last
   live row moves into the freed slot, so live rows stay leading and the cache's views stay views.

One request's failure never reaches another: parameters are validated in `add_request` (a bad one
raises RequestError, a ValueError, to its caller and nothing is queued); if something still raises
inside `step()`, the requests it concerns end with finish_reason "error" (the event carries the
exception), their slots are freed, and the others go on. A failed per-row step (sampling, logprobs)
fails that row alone; a failed batched pass fails the rows of that pass (the pass may have half-written
their K/V), never the waiting requests.

TaH2 (`TaHConfig.tah2`) decodes the same way through `TaHForCausalLM.decode_step_mix`: a row at depth
d >= 2 feeds updater(token embedding, h^(d-1)); the decider runs after every depth below the row's cap;
the row's output is the mixture over the depths it ran, carried between steps by `tah.mixture.MixtureState`
(per slot: log-mix accumulator, R, h). A row that continues discards nothing but the step: it is
sampled once, from its mixture, when it stops. Prompt tokens iterate at prefill (the parallel forward
with the cache): the last prompt token's output is its mixture.

Requests may lower their maximum depth (`SamplingParams.max_depth`, 1..M; 1 = the backbone) and set
the decider threshold. The same engine runs Standard (depth_policy="standard": every token depth 1)
and AlwaysThink ("always_think": every token at its maximum depth), so comparisons share one code path.

    python -m tah.engine            # tiny random v1 and TaH2 models, 4 staggered requests each, printed stats
    eng = Engine(TaHForCausalLM.from_pretrained(path), EngineConfig(max_num_seqs=8), eos_token_ids=[2])
    outs = eng.generate([[1, 5, 9], [1, 7]], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
import logging
import operator
import random
import threading
import time
import typing
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch

from .config import check_choices
from .mixture import MixtureState
from .model import TaHForCausalLM
from .sampling import RequestError, SamplingParams, sample

DepthPolicy = Literal["decider", "standard", "always_think"]
DEPTH_POLICIES = typing.get_args(DepthPolicy)
log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """The serving engine's knobs (serve/tah.py's and jobs/eval.py's configs nest it as `engine:`)."""

    max_num_seqs: int = 32
    """Requests decoded together at most (slots of the KV reservation)."""
    max_model_len: int = 2048
    """Prompt + generated tokens per request at most."""
    max_prefill_tokens: int = 4096
    """Prompt tokens admitted per step at most (one longer prompt is still admitted alone)."""
    depth_policy: DepthPolicy = "decider"
    """decider (TaH) | standard (all depth 1) | always_think (all at max depth)."""
    threshold: float | None = None
    """Decider threshold; None = the checkpoint's."""
    chunk: int = 128
    """Attention window granularity (slots)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_num_seqs < 1 or self.max_model_len < 2 or self.max_prefill_tokens < 1:
            raise ValueError(f"bad engine sizes: {self}")


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    depth_counts: dict[int, int] = field(default_factory=dict)
    """Generated tokens by the depth that produced them (the first: the prompt's last token's)."""
    prompt_depth_counts: dict[int, int] = field(default_factory=dict)
    arrival: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def iterated_tokens(self) -> int:
        return sum(n for d, n in self.depth_counts.items() if d >= 2)


PromptLogprob = tuple[float, list[tuple[int, float]]] | None
"""A prompt token's (log-probability given the tokens before it, [(token id, log-probability)] of the
most likely tokens at that position); None for the first prompt token."""


@dataclass
class TokenEvent:
    """One generated token of one request (what `step()` returns, in slot order)."""

    request_id: str
    token_id: int
    depth: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    """stop (EOS / stop token) | length (max_tokens or context) | abort | error."""
    error: BaseException | None = None
    """With finish_reason "error": what failed (a RequestError: the request's fault; else ours)."""
    prompt_depth_counts: dict[int, int] | None = None
    """On a request's first token only: its prompt tokens by the depth they ran at prefill."""
    prompt_logprobs: list[PromptLogprob] | None = None
    """On a request's first token only, if asked (SamplingParams.prompt_logprobs): one entry per prompt
    token, None for the first."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    stats: RequestStats
    logprobs: list[float] | None = None
    depths: list[int] = field(default_factory=list)
    error: BaseException | None = None
    """With finish_reason "error": what failed."""
    prompt_logprobs: list[PromptLogprob] | None = None


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    generator: torch.Generator
    stats: RequestStats
    output: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    pending: tuple | None = None
    """v1 mid-iteration: (next depth, top-k values, top-k ids, cumulative logits) of the current token."""
    next_depth: int = 1
    """TaH2: the depth the current token runs next step (> 1: mid-iteration, state in Engine.mix)."""
    stop_ids: frozenset[int] = frozenset()
    error: BaseException | None = None
    prompt_logprobs: list[PromptLogprob] | None = None


class Engine:
    """Continuous-batching TaH decoder (single-threaded `step()`; add/abort are thread-safe)."""

    def __init__(self, model: TaHForCausalLM, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None) -> None:
        c = model.config
        kind = (c.input_rule, c.combine, c.decider_kind)
        self.mixture = c.combine != "logit_residual"  # TaH2: each token's output mixes its depths' probabilities
        if c.max_depth >= 2 and kind not in (("soft_topk", "logit_residual", "v1"), ("updater", "stop_prob_mix", "tah2"),
                                             ("updater", "even_mix", "tah2")):
            raise NotImplementedError(f"the engine serves v1 (soft_topk, logit_residual, v1 decider) and TaH2 (updater, "
                                      f"stop_prob_mix | even_mix, tah2 decider), not input_rule, combine, "
                                      f"decider_kind = {kind}")
        self.model = model.eval()
        self.max_depth = c.max_depth
        self.config = config or EngineConfig()
        self.eos = set(eos_token_ids or [])
        self.threshold = self.config.threshold if self.config.threshold is not None else model.config.threshold
        w = model.backbone.get_input_embeddings().weight
        self.device, self.vocab_size = w.device, w.shape[0]
        self.cache = model.new_cache(self.config.max_num_seqs, capacity=self.config.max_model_len,
                                     chunk=self.config.chunk)
        self.cache.active = 0
        self.mix: MixtureState | None = None
        if self.mixture:
            wide = w.dtype if w.dtype == torch.float64 else torch.float32  # the forward's mixture precision
            self.mix = MixtureState(self.config.max_num_seqs, self.vocab_size, model.backbone.config.hidden_size,
                                    c.combine, wide, w.dtype, self.device)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._aborts: set[str] = set()
        self._live: set[str] = set()  # ids waiting or running (a duplicate id would cross two streams)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; raises RequestError (a ValueError, with a client-facing message) if it
        cannot run. Everything about the request is checked here, synchronously, so that a bad one
        is refused to its caller instead of failing a later batched step."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.check(self.vocab_size)
        if params.max_depth is not None and params.max_depth > self.max_depth:
            raise RequestError(f"max_depth must be at most this model's maximum depth {self.max_depth}, "
                               f"got {params.max_depth}")
        try:
            prompt = [operator.index(t) for t in prompt_token_ids]
        except TypeError:
            raise RequestError("the prompt must be a list of integer token ids") from None
        n, cap = len(prompt), self.config.max_model_len
        if n == 0:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if params.max_tokens is not None and n + params.max_tokens > cap or n >= cap:
            want = n + (params.max_tokens or 1)
            raise RequestError(f"This model's maximum context length is {cap} tokens. However, you requested "
                               f"{want} tokens ({n} in the prompt, {want - n} in the completion). Please reduce "
                               f"the length of the prompt or completion.")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = _Request(rid, prompt, params, params.max_tokens or cap - n,
                       torch.Generator(device=self.device).manual_seed(seed),
                       RequestStats(prompt_tokens=n, arrival=time.perf_counter()),
                       stop_ids=frozenset(int(t) for t in params.stop_token_ids))
        with self._lock:
            if rid in self._live:
                raise RequestError(f"request id {rid!r} is already in use")
            self._live.add(rid)
            self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running); its slot is free after the current step."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ one step
    def _cap(self, r: _Request) -> int:
        """The deepest depth this request's tokens may run: 1 under standard, else its max_depth or M."""
        if self.config.depth_policy == "standard":
            return 1
        return r.params.max_depth or self.max_depth

    def _thresholds(self, reqs: list[_Request]) -> float | torch.Tensor:
        vals = [r.params.threshold if r.params.threshold is not None else self.threshold for r in reqs]
        if all(v == vals[0] for v in vals):
            return vals[0]
        return torch.tensor(vals, dtype=torch.float32, device=self.device)

    def _process_aborts(self, events: list[TokenEvent]) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return
            kept = deque()
            for r in self.waiting:
                if r.rid in aborts:
                    events.append(TokenEvent(r.rid, -1, 0, finished=True, finish_reason="abort"))
                    self._live.discard(r.rid)
                else:
                    kept.append(r)
            self.waiting = kept
        for r in self.running:
            if r.rid in aborts and r.finish_reason is None:
                r.finish_reason = "abort"
                events.append(TokenEvent(r.rid, -1, 0, finished=True, finish_reason="abort"))

    def _admit(self) -> list[_Request]:
        new, budget = [], self.config.max_prefill_tokens
        with self._lock:
            while self.waiting and len(self.running) + len(new) < self.config.max_num_seqs:
                n = len(self.waiting[0].prompt)
                if new and n > budget:
                    break
                budget -= n
                new.append(self.waiting.popleft())
        return new

    def _fail(self, reqs: list[_Request], error: BaseException, events: list[TokenEvent]) -> None:
        """End these requests with finish_reason "error" (their slots are freed by the next _free)."""
        now = time.perf_counter()
        for r in reqs:
            if r.finish_reason is None:
                r.finish_reason, r.error, r.stats.finish_time = "error", error, now
                events.append(TokenEvent(r.rid, -1, 0, finished=True, finish_reason="error", error=error))
            with self._lock:
                self._live.discard(r.rid)

    def _reset(self) -> None:
        """Forget every running row (after a failure the engine cannot attribute); waiting ones stay."""
        with self._lock:
            for r in self.running:
                self._live.discard(r.rid)
        self.running = []
        self.cache.reset_rows(list(range(self.config.max_num_seqs)))
        self.cache.active = 0
        self.cache.trim()

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit, decode, prefill, sample, free; returns this step's tokens and finishes (failed
        requests included: finish_reason "error"). Never raises for a request's sake."""
        events: list[TokenEvent] = []
        new: list[_Request] = []
        try:
            self._process_aborts(events)
            self._free()
            new = self._admit()
            self._step(new, events)
        except Exception as e:  # outside the per-request guards: end what is in flight, keep the engine usable
            log.exception("engine step failed: failing the %d requests in flight", len(self.running))
            running = {id(r) for r in self.running}
            self._fail([r for r in new if id(r) not in running], e, events)
            events += self.fail_running(e)
        return events

    def fail_running(self, error: BaseException) -> list[TokenEvent]:
        """End every running request with finish_reason "error" and forget its slot (after a failure
        that cannot be pinned on one request); waiting requests stay queued and run next."""
        events: list[TokenEvent] = []
        self._fail(list(self.running), error, events)
        self._reset()
        return events

    def _step(self, new: list[_Request], events: list[TokenEvent]) -> None:
        parts: list[tuple[torch.Tensor, torch.Tensor, list[_Request]]] = []  # (logits, depth, requests)
        old = list(self.running)
        if old:  # decode: one pass, each running row at its own depth
            try:
                parts.append(self._decode_mix(old) if self.mixture else self._decode(old))
            except Exception as e:
                # The pass may have written part of every row's K/V: none of these rows can go on.
                log.exception("decode pass failed: failing its %d requests", len(old))
                self._fail(old, e, events)
                self._free()
        for r in [r for r in new if r.params.prompt_logprobs is not None]:
            try:
                r.prompt_logprobs = self._score_prompt(r)
            except Exception as e:  # this request's scoring alone: the others prefill as usual
                log.exception("request %s failed while scoring its prompt", r.rid)
                self._fail([r], e, events)
                new.remove(r)
        if new:  # prefill the admitted requests into the slots after the running ones
            try:
                parts.append(self._prefill(new))
            except Exception as e:
                # Running rows are not written by a prefill (their queries are masked out): only the
                # new requests fail; the decoded rows keep their tokens of this step.
                log.exception("prefill failed: failing its %d requests", len(new))
                self._fail(new, e, events)
        reqs = [r for _, _, rs in parts for r in rs]
        if reqs:  # (one part: its logits as they are, not a (n, V) copy by cat)
            logits = parts[0][0] if len(parts) == 1 else torch.cat([lg for lg, _, _ in parts])
            self._finish_tokens(logits, torch.cat([d for _, d, _ in parts]).tolist(), reqs, events)
        self._free()
        self.steps += 1

    @torch.no_grad()
    def _score_prompt(self, r: _Request) -> list[PromptLogprob]:
        """Each prompt token's log-probability given the tokens before it, with the top-k at its
        position: the parallel forward of the prompt alone, under the model, depth rule, cap and
        threshold its prefill uses (tests check it against the prefill's own last-token logits)."""
        ids = torch.tensor([r.prompt], dtype=torch.long, device=self.device)  # (1, T)
        forced = torch.full_like(ids, self._cap(r)) if self.config.depth_policy != "decider" else None
        thr = r.params.threshold if r.params.threshold is not None else self.threshold
        with self.model.depth_capped(self._cap(r) if forced is None else None):
            logits = self.model(ids, depths=forced, threshold=thr, return_decider_logits=False).logits[0]  # (T, V)
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T - 1, V): position i predicts token i + 1
        target = ids[0, 1:]
        chosen = logp.gather(1, target[:, None])[:, 0].tolist()
        k = r.params.prompt_logprobs
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k:
            top = logp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        return [None] + [(lp, t) for lp, t in zip(chosen, tops)]

    def _prefill(self, new: list[_Request]) -> tuple[torch.Tensor, torch.Tensor, list[_Request]]:
        cache, n_old = self.cache, len(self.running)
        slots = list(range(n_old, n_old + len(new)))
        cache.reset_rows(slots)
        self.running += new
        n_all, T = len(self.running), max(len(r.prompt) for r in new)
        cache.active = n_all
        ids = torch.zeros(n_all, T, dtype=torch.long, device=self.device)
        valid = torch.zeros(n_all, T, dtype=torch.bool, device=self.device)
        for s, r in zip(slots, new):
            ids[s, :len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long)
            valid[s, :len(r.prompt)] = True
        last = torch.zeros(n_all, dtype=torch.long, device=self.device)
        last[n_old:] = torch.tensor([len(r.prompt) - 1 for r in new], device=self.device)
        caps = [self._cap(r) for r in new]
        forced = None
        if self.config.depth_policy != "decider":  # every prompt token runs its request's cap
            forced = torch.ones(n_all, T, dtype=torch.long, device=self.device)
            forced[n_old:] = torch.tensor(caps, device=self.device)[:, None]
        # The decider's prompt tokens run one forward per distinct cap (a request that lowered its
        # max_depth is prefilled by the model capped there); usually one, with every row.
        groups = {None: list(range(len(new)))} if forced is not None else {}
        if forced is None:
            for j, cap in enumerate(caps):
                groups.setdefault(cap, []).append(j)
        thr = self._thresholds(self.running)
        logits, depth = None, torch.zeros(len(new), dtype=torch.long, device=self.device)
        for cap, js in groups.items():
            sl = torch.tensor([slots[j] for j in js], device=self.device)
            mask = valid
            if len(groups) > 1:
                mask = torch.zeros_like(valid)
                mask[sl] = valid[sl]
            with self.model.depth_capped(cap):
                out = self.model(ids, attention_mask=mask, depths=forced, past_key_values=cache, threshold=thr,
                                 return_decider_logits=False, logits_at=last)
            for j in js:
                d = out.depths[slots[j], :len(new[j].prompt)]
                new[j].stats.prompt_depth_counts = {int(k): int((d == k).sum()) for k in d.unique().tolist()}
            if len(groups) == 1:
                return out.logits[sl], out.depths[sl, last[sl]], new
            if logits is None:
                logits = out.logits.new_zeros(len(new), out.logits.shape[-1])
            jt = torch.tensor(js, device=self.device)
            logits[jt] = out.logits[sl]
            depth[jt] = out.depths[sl, last[sl]]
        return logits, depth, new

    def _finish_tokens(self, logits: torch.Tensor, depth: list[int], reqs: list[_Request],
                       events: list[TokenEvent]) -> None:
        """Sample each row's token, record it, decide whether the row is done; a row whose handling
        raises fails alone."""
        tokens = self._sample(logits, reqs)  # (n, V) -> n ids, or the exception of a row that failed
        now = time.perf_counter()
        for i, (r, tok, d) in enumerate(zip(reqs, tokens, depth)):
            if r.finish_reason is not None:  # failed or aborted meanwhile
                continue
            try:
                if isinstance(tok, BaseException):
                    raise tok
                ev = TokenEvent(r.rid, tok, d)
                k = r.params.logprobs
                if k is not None:
                    logp = torch.log_softmax(logits[i].float(), dim=-1)  # (V,)
                    ev.logprob = float(logp[tok])
                    if k:
                        top = logp.topk(k)
                        ev.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            except Exception as e:
                log.exception("request %s failed while sampling", r.rid)
                self._fail([r], e, events)
                continue
            if not r.output:
                ev.prompt_depth_counts = dict(r.stats.prompt_depth_counts)
                ev.prompt_logprobs = r.prompt_logprobs
            r.output.append(tok)
            r.depths.append(d)
            st = r.stats
            st.generated_tokens += 1
            st.depth_counts[d] = st.depth_counts.get(d, 0) + 1
            if st.first_token_time is None:
                st.first_token_time = now
            if (tok in self.eos and not r.params.ignore_eos) or tok in r.stop_ids:
                r.finish_reason = "stop"
            elif st.generated_tokens >= r.max_tokens or len(r.prompt) + st.generated_tokens >= self.config.max_model_len:
                r.finish_reason = "length"
            if r.finish_reason is not None:
                ev.finished, ev.finish_reason = True, r.finish_reason
                st.finish_time = now
            events.append(ev)

    def _decode(self, rows: list[_Request]) -> tuple[torch.Tensor, torch.Tensor, list[_Request]]:
        """One decode pass over the running rows; returns (logits, depth, request) of the rows whose
        token is final this step. Rows the decider sends deeper keep their state and run the next
        depth in the next step's pass (together with everybody else's next token)."""
        dev, model, D = self.device, self.model, self.model.config.max_depth
        self.cache.active = len(rows)
        depth = torch.tensor([r.pending[0] if r.pending else 1 for r in rows], dtype=torch.long, device=dev)
        ids = torch.tensor([r.output[-1] for r in rows], dtype=torch.long, device=dev)
        deep = [r for r in rows if r.pending]
        soft = prev = None
        if deep:
            soft = (torch.stack([r.pending[1] for r in deep]), torch.stack([r.pending[2] for r in deep]))
            prev = torch.stack([r.pending[3] for r in deep])
        cum, hidden = model.decode_step(ids, depth, self.cache, soft, prev)
        policy = self.config.depth_policy
        target = {"standard": 1, "always_think": D}.get(policy)
        cont = depth < torch.tensor([self._cap(r) for r in rows], dtype=torch.long, device=dev)
        top = None
        if bool(cont.any()):
            top = cum.topk(model.topk, dim=-1)
            if target is None:  # the decider, with each request's threshold
                cont &= torch.sigmoid(model.decider(hidden, top.values).float()) > self._thresholds(rows)
        done = []
        for i, (r, c) in enumerate(zip(rows, cont.tolist())):
            if c:
                r.pending = (int(depth[i]) + 1, top.values[i], top.indices[i], cum[i])
            else:
                r.pending = None
                done.append(i)
        idx = torch.tensor(done, dtype=torch.long, device=dev)
        return cum[idx], depth[idx], [rows[i] for i in done]

    def _decode_mix(self, rows: list[_Request]) -> tuple[torch.Tensor, torch.Tensor, list[_Request]]:
        """TaH2's decode pass (`TaHForCausalLM.decode_step_mix`): each row runs one depth of its token;
        returns (mixture log-probs, depth, request) of the rows whose token is final this step. A row
        the decider sends on keeps its token, its mixture so far and h^(d) (`self.mix`, by slot) and runs
        the next depth in the next step's pass. The decider runs only where it can matter: rows below
        their cap (under always_think too, where stop_prob_mix weighs by its c_d); the updater only on
        the rows that iterate."""
        dev, n, policy = self.device, len(rows), self.config.depth_policy
        self.cache.active = n
        depth_l = [r.next_depth for r in rows]
        below = [i for i, r in enumerate(rows) if depth_l[i] < self._cap(r)]  # may (or must) go deeper
        run = below if policy == "decider" or self.mix.combine == "stop_prob_mix" else []
        deep = [i for i in range(n) if depth_l[i] > 1]
        depth = torch.tensor(depth_l, dtype=torch.long, device=dev)
        ids = torch.tensor([r.output[-1] for r in rows], dtype=torch.long, device=dev)
        hidden = self.mix.hidden(torch.tensor(deep, dtype=torch.long, device=dev)) if deep else None
        decide = torch.tensor(run, dtype=torch.long, device=dev) if run else None
        z, h, dec = self.model.decode_step_mix(ids, depth, self.cache, hidden, decide)
        cont, c = [False] * n, None
        if run:  # c_d as the forward computes it: sigmoid in the mixture's precision
            c = torch.ones(n, dtype=self.mix.dtype, device=dev).index_copy(0, decide, torch.sigmoid(dec.to(self.mix.dtype)))
        if policy == "decider" and run:
            thr = self._thresholds(rows)
            thr = thr.index_select(0, decide) if isinstance(thr, torch.Tensor) else thr
            for i, go in zip(run, (torch.sigmoid(dec.float()) > thr).tolist()):
                cont[i] = go
        elif policy == "always_think":
            for i in below:
                cont[i] = True
        mix, stop = self.mix.step(depth_l, z, h, cont, c)
        for i, r in enumerate(rows):
            r.next_depth = depth_l[i] + 1 if cont[i] else 1
        return mix, torch.tensor([depth_l[i] for i in stop], dtype=torch.long, device=dev), [rows[i] for i in stop]

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int | BaseException]:
        try:
            return self._sample_batch(logits, reqs)
        except Exception:
            # One row's parameters broke the batched call (before any row drew from its generator):
            # sample row by row, so that only that row fails.
            out: list[int | BaseException] = []
            for i, r in enumerate(reqs):
                try:
                    out.append(self._sample_batch(logits[i:i + 1], [r])[0])
                except Exception as e:
                    out.append(e)
            return out

    def _sample_batch(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        p = [r.params for r in reqs]
        dev = self.device
        temp = torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev)
        if bool((temp <= 0).all()):
            return logits.argmax(-1).tolist()
        return sample(logits, temp, torch.tensor([x.top_k for x in p], device=dev),
                      torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev),
                      torch.tensor([x.min_p for x in p], dtype=torch.float32, device=dev),
                      [r.generator for r in reqs]).tolist()

    def _free(self) -> None:
        """Drop finished rows; the last live row moves into each freed slot (live rows stay leading)."""
        if not any(r.finish_reason is not None for r in self.running):
            return
        slot = 0
        while slot < len(self.running):
            if self.running[slot].finish_reason is None:
                slot += 1
                continue
            last = len(self.running) - 1
            if slot != last:
                self.cache.move_row(last, slot)
                if self.mix is not None and self.running[last].next_depth > 1:  # mid-token: its mixture too
                    self.mix.move(last, slot)
            with self._lock:
                self._live.discard(self.running[slot].rid)
            self.running[slot] = self.running[last]
            self.running.pop()
        self.cache.active = len(self.running)
        self.cache.trim()

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 arrivals: list[int] | None = None) -> list[RequestOutput]:
        """Run requests to completion. arrivals[i]: the step at which request i joins (tests, benches)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        arrivals = arrivals or [0] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        rids = [f"gen-{i}-{next(self._ids)}" for i in range(len(prompts))]
        reqs: dict[str, _Request] = {}
        logprobs: dict[str, list[float]] = {rid: [] for rid in rids}
        step, k = 0, 0
        while k < len(order) or self.has_work():
            while k < len(order) and arrivals[order[k]] <= step:
                i = order[k]
                self.add_request(prompts[i], plist[i], rids[i])
                reqs[rids[i]] = self.waiting[-1]
                k += 1
            for ev in self.step():
                if ev.logprob is not None:
                    logprobs[ev.request_id].append(ev.logprob)
            step += 1
        return [RequestOutput(rid, reqs[rid].prompt, reqs[rid].output, reqs[rid].finish_reason, reqs[rid].stats,
                              logprobs[rid] or None, reqs[rid].depths, reqs[rid].error, reqs[rid].prompt_logprobs)
                for rid in rids]


def _demo() -> None:
    from .config import TaHConfig
    from .testing import randomize_lora, tiny_qwen3

    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(), TaHConfig(max_depth=2, threshold=0.5))
    randomize_lora(model)
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=64))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0), arrivals=[0, 0, 3, 5])
    for o in outs:
        print(o.request_id, o.token_ids, o.finish_reason, "depths:", o.stats.depth_counts)
    # TaH2 (M = 4): the mixture over depths, one request capped at depth 2
    tah2 = TaHForCausalLM.from_backbone(tiny_qwen3(), TaHConfig.tah2(max_depth=4))
    eng = Engine(tah2, EngineConfig(max_num_seqs=3, max_model_len=64))
    params = [SamplingParams(max_tokens=12, temperature=0, max_depth=m) for m in (None, 2, None, 1)]
    for o in eng.generate(prompts, params, arrivals=[0, 0, 3, 5]):
        print("TaH2", o.request_id, o.token_ids, "depths:", o.stats.depth_counts, "prompt:", o.stats.prompt_depth_counts)


if __name__ == "__main__":
    _demo()
