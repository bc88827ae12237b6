"""Graders on hand-made right and wrong answers, and the code sandbox against hostile programs."""

from __future__ import annotations

import time

import pytest

from tah.eval.grading import (SandboxLimits, extract_choice, grade_choice, grade_code, grade_many, grade_math,
                              last_boxed, run_sandboxed)


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


@pytest.mark.parametrize("body,name", [
    ("def f(x):\n    return 2 * x\n", "wrong"),
    ("def f(x):\n    while True:\n        pass\n", "loops forever"),
    ("def f(x):\n    return 2 * x + 1\nimport os\nos.fork()\n", "forks"),
    ("def f(x):\n    return 2 * x + 1\nimport subprocess\nsubprocess.run(['true'])\n", "spawns"),
    ("def f(x):\n    return 2 * x + 1\nb = bytearray(10 * 1024 ** 3)\n", "allocates 10 GB"),
    ("def f(x):\n    return 2 * x + 1\nopen('/tmp/tah-escape.txt', 'w').write('x')\n", "writes outside"),
    ("def f(x):\n    return 2 * x + 1\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n", "network"),
    ("def f(x):\n    return 2 * x + 1\nimport os\nos.remove('/etc/hostname')\n", "deletes outside"),
    ("def f(x):\n    return 2 * x + 1\nimport sys\nsys.exit(3)\n", "exits non-zero"),
])
def test_code_hostile_programs_fail_and_the_harness_survives(body, name, tmp_path):
    import os

    t = time.time()
    ok, code = grade_code(f"```python\n{body}```", TESTS, limits=SandboxLimits(cpu_seconds=2, wall_seconds=4))
    assert not ok, name
    assert time.time() - t < 10
    assert not os.path.exists("/tmp/tah-escape.txt")


def test_code_passes_and_writes_inside_its_directory():
    assert grade_code(GOOD, TESTS)[0]
    assert grade_code("no code block", TESTS) == (False, None)
    ok, _ = run_sandboxed("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'")
    assert ok


def test_grade_many_in_worker_processes():
    items = [("math", r"\boxed{\frac{1}{2}}", "0.5", []), ("math", r"\boxed{3}", "4", []),
             ("choice", r"\boxed{B}", "B", []), ("code", GOOD, "", TESTS)]
    assert [ok for ok, _ in grade_many(items)] == [True, False, True, True]
