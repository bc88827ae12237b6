"""The serving engine, split as vLLM's engine core and nanochat's engine are:

- core.py       `Engine`, `EngineConfig`: the public API (add_request, step, generate, abort, stats);
- scheduler.py  `Scheduler` -> a typed `StepPlan` per step (decode rows and depths, admitted prefills,
                blocks allocated / freed, preemptions), depth-aware admission and preemption;
- runner.py     `ModelRunner`: the model, the per-row depth state, one decode pass per step;
- kv.py         `BlockPool` (paged per-depth KV, prefix cache), `SeqKV`, `PagedBatch`;
- outputs.py    events, outputs, stats, the `OutputProcessor` (sampling through tah/sampling.py).

    python -m tah.engine            # a tiny random model, 4 staggered requests, printed stats
    from tah.engine import Engine, EngineConfig, SamplingParams
"""

from ..sampling import RequestError, SamplingParams
from .core import DEPTH_POLICIES, DepthPolicy, Engine, EngineConfig
from .kv import BlockPool, NoFreeBlocks, PagedBatch, SeqKV
from .outputs import OutputProcessor, PromptLogprob, RequestOutput, RequestStats, TokenEvent
from .runner import ModelRunner
from .scheduler import Request, Scheduler, StepPlan

__all__ = ["BlockPool", "DEPTH_POLICIES", "DepthPolicy", "Engine", "EngineConfig", "ModelRunner", "NoFreeBlocks",
           "OutputProcessor", "PagedBatch", "PromptLogprob", "Request", "RequestError", "RequestOutput", "RequestStats", "Scheduler",
           "SamplingParams", "SeqKV", "StepPlan", "TokenEvent"]
