"""The evaluation harness: problems -> engine samples -> graded records -> a summary per model x benchmark.

`EngineWorker` is a plain callable class (no Ray import): jobs/eval.py runs it as a Ray Data actor
pool (`map_batches(EngineWorker, compute=ActorPoolStrategy(...))`), and `run_local` calls it in
process. Each problem gets a zero-shot chat-template prompt and `n` samples with the paper's
sampling defaults (temperature 0.6, top-p 0.95, top-k 20), seeded per (problem, sample).

    python jobs/eval.py models.tah=runs/tiny/train/tah/stage2/model limit=30
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import chat_prompt_ids
from .benchmarks import Problem
from .grading import grade_many
from .sandbox import SandboxLimits

SUMMARY_COLUMNS = ("model", "benchmark", "problems", "samples", "accuracy", "avg_depth", "pct_iterated",
                   "output_tokens", "tokens_per_s", "parameters")


class EngineWorker:
    """Holds one model's engine; turns a batch of problems into samples (a Ray Data batch in and out).

    engine / sampling: `EngineConfig` / `SamplingParams` as dicts (they cross Ray as plain data); each
    sample's params are `sampling` with its own seed and a max_tokens that fits the context window."""

    def __init__(self, model_path: str, engine: dict[str, Any], sampling: dict[str, Any],
                 tokenizer: str | None = None, n_samples: int = 1,
                 n_samples_per_benchmark: dict[str, int] | None = None, seed: int = 0) -> None:
        import torch

        from ..config import from_dict
        from ..engine import Engine, EngineConfig
        from ..model import TaHForCausalLM
        from ..sampling import SamplingParams
        from ..tokenizer import checkpoint_tokenizer, end_token_ids, load_tokenizer

        self.engine_cfg = from_dict(EngineConfig, engine)
        self.sampling = from_dict(SamplingParams, sampling)
        self.n_samples, self.per_benchmark, self.seed = n_samples, dict(n_samples_per_benchmark or {}), seed
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = TaHForCausalLM.from_pretrained(model_path, device=dev)
        self.tokenizer = load_tokenizer(checkpoint_tokenizer(model_path, tokenizer))
        # the same end tokens as serving: the tokenizer's eos and the checkpoint's generation_config
        self.engine = Engine(self.model, self.engine_cfg, eos_token_ids=end_token_ids(self.tokenizer, model_path))
        self.parameters = self.model.parameter_report()["all"]["total"]

    def prompt_ids(self, prompt: str) -> list[int]:
        return chat_prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, params, keys = [], [], []
        for pid, bench, prompt in zip(batch["id"], batch["benchmark"], batch["prompt"]):
            ids = self.prompt_ids(str(prompt))
            room = self.engine_cfg.max_model_len - len(ids)
            budget = min(self.sampling.max_tokens or room, room)
            for j in range(self.per_benchmark.get(str(bench), self.n_samples)):
                seed = (self.seed * 1_000_003 + zlib.crc32(str(pid).encode()) + j) % 2**31
                keys.append((pid, j))
                prompts.append(ids)
                params.append(dataclasses.replace(self.sampling, max_tokens=max(budget, 1), seed=seed))
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        n_tok = sum(len(o.token_ids) for o in outs)
        row = {k: [] for k in ("id", "sample", "output", "tokens", "iterated", "depth_sum", "finish_reason")}
        for (pid, j), o in zip(keys, outs):
            row["id"].append(pid)
            row["sample"].append(j)
            row["output"].append(self.tokenizer.decode(o.token_ids, skip_special_tokens=True))
            row["tokens"].append(len(o.token_ids))
            row["iterated"].append(o.stats.iterated_tokens)
            row["depth_sum"].append(sum(d * n for d, n in o.stats.depth_counts.items()))
            row["finish_reason"].append(o.finish_reason or "")
        out = {k: np.array(v) for k, v in row.items()}
        # The batch's decode time, spread over its samples by their share of tokens (sums back to it).
        out["seconds"] = np.array([seconds * t / max(n_tok, 1) for t in row["tokens"]], dtype=np.float64)
        out["parameters"] = np.full(len(keys), self.parameters, dtype=np.int64)
        return out


def problem_batch(problems: list[Problem]) -> dict[str, np.ndarray]:
    return {k: np.array([getattr(p, k) for p in problems]) for k in ("id", "benchmark", "prompt")}


def run_local(model_path: str, problems: list[Problem], batch_size: int = 32, **worker: Any) -> list[dict[str, Any]]:
    """The harness without Ray: one engine in this process (`worker`: EngineWorker's arguments)."""
    w = EngineWorker(model_path, **worker)
    rows: list[dict[str, Any]] = []
    for i in range(0, len(problems), batch_size):
        out = w(problem_batch(problems[i:i + batch_size]))
        rows += [{k: v[j].item() if hasattr(v[j], "item") else v[j] for k, v in out.items()}
                 for j in range(len(out["id"]))]
    return rows


def grade(samples: list[dict[str, Any]], problems: list[Problem], workers: int = 2,
          sandbox: SandboxLimits | None = None) -> list[dict[str, Any]]:
    """Add prompt, reference, extracted and correct to each sample record."""
    by_id = {p.id: p for p in problems}
    items = [(by_id[s["id"]].kind, s["output"], by_id[s["id"]].reference, by_id[s["id"]].tests) for s in samples]
    graded = grade_many(items, workers=workers, limits=sandbox)
    out = []
    for s, (ok, extracted) in zip(samples, graded):
        p = by_id[s["id"]]
        out.append({"id": s["id"], "benchmark": p.benchmark, "sample": int(s["sample"]), "prompt": p.prompt,
                     "output": s["output"], "reference": p.reference, "extracted": extracted, "correct": bool(ok),
                     "tokens": int(s["tokens"]), "iterated": int(s["iterated"]), "depth_sum": int(s["depth_sum"]),
                     "finish_reason": s["finish_reason"], "seconds": float(s["seconds"]),
                     "parameters": int(s["parameters"])})
    return out


def summarize(model: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark: pass@1 averaged over samples, depth, % iterated, tokens, tokens/s."""
    rows = []
    for bench in sorted({r["benchmark"] for r in records}):
        rs = [r for r in records if r["benchmark"] == bench]
        tok = sum(r["tokens"] for r in rs)
        rows.append({"model": model, "benchmark": bench, "problems": len({r["id"] for r in rs}), "samples": len(rs),
                     "accuracy": sum(r["correct"] for r in rs) / len(rs),
                     "avg_depth": sum(r["depth_sum"] for r in rs) / max(tok, 1),
                     "pct_iterated": 100 * sum(r["iterated"] for r in rs) / max(tok, 1),
                     "output_tokens": tok / len(rs), "tokens_per_s": tok / max(sum(r["seconds"] for r in rs), 1e-9),
                     "parameters": rs[0]["parameters"]})
    return rows


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = SUMMARY_COLUMNS) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        if isinstance(v, int) and v >= 10**6:
            return f"{v / 1e6:.2f}M"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(output: Path, rows: list[dict[str, Any]]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (output / "summary.md").write_text(markdown_table(rows))
