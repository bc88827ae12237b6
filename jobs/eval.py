"""Evaluation on Ray: problems spread over engine actors with Ray Data, graded, summarised.

    python jobs/eval.py models.tah=runs/tiny/train/tah/stage2/model limit=60
    python jobs/eval.py --config jobs/configs/eval/tiny.yaml models.tah=runs/tiny/train/tah/stage2/model
    python jobs/eval.py models.tah2=CKPT threshold=0.5 max_depth=2      # a TaH2 checkpoint, capped at depth 2
    ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval/paper.yaml \
        models.tah=s3://bucket/tah/stage2/model output=s3://bucket/tah/eval

Writes `<output>/<model>/<benchmark>.jsonl` (prompt, output, extracted answer, correct, tokens, tokens
that iterated, per sample) and `<output>/summary.{md,json}` (accuracy, average depth, % tokens
iterated, output tokens, tokens/s, parameters per model x benchmark); `output` is a local directory
or an s3:// prefix. With `labels=` the token-level
analysis of each TaH checkpoint on the labelled validation set goes to `<output>/<model>/analysis/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from jobs.common import absolute_local, init_ray, parse  # (first: sets Ray's loopback switch before import)
from tah.config import check_choices, to_dict
from tah.engine import EngineConfig
from tah.eval.sandbox import SandboxLimits
from tah.sampling import SamplingParams


@dataclass
class EvalConfig:
    """jobs/eval.py: checkpoints x benchmarks through the serving engine, graded, summarised."""

    ALIASES: ClassVar[dict[str, str]] = {
        **{k: f"sampling.{k}" for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_depth")},
        **{k: f"engine.{k}" for k in ("threshold", "max_num_seqs", "max_model_len")}}
    """The flat names of earlier recipes (`max_tokens=256`, `threshold=0.8`) still work as overrides
    (`max_depth=2`: every request of a TaH2 checkpoint capped at depth 2)."""

    models: dict[str, str] = field(default_factory=dict)
    """Name -> TaH checkpoint (local dir or s3://), e.g. {tah: runs/tiny/train/tah/stage2/model}."""
    policies: dict[str, Literal["decider", "standard", "always_think"]] = field(default_factory=dict)
    """Name -> depth policy where not the decider: standard | always_think (default: decider)."""
    benchmarks: list[str] = field(default_factory=lambda: ["tinytask"])
    sources: dict[str, str] = field(default_factory=dict)
    """Benchmark -> local file/dir or s3:// mirror of its published rows (default: the hub)."""
    tokenizer: str | None = None
    """None: each checkpoint's own tokenizer, else the shipped task's."""
    limit: int | None = None
    """First N problems of each benchmark (None: all)."""
    n_samples: int = 1
    """Samples per problem; accuracy is pass@1 averaged over them."""
    n_samples_per_benchmark: dict[str, int] = field(default_factory=dict)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=1024))
    """Every sample's decoding settings (the paper's: temperature 0.6, top-p 0.95, top-k 20); each
    sample gets its own seed from `seed`, and max_tokens is cut to fit the context window."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=4096))
    """The engine of each actor (engine.threshold: the decider's, None = each checkpoint's; its
    depth_policy is set per model from `policies`)."""
    seed: int = 0
    num_actors: int = 1
    """Engine actors per model (Ray Data ActorPoolStrategy)."""
    batch_size: int = 32
    """Problems per actor call (decoded together by the engine)."""
    grade_workers: int = 2
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    """The code grader's sandbox (limits, backend, unsafe_code_execution), see tah/eval/sandbox.py."""
    output: str = "runs/eval"
    labels: str | None = None
    """A jobs/label.py output: also run the token-level analysis on its validation rows."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name, pol in self.policies.items():
            if pol not in ("decider", "standard", "always_think"):
                raise ValueError(f"policies.{name} must be decider | standard | always_think, got {pol!r}")
        if self.n_samples < 1 or self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("n_samples, num_actors and batch_size must be >= 1")


def worker_args(cfg: EvalConfig, policy: str = "decider") -> dict[str, Any]:
    """EngineWorker's arguments for one model (plain data: they travel to Ray actors)."""
    return {"engine": to_dict(dataclasses.replace(cfg.engine, depth_policy=policy)), "sampling": to_dict(cfg.sampling),
            "tokenizer": cfg.tokenizer, "n_samples": cfg.n_samples,
            "n_samples_per_benchmark": cfg.n_samples_per_benchmark, "seed": cfg.seed}


def evaluate_model(name: str, path: str, problems: list, cfg: EvalConfig) -> list[dict]:
    """One checkpoint over every problem: Ray Data map_batches over an EngineWorker actor pool."""
    import ray.data

    from tah.eval.harness import EngineWorker, grade

    ds = ray.data.from_items([{"id": p.id, "benchmark": p.benchmark, "prompt": p.prompt} for p in problems])
    use_gpu = _has_gpu()
    out = ds.map_batches(EngineWorker, fn_constructor_kwargs={
                             "model_path": path, **worker_args(cfg, cfg.policies.get(name, "decider"))},
                         compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size,
                         num_gpus=1 if use_gpu else 0, num_cpus=1).take_all()
    return grade(out, problems, cfg.grade_workers, cfg.sandbox)


def _has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def run(cfg: EvalConfig) -> list[dict]:
    from tah import storage
    from tah.eval.benchmarks import load_benchmark
    from tah.eval.harness import summarize, write_records, write_summary

    if not cfg.models:
        raise SystemExit("no models to evaluate: pass models.<name>=<checkpoint> (or a --config with models:)")
    problems = [p for b in cfg.benchmarks for p in load_benchmark(b, cfg.sources.get(b), cfg.limit)]
    # Ray actors may run in another working directory: local checkpoint paths must be absolute.
    cfg = dataclasses.replace(cfg, models={k: absolute_local(v) for k, v in cfg.models.items()},
                              tokenizer=absolute_local(cfg.tokenizer))
    # Records and summaries are written locally; an s3:// output gets them uploaded at the end.
    with storage.staged_dir(cfg.output, prefix="tah-eval-") as out:
        rows = []
        for name, path in cfg.models.items():
            records = evaluate_model(name, path, problems, cfg)
            for bench in cfg.benchmarks:
                write_records(out / name / f"{bench}.jsonl", [r for r in records if r["benchmark"] == bench])
            rows += summarize(name, records)
            print(f"[eval] {name}: " + ", ".join(f"{r['benchmark']} {r['accuracy']:.3f}" for r in rows
                                                 if r["model"] == name), flush=True)
            if cfg.labels and cfg.policies.get(name, "decider") == "decider":
                from tah.eval.analysis import analyze

                analyze(path, cfg.labels, out / name / "analysis")
        write_summary(out, rows)
        print((out / "summary.md").read_text(), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse(EvalConfig, argv, __doc__.split("\n")[0])
    init_ray(output=cfg.output)
    return run(cfg)


if __name__ == "__main__":
    from jobs.eval import main as package_main  # the package's copy (see jobs/train.py)

    package_main()
