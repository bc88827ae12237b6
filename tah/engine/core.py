"""The serving engine (v2): continuous batching with per-row dynamic depth over a paged per-depth KV pool.

Token ids in, token ids out (detokenizing and stop strings belong to the caller, e.g. serve/tah.py).
Each `step()` runs scheduler -> plan -> runner -> sampler -> output processor, as vLLM's engine core:

1. `Scheduler.schedule()` (scheduler.py) returns a `StepPlan`: every running request decodes (the KV
   blocks its token needs are allocated; when they run out the newest request is preempted and later
   recomputed), and waiting requests are admitted in arrival order when their blocks, less prefix-cache
   hits, plus a reserve for their expected deeper-depth entries are free;
2. `ModelRunner` (runner.py) decodes every running row in ONE pass of the weights, each at its own depth
   (a row the decider sent deeper runs that depth now), and prefills the admitted requests; it returns
   final-token logits (v1: cumulative logits; TaH2: the mixture over depths);
3. `OutputProcessor` (outputs.py) samples each row with its own parameters and generator (tah/sampling.py)
   and handles logprobs, stops and stats; finished requests free their blocks at once.

KV memory is a pool of `num_kv_blocks` blocks of `block_size` tokens per layer (kv.py): a request holds
blocks for the tokens it ran at each depth, not a max_model_len x max_depth reservation; its deeper
depths, which hold few tokens, use smaller blocks of `deep_block_size` tokens carved out of pool blocks. Full depth-1
blocks of prompts stay cached (with the deeper entries the decider wrote for them) and are reused by
requests that share the prefix.

One request's failure never reaches another: parameters are validated in `add_request` (a bad one
raises RequestError, a ValueError, and nothing is queued); if something raises inside `step()`, the
requests it concerns end with finish_reason "error" (the event carries the exception), their blocks
are freed, and the others go on. The same engine runs Standard (depth_policy="standard") and
AlwaysThink ("always_think"), so comparisons share one code path.

    python -m tah.engine            # a tiny random model, 4 staggered requests, printed stats
    eng = Engine(TaHForCausalLM.from_pretrained(path), EngineConfig(max_num_seqs=8), eos_token_ids=[2])
    outs = eng.generate([[1, 5, 9], [1, 7]], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import random
import threading
import time
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from .. import hf_adapter as hf
from ..config import check_choices
from ..model import TaHForCausalLM
from ..sampling import RequestError, SamplingParams
from .kv import BlockPool, NoFreeBlocks, SeqKV, chain_hashes
from .outputs import OutputProcessor, PromptLogprob, RequestOutput, RequestStats, TokenEvent
from .runner import ModelRunner
from .scheduler import Request, Scheduler

DepthPolicy = Literal["decider", "standard", "always_think"]
PromptDepth = Literal["decider", "depth1"]
DEPTH_POLICIES = typing.get_args(DepthPolicy)
log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """The serving engine's knobs (serve/tah.py's and jobs/eval.py's configs nest it as `engine:`)."""

    max_num_seqs: int = 32
    """Requests decoded together at most."""
    max_model_len: int = 2048
    """Prompt + generated tokens per request at most."""
    max_prefill_tokens: int = 4096
    """Prompt tokens admitted per step at most (one longer prompt is still admitted alone)."""
    depth_policy: DepthPolicy = "decider"
    """decider (TaH) | standard (all depth 1) | always_think (all at max depth)."""
    threshold: float | None = None
    """Decider threshold; None = the checkpoint's."""
    prompt_depth: PromptDepth = "decider"
    """Under the decider policy, the depths of a request's prompt tokens: decider (the authors' v1
    generate: the decider runs on every prompt token) | depth1 (every prompt token at depth 1, as TaH
    v1 trains them: stage 1 leaves the prompt at depth 1 and stage 2 never trains the decider there);
    generated tokens follow the decider either way."""
    block_size: int = 16
    """Tokens per KV block (depth-1 tables, prefix caching)."""
    deep_block_size: int = 1
    """Tokens per block of the deeper depths' tables, a divisor of block_size (pool blocks are split into
    such blocks on demand). 1 by measurement (bench/engine_v2.py --only kv, 1 / 2 / 4 / 16): the fewest
    bytes held, and decode as fast as with 4 or 16 on CPU."""
    num_kv_blocks: int | None = None
    """KV blocks in the pool (per layer). None: max_num_seqs x ceil(max_model_len / block_size) x
    min(max_depth, 2) -- the Standard reservation, doubled for a model that iterates."""
    deep_reserve: float | None = None
    """Admission reserve: the share of a prompt's tokens expected at each deeper depth; None = learnt
    from the running per-depth share of the tokens the engine ran."""
    enable_prefix_caching: bool = True
    """Keep full depth-1 prompt blocks (and their deeper entries) for requests sharing the prefix."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_num_seqs < 1 or self.max_model_len < 2 or self.max_prefill_tokens < 1 or self.block_size < 1:
            raise ValueError(f"bad engine sizes: {self}")
        if self.deep_block_size < 1 or self.block_size % self.deep_block_size:
            raise ValueError(f"deep_block_size must be a divisor of block_size {self.block_size}, "
                             f"got {self.deep_block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.deep_reserve is not None and not 0 <= self.deep_reserve <= 1:
            raise ValueError(f"deep_reserve must be in [0, 1], got {self.deep_reserve}")


class Engine:
    """Continuous-batching TaH decoder (single-threaded `step()`; add/abort are thread-safe)."""

    def __init__(self, model: TaHForCausalLM, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None) -> None:
        c = model.config
        kind = (c.input_rule, c.combine, c.decider_kind)
        if c.max_depth >= 2 and kind not in (("soft_topk", "logit_residual", "v1"), ("updater", "stop_prob_mix", "tah2"),
                                             ("updater", "even_mix", "tah2")):
            raise NotImplementedError(f"the engine serves v1 (soft_topk, logit_residual, v1 decider) and TaH2 (updater, "
                                      f"stop_prob_mix | even_mix, tah2 decider), not input_rule, combine, "
                                      f"decider_kind = {kind}")
        self.model = model.eval()
        self.max_depth = c.max_depth
        self.config = cfg = config or EngineConfig()
        self.eos = set(eos_token_ids or [])
        self.threshold = cfg.threshold if cfg.threshold is not None else model.config.threshold
        w = model.backbone.get_input_embeddings().weight
        self.device, self.vocab_size = w.device, w.shape[0]
        n_blocks = cfg.num_kv_blocks or (cfg.max_num_seqs * math.ceil(cfg.max_model_len / cfg.block_size)
                                         * min(self.max_depth, 2))
        hkv, hd = hf.kv_shape(model.backbone.config)
        self.pool = BlockPool(n_blocks, cfg.block_size, model.num_layers, hkv, hd, w.dtype, self.device,
                              cfg.deep_block_size)
        depth1 = cfg.depth_policy == "decider" and cfg.prompt_depth == "depth1"
        # (a prompt run at depth 1 caches blocks that a resumed request's generated tokens, which ran the
        # decider, must not hit)
        self.scheduler = Scheduler(self.pool, cfg.max_num_seqs, cfg.max_prefill_tokens, cfg.deep_reserve,
                                   cfg.enable_prefix_caching, prompt_only_hits=depth1)
        self.runner = ModelRunner(model, self.pool, cfg.max_num_seqs, cfg.depth_policy, prompt_depth1=depth1)
        self.outputs = OutputProcessor(self.eos, cfg.max_model_len, self._fail)
        self._aborts: set[str] = set()
        self._live: set[str] = set()  # ids waiting or running (a duplicate id would cross two streams)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._seq = itertools.count()
        self.steps = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; raises RequestError (a ValueError, with a client-facing message) if it
        cannot run. Everything about the request is checked here, synchronously."""
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
        bs, pool_tokens = self.config.block_size, self.pool.num_blocks * self.config.block_size
        if math.ceil((n + 1) / bs) > self.pool.num_blocks:
            raise RequestError(f"the prompt ({n} tokens) does not fit this server's KV cache "
                               f"({pool_tokens} tokens in all)")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, prompt, params, params.max_tokens or cap - n,
                      torch.Generator(device=self.device).manual_seed(seed),
                      RequestStats(prompt_tokens=n, arrival=time.perf_counter()), SeqKV(self.max_depth),
                      cap=self._cap(params), seq=next(self._seq),
                      stop_ids=frozenset(int(t) for t in params.stop_token_ids),
                      threshold=float(params.threshold if params.threshold is not None else self.threshold))
        with self._lock:
            if rid in self._live:
                raise RequestError(f"request id {rid!r} is already in use")
            self._live.add(rid)
            self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running); its blocks are free after the current step."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def waiting(self) -> list[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _cap(self, params: SamplingParams) -> int:
        """The deepest depth a request's tokens may run: 1 under standard, else its max_depth or M."""
        if self.config.depth_policy == "standard":
            return 1
        return params.max_depth or self.max_depth

    def _prefix_seed(self, r: Request) -> str:
        return self.scheduler.prefix_seed(r, self.config.depth_policy, self._thr(r))

    def _thr(self, r: Request) -> float:
        return r.threshold  # fixed at admission (Request.threshold)

    def stats(self) -> dict[str, float]:
        """Engine-wide gauges and counters (serve/tah.py exports them on /metrics)."""
        p, s = self.pool, self.scheduler
        ran = s.depth_tokens
        # kv_blocks_used counts a pool block split into deep blocks in full (depth 1 cannot use it);
        # kv_deep_blocks_used / _free: deep blocks held by requests / free inside split pool blocks.
        return {"kv_blocks_total": p.num_blocks, "kv_blocks_used": p.num_used,
                "kv_cache_usage_perc": p.num_used / p.num_blocks, "kv_block_size": p.block_size,
                "kv_deep_block_size": p.deep_block_size, "kv_blocks_split": p.num_split,
                "kv_deep_blocks_used": p.num_deep_used, "kv_deep_blocks_free": p.num_deep_free,
                "kv_bytes_per_block": p.bytes_per_block(), "prefix_cache_queries": p.prefix_queries,
                "prefix_cache_hits": p.prefix_hits, "prefix_cache_payload_bytes": p.payload_bytes(),
                "num_preemptions": s.num_preemptions,
                "deep_reserve_share": s.share(2) if self.max_depth >= 2 else 0.0,
                **{f"tokens_at_depth_{d}": ran.get(d, 0) for d in range(1, self.max_depth + 1)}}

    # ------------------------------------------------------------------ failure handling
    def _fail(self, reqs: list[Request], error: BaseException, events: list[TokenEvent]) -> None:
        """End these requests with finish_reason "error" and free what they hold."""
        now = time.perf_counter()
        for r in reqs:
            if r.finish_reason is None:
                r.finish_reason, r.error, r.stats.finish_time = "error", error, now
                events.append(TokenEvent(r.rid, -1, 0, finished=True, finish_reason="error", error=error))
            self._end(r)

    def _end(self, r: Request) -> None:
        if r in self.scheduler.waiting:
            self.scheduler.waiting.remove(r)
        self.scheduler.finish(r)
        self.runner.release(r)
        with self._lock:
            self._live.discard(r.rid)

    def fail_running(self, error: BaseException) -> list[TokenEvent]:
        """End every running request with "error" (a failure that cannot be pinned on one request);
        waiting requests stay queued and run next."""
        events: list[TokenEvent] = []
        self._fail(list(self.scheduler.running), error, events)
        return events

    def _process_aborts(self, events: list[TokenEvent]) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        for r in list(self.scheduler.waiting) + list(self.scheduler.running):
            if r.rid in aborts and r.finish_reason is None:
                r.finish_reason = "abort"
                events.append(TokenEvent(r.rid, -1, 0, finished=True, finish_reason="abort"))
                self._end(r)

    def _free_finished(self) -> None:
        for r in [r for r in self.scheduler.running if r.finish_reason is not None]:
            self._end(r)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()  # (not just no_grad: no view/version tracking, ~1 us less per op on the many small ops)
    def step(self) -> list[TokenEvent]:
        """Schedule, decode, prefill, sample, free; returns this step's tokens and finishes (failed
        requests included: finish_reason "error"). Never raises for a request's sake."""
        events: list[TokenEvent] = []
        try:
            self._process_aborts(events)
            self._step(events)
        except Exception as e:  # outside the per-request guards: end what is in flight, keep the engine usable
            log.exception("engine step failed: failing the %d requests in flight", self.num_running)
            events += self.fail_running(e)
        self._free_finished()
        self.steps += 1
        return events

    def _step(self, events: list[TokenEvent]) -> None:
        plan = self.scheduler.schedule(self._prefix_seed)
        for r in plan.preempted:
            self.runner.release(r)
            r.stats.preemptions += 1
        for r, err in plan.failed:
            self._fail([r], err, events)
        parts: list[tuple[torch.Tensor, torch.Tensor, list[Request]]] = []
        if plan.decode:
            try:
                parts.append(self.runner.decode(plan.decode, [self._thr(r) for r in plan.decode]))
                self.scheduler.depth_tokens.update(plan.decode_depths)  # one token run at each row's depth
            except Exception as e:
                log.exception("decode pass failed: failing its %d requests", len(plan.decode))
                self._fail(plan.decode, e, events)
        for r in [r for r in plan.prefill if r.params.prompt_logprobs is not None and r.prompt_logprobs is None]:
            try:
                r.prompt_logprobs = self._score_prompt(r)
            except Exception as e:  # this request's scoring alone: the others prefill as usual
                log.exception("request %s failed while scoring its prompt", r.rid)
                self._fail([r], e, events)
                plan.prefill.remove(r)
        if plan.prefill:
            part = self._prefill(plan.prefill, events)
            if part is not None:
                parts.append(part)
        reqs = [r for _, _, rs in parts for r in rs]
        if reqs:
            logits = parts[0][0] if len(parts) == 1 else torch.cat([lg.float() for lg, _, _ in parts])
            self.outputs.process(logits, torch.cat([d for _, d, _ in parts]).tolist(), reqs, events)

    @torch.no_grad()
    def _score_prompt(self, r: Request) -> list[PromptLogprob]:
        """Each prompt token's log-probability given the tokens before it, with the top-k at its
        position: the parallel forward of the prompt alone, under the model, depth rule, cap and
        threshold its prefill uses (tests check it against the prefill's own last-token logits)."""
        ids = torch.tensor([r.prompt], dtype=torch.long, device=self.device)  # (1, T)
        forced = torch.full_like(ids, r.cap) if self.config.depth_policy != "decider" else None
        cap = 1 if self.runner.prompt_depth1 else r.cap
        with self.model.depth_capped(cap if forced is None else None):
            logits = self.model(ids, depths=forced, threshold=self._thr(r), return_decider_logits=False).logits[0]
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T - 1, V): position i predicts token i + 1
        target = ids[0, 1:]
        chosen = logp.gather(1, target[:, None])[:, 0].tolist()
        k = r.params.prompt_logprobs
        tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if k:
            top = logp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        return [None] + [(lp, t) for lp, t in zip(chosen, tops)]

    def _prefill(self, new: list[Request], events: list[TokenEvent]):
        for r in new:
            self.runner.attach(r)
            if not r.output:  # the prefix-cache hit's tokens by the depth they ran (from its deeper entries)
                lens = r.kv.lengths
                r.stats.cached_tokens = lens[0]
                r.stats.prompt_depth_counts = {d + 1: lens[d] - (lens[d + 1] if d + 1 < len(lens) else 0)
                                               for d in range(len(lens)) if lens[d]}
        try:
            logits, depth, ran = self.runner.prefill(new, [self._thr(r) for r in new])
        except NoFreeBlocks:
            # Its deeper entries did not fit: back to the queue, next time alone with the worst case reserved
            # (or failed if it ran alone with the whole pool already).
            alone = len(new) == 1 and len(self.scheduler.running) == 1 and new[0].worst_case
            for r in new:
                self.runner.release(r)
            if alone:
                self._fail(new, RequestError(f"request {new[0].rid} needs more KV blocks than the pool holds "
                                             f"({self.pool.num_blocks} of {self.pool.block_size} tokens)"), events)
            else:
                self.scheduler.requeue(new)
            return None
        except Exception as e:
            # Running rows are not written by a prefill: only the new requests fail.
            log.exception("prefill failed: failing its %d requests", len(new))
            self._fail(new, e, events)
            return None
        for r, d in zip(new, ran):
            counts = torch.bincount(d, minlength=self.max_depth + 1).tolist()
            for k in range(1, self.max_depth + 1):  # tokens run at depth >= k
                self.scheduler.depth_tokens[k] += sum(counts[k:])
            if not r.output:
                for k in range(1, self.max_depth + 1):
                    if counts[k]:
                        r.stats.prompt_depth_counts[k] = r.stats.prompt_depth_counts.get(k, 0) + counts[k]
            if self.config.enable_prefix_caching:
                try:
                    self._cache_prompt_blocks(r)
                except Exception:  # (e.g. out of memory copying its deeper entries) the cache is an
                    # optimisation: this request and every other one run on without these blocks cached
                    log.exception("could not cache request %s's prompt blocks; continuing uncached", r.rid)
        return logits, depth, new

    def _cache_prompt_blocks(self, r: Request) -> None:
        """Register r's full prompt blocks (not yet shared) in the prefix cache, deeper entries included."""
        bs, n_full = self.config.block_size, len(r.prompt) // self.config.block_size
        if n_full <= r.kv.shared:
            return
        seed = self._prefix_seed(r)
        hashes = chain_hashes(r.prompt, bs, n_full, seed)
        for i in range(r.kv.shared, n_full):
            self.pool.register(r.kv.tables[0][i], hashes[i], self.pool.snapshot(r.kv, i * bs, (i + 1) * bs))

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 arrivals: list[int] | None = None) -> list[RequestOutput]:
        """Run requests to completion. arrivals[i]: the step at which request i joins (tests, benches)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        arrivals = arrivals or [0] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        rids = [f"gen-{i}-{next(self._ids)}" for i in range(len(prompts))]
        reqs: dict[str, Request] = {}
        logprobs: dict[str, list[float]] = {rid: [] for rid in rids}
        step, k = 0, 0
        while k < len(order) or self.has_work():
            while k < len(order) and arrivals[order[k]] <= step:
                i = order[k]
                self.add_request(prompts[i], plist[i], rids[i])
                reqs[rids[i]] = next(r for r in self.scheduler.waiting if r.rid == rids[i])
                k += 1
            for ev in self.step():
                if ev.logprob is not None:
                    logprobs[ev.request_id].append(ev.logprob)
            step += 1
        return [RequestOutput(rid, reqs[rid].prompt, reqs[rid].output, reqs[rid].finish_reason, reqs[rid].stats,
                              logprobs[rid] or None, reqs[rid].depths, reqs[rid].error, reqs[rid].prompt_logprobs)
                for rid in rids]


def _demo() -> None:
    from ..config import TaHConfig
    from ..testing import randomize_lora, tiny_qwen3

    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(), TaHConfig(max_depth=2, threshold=0.5))
    randomize_lora(model)
    eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=64, block_size=8))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0), arrivals=[0, 0, 3, 5])
    for o in outs:
        print(o.request_id, o.token_ids, o.finish_reason, "depths:", o.stats.depth_counts)
    print(eng.stats())
    # TaH2 (M = 4): the mixture over depths, one request capped at depth 2 and one at depth 1
    tah2 = TaHForCausalLM.from_backbone(tiny_qwen3(), TaHConfig.tah2(max_depth=4))
    eng = Engine(tah2, EngineConfig(max_num_seqs=3, max_model_len=64, block_size=8))
    params = [SamplingParams(max_tokens=12, temperature=0, max_depth=m) for m in (None, 2, None, 1)]
    for o in eng.generate(prompts, params, arrivals=[0, 0, 3, 5]):
        print("TaH2", o.request_id, o.token_ids, "depths:", o.stats.depth_counts, "prompt:", o.stats.prompt_depth_counts)
