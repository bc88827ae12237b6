"""Evaluation on Ray: problems spread over engine actors with Ray Data, graded, summarised.

    python jobs/eval.py models.tah=runs/tiny/train/tah/stage2/model limit=60
    python jobs/eval.py --config jobs/configs/eval/tiny.yaml models.tah=runs/tiny/train/tah/stage2/model
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
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.common import absolute_local, init_ray, parse  # noqa: E402  (first: sets Ray's loopback switch before import)


def evaluate_model(name: str, path: str, problems: list, cfg) -> list[dict]:
    """One checkpoint over every problem: Ray Data map_batches over an EngineWorker actor pool."""
    import ray.data

    from tah.eval.harness import EngineWorker, grade

    ds = ray.data.from_items([{"id": p.id, "benchmark": p.benchmark, "prompt": p.prompt} for p in problems])
    use_gpu = _has_gpu()
    out = ds.map_batches(EngineWorker, fn_constructor_kwargs={"model_path": path, "cfg": asdict(cfg),
                                                              "policy": cfg.policies.get(name, "decider")},
                         compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size,
                         num_gpus=1 if use_gpu else 0, num_cpus=1).take_all()
    return grade(out, problems, cfg.grade_workers, cfg.sandbox)


def _has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def run(cfg) -> list[dict]:
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
    from tah.config import EvalConfig

    cfg = parse(EvalConfig, argv, __doc__.split("\n")[0])
    init_ray()
    return run(cfg)


if __name__ == "__main__":
    main()
