"""Graders on hand-made right and wrong answers, and the code sandbox against hostile programs."""

from __future__ import annotations

import pytest

from tah.eval.grading import extract_choice, grade_choice, grade_code, grade_many, grade_math, last_boxed
from tah.eval.sandbox import run_tests


def test_boxed_extraction_handles_nesting():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed("no box") is None


@pytest.mark.parametrize("response,reference,ok", [
    (r"... so \boxed{\frac{1}{2}}", "0.5", True),
    (r"The answer is $\boxed{0.5}$.", r"\frac{1}{2}", True),
    (r"\boxed{-28}", "-28", True),
    (r"\boxed{28}", "-28", False),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{x = 3}", "3", True),
    ("<think>1 + 1 = 2</think> so it is 41", "41", True),
    ("no number here", "7", False),
    (r"\boxed{\pi}", "3.14", False),
])
def test_math(response, reference, ok):
    assert grade_math(response, reference)[0] is ok


@pytest.mark.parametrize("response,ok", [
    (r"The answer is $\boxed{C}$.", True), (r"\boxed{\text{C}}", True), ("The answer is (C)", True),
    ("answer: c", True), (r"\boxed{B}", False), ("I cannot tell", False), ("<think>maybe A</think>\nC", True),
])
def test_choice(response, ok):
    assert grade_choice(response, "C")[0] is ok
    assert extract_choice("nothing") is None


GOOD = "```python\ndef f(x):\n    return 2 * x + 1\n```"
TESTS = ["assert f(1) == 3", "assert f(10) == 21"]
# The hostile programs live in tests/test_sandbox.py, run against every sandbox backend.


def test_code_passes_and_writes_inside_its_directory():
    assert grade_code(GOOD, TESTS)[0]
    assert grade_code("no code block", TESTS) == (False, None)
    ok, reason, _ = run_tests("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'\n"
                              "def f(x):\n    return 2 * x + 1\n", TESTS)
    assert ok, reason


def test_grade_many_in_worker_processes():
    items = [("math", r"\boxed{\frac{1}{2}}", "0.5", []), ("math", r"\boxed{3}", "4", []),
             ("choice", r"\boxed{B}", "B", []), ("code", GOOD, "", TESTS)]
    assert [ok for ok, _ in grade_many(items)] == [True, False, True, True]
