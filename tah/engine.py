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

The same engine runs Standard (depth_policy="standard": every token depth 1) and AlwaysThink
("always_think": every token at max depth), so comparisons share one code path.

    python -m tah.engine            # a tiny random model, 4 staggered requests, printed stats
    eng = Engine(TaHForCausalLM.from_pretrained(path), EngineConfig(max_num_seqs=8), eos_token_ids=[2])
    outs = eng.generate([[1, 5, 9], [1, 7]], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .model import TaHForCausalLM
from .sampling import sample

DEPTH_POLICIES = ("decider", "standard", "always_think")


class RequestError(ValueError):
    """A request the engine cannot run (the message is meant for the client)."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (the paper's reasoning defaults)."""

    max_tokens: int | None = None
    """Tokens to generate at most; None = up to the context window."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    """0 = off."""
    min_p: float = 0.0
    seed: int | None = None
    """Same seed, same prompt, same params -> same tokens, whatever else is batched alongside."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: none; 0: the chosen token's log-probability; k: also the k most likely tokens'."""
    threshold: float | None = None
    """Decider threshold for this request (None: the engine's current one)."""

    def check(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise RequestError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    """Requests decoded together at most (slots of the KV reservation)."""
    max_model_len: int = 2048
    """Prompt + generated tokens per request at most."""
    max_prefill_tokens: int = 4096
    """Prompt tokens admitted per step at most (one longer prompt is still admitted alone)."""
    depth_policy: str = "decider"
    """decider (TaH) | standard (all depth 1) | always_think (all at max depth)."""
    threshold: float | None = None
    """Decider threshold; None = the checkpoint's."""
    chunk: int = 128
    """Attention window granularity (slots)."""

    def __post_init__(self) -> None:
        if self.depth_policy not in DEPTH_POLICIES:
            raise ValueError(f"depth_policy must be one of {DEPTH_POLICIES}, got {self.depth_policy!r}")
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
    """stop (EOS / stop token) | length (max_tokens or context) | abort."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    stats: RequestStats
    logprobs: list[float] | None = None
    depths: list[int] = field(default_factory=list)


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
    """Mid-iteration: (next depth, top-k values, top-k ids, cumulative logits) of the current token."""


class Engine:
    """Continuous-batching TaH decoder (single-threaded `step()`; add/abort are thread-safe)."""

    def __init__(self, model: TaHForCausalLM, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.eos = set(eos_token_ids or [])
        self.threshold = self.config.threshold if self.config.threshold is not None else model.config.threshold
        w = model.backbone.get_input_embeddings().weight
        self.device, self.vocab_size = w.device, w.shape[0]
        self.cache = model.new_cache(self.config.max_num_seqs, capacity=self.config.max_model_len,
                                     chunk=self.config.chunk)
        self.cache.active = 0
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; raises RequestError (with a client-facing message) if it cannot run."""
        params = params or SamplingParams()
        params.check()
        prompt = [int(t) for t in prompt_token_ids]
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
                       RequestStats(prompt_tokens=n, arrival=time.perf_counter()))
        with self._lock:
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
    def _forced(self, shape: tuple[int, int]) -> torch.Tensor | None:
        policy = self.config.depth_policy
        if policy == "decider":
            return None
        depth = 1 if policy == "standard" else self.model.config.max_depth
        return torch.full(shape, depth, dtype=torch.long, device=self.device)

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

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit, decode, prefill, sample, free; returns this step's tokens and finishes."""
        events: list[TokenEvent] = []
        self._process_aborts(events)
        self._free()
        new = self._admit()
        old = list(self.running)
        rows_logits, rows_depth, reqs = [], [], []
        cache = self.cache
        if old:  # decode: one pass, each running row at its own depth
            lg, dp, done = self._decode(old)
            rows_logits.append(lg)
            rows_depth.append(dp)
            reqs += done
        if new:  # prefill the admitted requests into the slots after the running ones
            slots = list(range(len(old), len(old) + len(new)))
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
            last[len(old):] = torch.tensor([len(r.prompt) - 1 for r in new], device=self.device)
            out = self.model(ids, attention_mask=valid, depths=self._forced((n_all, T)), past_key_values=cache,
                             threshold=self._thresholds(self.running), return_decider_logits=False, logits_at=last)
            sl = torch.tensor(slots, device=self.device)
            rows_logits.append(out.logits[sl])
            rows_depth.append(out.depths[sl, last[sl]])
            for s, r in zip(slots, new):
                d = out.depths[s, :len(r.prompt)]
                r.stats.prompt_depth_counts = {int(k): int((d == k).sum()) for k in d.unique().tolist()}
            reqs += new
        if not reqs:
            return events
        logits = torch.cat(rows_logits)  # (n, V)
        depth = torch.cat(rows_depth).tolist()
        tokens = self._sample(logits, reqs)
        want_lp = [r.params.logprobs for r in reqs]
        logp = torch.log_softmax(logits.float(), dim=-1) if any(k is not None for k in want_lp) else None
        now = time.perf_counter()
        for i, (r, tok, d) in enumerate(zip(reqs, tokens, depth)):
            r.output.append(tok)
            r.depths.append(d)
            st = r.stats
            st.generated_tokens += 1
            st.depth_counts[d] = st.depth_counts.get(d, 0) + 1
            if st.first_token_time is None:
                st.first_token_time = now
            ev = TokenEvent(r.rid, tok, d)
            if logp is not None and want_lp[i] is not None:
                ev.logprob = float(logp[i, tok])
                if want_lp[i]:
                    top = logp[i].topk(want_lp[i])
                    ev.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            if (tok in self.eos and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif st.generated_tokens >= r.max_tokens or len(r.prompt) + st.generated_tokens >= self.config.max_model_len:
                r.finish_reason = "length"
            if r.finish_reason is not None:
                ev.finished, ev.finish_reason = True, r.finish_reason
                st.finish_time = now
            events.append(ev)
        self._free()
        self.steps += 1
        return events

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
        cont = depth < (target if target is not None else D)
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

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
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
                              logprobs[rid] or None, reqs[rid].depths) for rid in rids]


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


if __name__ == "__main__":
    _demo()
