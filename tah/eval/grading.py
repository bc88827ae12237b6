"""Graders: math answers (math-verify), multiple choice (letter), code (the benchmark's tests in a sandbox).

- math    the last \\boxed{...} of the response (else its last number) against the reference with
          math-verify. Its timeouts use signals, so grading runs in worker processes
          (`grade_many`), each with its own time limit -- never in a Ray actor's thread.
- choice  the letter in the last \\boxed{...}, else "answer is (X)" / a final standalone letter.
- code    the last ```python block, run with the tests in a fresh `python -I` subprocess: a temporary
          working directory, CPU-time / address-space / file-size limits, a wall-clock limit that kills
          its whole process group, and an audit hook that refuses sockets, subprocesses, forks and
          writes outside its directory. A solution that breaks any of this fails; the harness goes on.

    python -c "from tah.eval.grading import grade_math; print(grade_math('so \\\\boxed{\\\\frac12}', '0.5'))"
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

KINDS = ("math", "choice", "code")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    i = text.rfind("\\boxed")
    while i >= 0:
        j = text.find("{", i)
        if j < 0:
            return None
        depth, k = 0, j
        while k < len(text):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                return text[j + 1:k].strip()
            k += 1
        i = text.rfind("\\boxed", 0, i)
    return None


def extract_math(text: str) -> str | None:
    box = last_boxed(text)
    if box is not None:
        return box
    nums = re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?", text.split("</think>")[-1])
    return nums[-1] if nums else None


def grade_math(response: str, reference: str) -> tuple[bool, str | None]:
    """(correct, extracted). Call in a worker process (math-verify uses signals for its timeouts)."""
    from math_verify import parse, verify

    pred = extract_math(response)
    if pred is None:
        return False, None
    gold = parse(f"${reference}$" if "\\" in reference or "^" in reference else reference)
    guess = parse(f"${pred}$")
    if not guess:
        guess = parse(pred)
    return bool(gold and guess and verify(gold, guess)), pred


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    box = last_boxed(text)
    if box is not None:
        m = re.search(rf"\b([{letters}])\b", box.replace("\\text{", " ").replace("}", " "))
        if m:
            return m.group(1)
    tail = text.split("</think>")[-1]
    m = re.findall(rf"answer(?: is)?[:\s]*\(?([{letters}])\)?\b", tail, flags=re.IGNORECASE)
    if m:
        return m[-1].upper()
    m = re.findall(rf"(?:^|\s)\(?([{letters}])\)?[.)]?\s*$", tail.strip())
    return m[-1] if m else None


def grade_choice(response: str, reference: str) -> tuple[bool, str | None]:
    pred = extract_choice(response)
    return pred is not None and pred == reference.strip().upper(), pred


def extract_code(text: str) -> str | None:
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, flags=re.DOTALL)
    return blocks[-1] if blocks else None


@dataclass
class SandboxLimits:
    cpu_seconds: int = 5
    memory_mb: int = 1024
    wall_seconds: float = 10.0
    file_mb: int = 16


# Runs first inside the sandboxed interpreter: an audit hook (cannot be removed once added) refusing
# what a test program has no business doing. `root` is the sandbox's working directory.
_GUARD = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
_deny = ("socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
         "os.spawn", "pty.spawn", "os.kill", "os.killpg", "ctypes.", "shutil.rmtree")
def _outside(p):
    try:
        return not os.path.realpath(os.fspath(p)).startswith(_root + os.sep)
    except Exception:
        return True
def _hook(event, args):
    if event.startswith(_deny):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
        if isinstance(args[0], (str, bytes, os.PathLike)) and _outside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox")
    if event == "open" and len(args) > 2 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        if isinstance(args[0], (str, bytes, os.PathLike)) and _outside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "os.link",
                 "os.truncate", "os.utime", "os.chown") and args and _outside(args[0]):
        raise PermissionError(f"sandbox: {event} outside the sandbox")
sys.addaudithook(_hook)
del _hook
'''


def _limits(lim: SandboxLimits):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds))
        mem = lim.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        fsz = lim.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsz, fsz))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_sandboxed(program: str, limits: SandboxLimits | None = None) -> tuple[bool, str]:
    """Run a Python program in the sandbox; (exit status 0, reason / tail of stderr)."""
    lim = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="tah-sandbox-") as d:
        with open(os.path.join(d, "main.py"), "w") as f:
            f.write(_GUARD + "\n" + program)
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": d, "TMPDIR": d, "no_proxy": "*"}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "main.py"], cwd=d, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limits(lim),
                                    start_new_session=True)
        except OSError as e:
            return False, f"could not start: {e}"
        try:
            _, err = proc.communicate(timeout=lim.wall_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return False, f"wall-clock limit ({lim.wall_seconds}s)"
        finally:
            _kill_group(proc)  # anything it left behind in its session
        if proc.returncode == 0:
            return True, ""
        reason = "killed by signal %d" % -proc.returncode if proc.returncode < 0 else "exit %d" % proc.returncode
        return False, f"{reason}: {err.decode(errors='replace')[-500:]}"


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def grade_code(response: str, tests: list[str], setup: str = "", limits: SandboxLimits | None = None
               ) -> tuple[bool, str | None]:
    """(all tests pass, extracted program)."""
    code = extract_code(response)
    if code is None:
        return False, None
    ok, _ = run_sandboxed("\n".join([setup, code, *tests]), limits)
    return ok, code


def _grade_one(kind: str, response: str, reference: str, tests: list[str]) -> tuple[bool, str | None]:
    if kind == "math":
        return grade_math(response, reference)
    if kind == "choice":
        return grade_choice(response, reference)
    if kind == "code":
        return grade_code(response, tests)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def grade_many(items: list[tuple[str, str, str, list[str]]], workers: int = 2,
               timeout: float = 30.0) -> list[tuple[bool, str | None]]:
    """Grade (kind, response, reference, tests) items in worker processes; a grader that hangs past
    `timeout` counts as wrong (its worker is killed).

    Workers are spawned, not forked: the caller may be a Ray driver or actor with threads of its own,
    and a forked child of a threaded process can deadlock on a lock held at fork time."""
    import multiprocessing

    out: list[tuple[bool, str | None]] = []
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    hung = False
    try:
        futures = [pool.submit(_grade_one, *it) for it in items]
        for f in futures:
            try:
                out.append(f.result(timeout=timeout))
            except FutureTimeout:
                hung = True
                out.append((False, None))
            except Exception:  # a grader crash on odd input: wrong, not fatal
                out.append((False, None))
    finally:
        if hung:  # a worker stuck in a grader never takes the exit sentinel: kill it
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
        pool.shutdown(wait=not hung, cancel_futures=True)
    return out
