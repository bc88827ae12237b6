"""What kernel isolation costs a code-grading item: the sandbox's backends vs an unisolated subprocess.

The baseline is the previous grader's process model: one `python -I -S` subprocess per item running
the solution with its tests appended (no namespaces, no seccomp, no separate harness). Each sandbox
backend available here runs the same items through `tah.eval.sandbox.run_tests` (launcher,
namespaces, supervisor + worker, nonce-checked verdict, value tests compared outside). Items are the
shipped task's code problems with their reference solutions; every one must pass on every path.
Prints the median seconds per item of each path and its ratio to the baseline, side by side.

    python bench/sandbox.py [--items 30 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tah.assets import shipped_task
from tah.eval.sandbox import SandboxLimits, run_tests


def items(n: int) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in (Path(shipped_task()) / "code/test-00000-of-00001.jsonl").open()]
    return [(r["answer"], r["tests"]) for r in rows[:n]]


def unisolated(solution: str, tests: list[str]) -> bool:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "main.py").write_text("\n".join([solution, *tests]))
        return subprocess.run([sys.executable, "-I", "-S", "main.py"], cwd=d, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0


def timed(fn, work: list[tuple[str, list[str]]], rounds: int) -> float:
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for sol, tests in work:
            assert fn(sol, tests), "a reference solution failed"
        per_round.append((time.perf_counter() - t) / len(work))
    return statistics.median(per_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = items(args.items)
    paths = {"unisolated subprocess (before)": unisolated}
    for backend in ["bwrap", "unshare"]:
        if backend == "bwrap" and not shutil.which("bwrap"):
            print("bwrap: not installed (apt-get install bubblewrap), skipped")
            continue
        lim = SandboxLimits(backend=backend)
        paths[f"sandbox, {backend}"] = lambda s, t, lim=lim: run_tests(s, t, lim)[0]
    for fn in paths.values():  # warm-up: the backend probe, page cache
        fn(*work[0])
    res = {name: timed(fn, work, args.rounds) for name, fn in paths.items()}
    base = res["unisolated subprocess (before)"]
    print(f"\ncode grading, {len(work)} tinytask items x {args.rounds} rounds (median s/item)   "
          f"`python bench/sandbox.py --items {args.items} --rounds {args.rounds}`")
    print("| path | s / item | ÷ before |\n|---|---|---|")
    for name, sec in res.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f} |")


if __name__ == "__main__":
    main()
