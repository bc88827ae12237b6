"""Benchmark readers: the paper's nine benchmarks in their published formats, and the shipped task.

Each reader turns rows of the benchmark's published dataset (hub id, config and split below) into
`Problem`s with a zero-shot prompt. `source` overrides where the rows come from: a local
.jsonl/.json/.parquet file or a directory of them, or an s3:// prefix -- the same row format, so an
offline mirror works. Without `source` the hub is used (`datasets.load_dataset`).

    python -c "from tah.eval.benchmarks import load_benchmark; print(load_benchmark('tinytask')[0])"
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import storage
from ..assets import shipped_task

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_SUFFIX = "\nAnswer with the letter of the correct option, within \\boxed{}."
CODE_SUFFIX = "\nWrite the complete Python solution in a ```python code block."
MMLU_STEM = ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"]


@dataclass
class Problem:
    id: str
    benchmark: str
    kind: str
    """math | choice | code (which grader)."""
    prompt: str
    """The user message (zero-shot)."""
    reference: str = ""
    tests: list[str] = field(default_factory=list)
    """code: statements run after the extracted program (asserts, or a check() call)."""


@dataclass
class Spec:
    hub_id: str
    configs: list[str | None]
    split: str
    convert: Callable[[dict[str, Any], str, int], Problem]


def _choices(question: str, options: list[str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{chr(65 + i)}) {o}" for i, o in enumerate(options)) + CHOICE_SUFFIX


def _gsm8k(r: dict, bench: str, i: int) -> Problem:
    answer = r["answer"].split("####")[-1].strip().replace(",", "")
    return Problem(f"{bench}/{i}", bench, "math", r["question"] + MATH_SUFFIX, answer)


def _math(key_q: str, key_a: str, key_id: str | None = None) -> Callable:
    def conv(r: dict, bench: str, i: int) -> Problem:
        ans = r[key_a]
        if isinstance(ans, list):  # OlympiadBench: final_answer is a list of strings
            ans = ans[0] if ans else ""
        ans = str(ans).strip().strip("$")
        return Problem(f"{bench}/{r.get(key_id, i) if key_id else i}", bench, "math", str(r[key_q]) + MATH_SUFFIX, ans)

    return conv


def _gpqa(r: dict, bench: str, i: int) -> Problem:
    options = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
    order = list(range(4))
    random.Random(f"gpqa-{r.get('Record ID', i)}").shuffle(order)  # a fixed, per-question shuffle
    shuffled = [options[j].strip() for j in order]
    return Problem(f"{bench}/{r.get('Record ID', i)}", bench, "choice", _choices(r["Question"], shuffled),
                   chr(65 + order.index(0)))


def _mmlu(r: dict, bench: str, i: int) -> Problem:
    return Problem(f"{bench}/{r.get('subject', '')}/{i}", bench, "choice", _choices(r["question"], r["choices"]),
                   chr(65 + int(r["answer"])))


def _humaneval(r: dict, bench: str, i: int) -> Problem:
    prompt = "Complete this Python function.\n```python\n" + r["prompt"] + "```" + CODE_SUFFIX
    return Problem(r["task_id"], bench, "code", prompt, tests=[r["test"], f"check({r['entry_point']})"])


def _mbpp(r: dict, bench: str, i: int) -> Problem:
    example = (r.get("test_list") or [""])[0]
    prompt = f"{r['prompt']}\nYour code should pass this test:\n{example}" + CODE_SUFFIX
    tests = list(r.get("test_imports") or []) + [r["test"] if r.get("test") else "\n".join(r["test_list"])]
    return Problem(f"{bench}/{r['task_id']}", bench, "code", prompt, tests=tests)


def domain_of(problem_id: str) -> str | None:
    """The domain in a problem id: `<benchmark>/<domain>/<i>` (tinytask); None for `<benchmark>/<i>`."""
    parts = problem_id.split("/")
    return parts[1] if len(parts) >= 3 else None


def _tinytask(r: dict, bench: str, i: int) -> Problem:
    domain = r["source"].split("/")[-1]
    kind = {"math": "math", "mental": "math", "science": "choice", "code": "code"}[domain]
    return Problem(f"{bench}/{domain}/{i}", bench, kind, r["messages"][0]["content"], r["answer"],
                   list(r.get("tests") or []))


BENCHMARKS: dict[str, Spec] = {
    "gsm8k": Spec("openai/gsm8k", ["main"], "test", _gsm8k),
    "math500": Spec("HuggingFaceH4/MATH-500", [None], "test", _math("problem", "answer", "unique_id")),
    "amc23": Spec("math-ai/amc23", [None], "test", _math("question", "answer", "id")),
    "aime25": Spec("math-ai/aime25", [None], "test", _math("problem", "answer", "id")),
    "olympiadbench": Spec("Hothan/OlympiadBench", ["OE_TO_maths_en_COMP"], "train",
                          _math("question", "final_answer", "id")),
    "gpqa_diamond": Spec("Idavidrein/gpqa", ["gpqa_diamond"], "train", _gpqa),
    "mmlu_stem": Spec("cais/mmlu", MMLU_STEM, "test", _mmlu),
    "humaneval_plus": Spec("evalplus/humanevalplus", [None], "test", _humaneval),
    "mbpp_plus": Spec("evalplus/mbppplus", [None], "test", _mbpp),
    "tinytask": Spec("", [None], "test", _tinytask),
}


def _read_local(source: str, split: str) -> list[dict[str, Any]]:
    path = Path(storage.local_copy(source))
    files = [path]
    if path.is_dir():  # the split's files if any are named after it, else every data file
        data = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        files = [p for p in data if split in p.name] or data
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(f).to_pylist()
        elif f.suffix == ".jsonl":
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        else:
            data = json.loads(f.read_text())
            rows += data if isinstance(data, list) else data.get("data", [data])
    if not rows:
        raise FileNotFoundError(f"no {split} rows (.jsonl/.json/.parquet) under {source}")
    return rows


def _read_hub(spec: Spec) -> Iterable[dict[str, Any]]:
    from datasets import load_dataset

    for cfg in spec.configs:
        for r in load_dataset(spec.hub_id, cfg, split=spec.split):
            yield {**r, "subject": r.get("subject", cfg)} if cfg else r


def load_benchmark(name: str, source: str | None = None, limit: int | None = None,
                   split: str | None = None) -> list[Problem]:
    """Problems of benchmark `name` (see BENCHMARKS), from `source` or the hub; first `limit` only."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    if name == "tinytask" and source is None:
        source = shipped_task()
    rows = _read_local(source, split or spec.split) if source else _read_hub(spec)
    out = []
    for i, r in enumerate(rows):
        if limit is not None and len(out) >= limit and name != "tinytask":
            break
        out.append(spec.convert(r, name, i))
    if name == "tinytask" and limit is not None:  # an even share of each domain, interleaved
        by_domain: dict[str, list[Problem]] = {}
        for p in out:
            by_domain.setdefault(domain_of(p.id), []).append(p)
        mixed = [p for group in zip(*by_domain.values()) for p in group]
        out = mixed[:limit]
    if not out:
        raise ValueError(f"{name}: no problems read from {source or spec.hub_id}")
    return out
