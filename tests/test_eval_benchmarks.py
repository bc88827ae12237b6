"""Each benchmark reader on a small fixture written in that benchmark's published row format."""

from __future__ import annotations

import json

import pytest

from tah.eval.benchmarks import BENCHMARKS, load_benchmark
from tah.eval.grading import grade_code, grade_math

FIXTURES = {
    "gsm8k": [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}],
    "math500": [{"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}",
                 "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}],
    "amc23": [{"id": 0, "question": "Compute 2+2.", "answer": 4.0, "url": "x"}],
    "aime25": [{"id": "I-1", "problem": "Find 10 mod 7.", "answer": "3", "solution": "..."}],
    "olympiadbench": [{"id": 7, "question": "Find x if x^2 = 4 and x > 0.", "final_answer": ["$2$"],
                       "solution": ["..."], "is_multiple_answer": False}],
    "gpqa_diamond": [{"Question": "Which is a noble gas?", "Correct Answer": "Neon", "Incorrect Answer 1": "Iron",
                      "Incorrect Answer 2": "Sodium", "Incorrect Answer 3": "Carbon", "Record ID": "rec1"}],
    "mmlu_stem": [{"question": "2 + 3 = ?", "subject": "elementary_mathematics", "choices": ["4", "5", "6", "7"],
                   "answer": 1}],
    "humaneval_plus": [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
                        "canonical_solution": "    return a + b\n", "entry_point": "add",
                        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}],
    "mbpp_plus": [{"task_id": 2, "prompt": "Write a function to add two numbers.", "code": "def add(a, b): return a + b",
                   "test_list": ["assert add(1, 2) == 3"], "test_imports": [],
                   "test": "assert add(1, 2) == 3\nassert add(0, 0) == 0\n"}],
}
EXPECT = {"gsm8k": "7", "math500": "\\frac{3}{4}", "amc23": "4.0", "aime25": "3", "olympiadbench": "2",
          "mmlu_stem": "B"}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reader_on_published_format(name, tmp_path):
    path = tmp_path / f"{name}-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FIXTURES[name]))
    (p,) = load_benchmark(name, source=str(path))
    assert p.benchmark == name and p.prompt
    if name in EXPECT:
        assert p.reference == EXPECT[name]
    if name == "gpqa_diamond":  # the correct option sits where the reference letter says
        letter = p.reference
        assert f"{letter}) Neon" in p.prompt
    if p.kind == "math":
        assert "\\boxed{}" in p.prompt and grade_math(f"\\boxed{{{p.reference}}}", p.reference)[0]
    if p.kind == "code":  # the canonical solution passes the benchmark's own tests, a wrong one fails
        sol = {"humaneval_plus": "def add(a, b):\n    return a + b\n", "mbpp_plus": "def add(a, b): return a + b\n"}
        assert grade_code(f"```python\n{sol[name]}```", p.tests)[0]
        assert not grade_code("```python\ndef add(a, b):\n    return a - b\n```", p.tests)[0]


def test_every_paper_benchmark_has_a_reader_and_hub_id():
    assert set(FIXTURES) | {"tinytask"} == set(BENCHMARKS)
    assert all(BENCHMARKS[n].hub_id for n in FIXTURES)


def test_tinytask_held_out_split():
    probs = load_benchmark("tinytask", limit=10)  # an even share of the 4 domains, interleaved
    assert [p.id.split("/")[1] for p in probs[:4]] == ["code", "math", "mental", "science"]
    assert {p.kind for p in probs} == {"math", "choice", "code"} and len(probs) == 10
    assert [p.kind for p in probs if "/mental/" in p.id] == ["math"] * 2  # graded as math answers
    full = load_benchmark("tinytask")
    assert len(full) == 800
    code = next(p for p in full if p.kind == "code")
    assert code.tests and not grade_code("```python\ndef f(x):\n    return None\n```", code.tests)[0]
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope")
