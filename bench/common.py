"""Helpers for the benchmarks: run one measurement in a fresh process and read its peak memory.

CPU tensors have no allocator statistics, so each configuration runs in its own Python process and
reports the growth of its resident-set high-water mark (VmHWM) over its resident set before the
measured steps (the model and inputs already built). The worker runs with a fixed glibc mmap
threshold so that freed tensors go back to the OS and the resident set follows live memory.
On CUDA, torch's own peak counter is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(step: Callable[[], None], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Seconds per call (median of `repeats`) and peak extra memory in MiB of running `step`."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mib("VmHWM") - base
    return {"seconds": times[len(times) // 2], "peak_mib": peak}


def run_isolated(script: str, args: list[str], for_memory: bool = False) -> dict:
    """Run `python script --worker args...` and parse the JSON line it prints last.

    for_memory: run with a fixed mmap threshold (accurate peak memory, distorted timing), so time and
    memory are taken from two separate processes.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if for_memory else dict(os.environ)
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_timed_and_measured(script: str, args: list[str]) -> dict:
    """Seconds from a normal worker process and, on CPU, peak memory from a second one (see above)."""
    res = run_isolated(script, args)
    if not torch.cuda.is_available():
        res["peak_mib"] = run_isolated(script, args, for_memory=True)["peak_mib"]
    return res
