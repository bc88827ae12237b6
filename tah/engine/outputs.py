"""The engine's output side: request statistics, the per-token events `Engine.step()` returns, finished
`RequestOutput`s, and the `OutputProcessor` that turns a step's final-token logits into tokens (through
tah/sampling.py, each row with its own parameters and generator), logprobs, stops and stats.

A row whose handling raises (its sampling parameters break the batched sampler, its logprobs ask for
too much) fails alone: it is sampled row by row, and the failing one ends with finish_reason "error".

    python -m pytest -x -q tests/test_engine_v2.py -k output     # with a fake runner, no model
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..sampling import SAMPLING_EPS, sample

if TYPE_CHECKING:
    from .scheduler import Request

log = logging.getLogger(__name__)


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
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (at the first prefill)."""
    preemptions: int = 0

    @property
    def iterated_tokens(self) -> int:
        return sum(n for d, n in self.depth_counts.items() if d >= 2)


PromptLogprob = tuple[float, list[tuple[int, float]]] | None
"""A prompt token's (log-probability given the tokens before it, [(token id, log-probability)] of the
most likely tokens at that position); None for the first prompt token."""


@dataclass
class TokenEvent:
    """One generated token of one request (what `step()` returns)."""

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


def sample_rows(logits: torch.Tensor, reqs: list["Request"]) -> list[int | BaseException]:
    """(n, V) -> one token per row, or the exception of a row whose parameters or logits broke sampling."""
    states = [r.generator.get_state() for r in reqs]
    try:
        return _sample_batch(logits, reqs)
    except Exception:
        # One row broke the batched call, perhaps after every row drew from its generator: rewind the
        # generators and sample row by row, so that only that row fails and the others draw what they
        # would have drawn.
        for r, st in zip(reqs, states):
            r.generator.set_state(st)
        out: list[int | BaseException] = []
        for i, r in enumerate(reqs):
            try:
                out.append(_sample_batch(logits[i:i + 1], [r])[0])
            except Exception as e:
                out.append(e)
        return out


def _sample_batch(logits: torch.Tensor, reqs: list["Request"]) -> list[int]:
    p = [r.params for r in reqs]
    dev = logits.device
    temp = torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev)
    if bool((temp < SAMPLING_EPS).all()):
        return logits.argmax(-1).tolist()
    return sample(logits, temp, torch.tensor([x.top_k for x in p], device=dev),
                  torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev),
                  torch.tensor([x.min_p for x in p], dtype=torch.float32, device=dev),
                  [r.generator for r in reqs]).tolist()


class OutputProcessor:
    """Sampled tokens -> events, stops and stats. fail(reqs, error, events) ends requests with "error"."""

    def __init__(self, eos: set[int], max_model_len: int,
                 fail: Callable[[list["Request"], BaseException, list[TokenEvent]], None]) -> None:
        self.eos, self.max_model_len, self.fail = eos, max_model_len, fail

    def process(self, logits: torch.Tensor, depth: list[int], reqs: list["Request"],
                events: list[TokenEvent]) -> None:
        """Sample each row's token, record it, decide whether the row is done."""
        tokens = sample_rows(logits, reqs)  # (n, V) -> n ids, or the exception of a row that failed
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
                self.fail([r], e, events)
                continue
            if not r.output:
                ev.prompt_depth_counts = dict(r.stats.prompt_depth_counts)
                ev.prompt_logprobs = r.prompt_logprobs
            self.record(r, tok, d, ev, now)
            events.append(ev)

    def record(self, r: "Request", tok: int, d: int, ev: TokenEvent, now: float) -> None:
        r.output.append(tok)
        r.depths.append(d)
        st = r.stats
        st.generated_tokens += 1
        st.depth_counts[d] = st.depth_counts.get(d, 0) + 1
        if st.first_token_time is None:
            st.first_token_time = now
        if (tok in self.eos and not r.params.ignore_eos) or tok in r.stop_ids:
            r.finish_reason = "stop"
        elif st.generated_tokens >= r.max_tokens or len(r.prompt) + st.generated_tokens >= self.max_model_len:
            r.finish_reason = "length"
        if r.finish_reason is not None:
            ev.finished, ev.finish_reason = True, r.finish_reason
            st.finish_time = now
