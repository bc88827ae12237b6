"""Graders: math answers (math-verify), multiple choice (letter), code (the benchmark's tests in a sandbox).

- math    the last \\boxed{...} of the response (else its last number) against the reference with
          math-verify. Its timeouts use signals, so grading runs in worker processes
          (`grade_many`), each with its own time limit -- never in a Ray actor's thread.
- choice  the letter in the last \\boxed{...}, else "answer is (X)" / a final standalone letter.
- code    the last ```python block with the benchmark's tests, in the kernel sandbox of
          `tah.eval.sandbox` (namespaces, uid 65534, read-only runtime, tmpfs quota, rlimits, seccomp;
          the verdict on a nonce-checked channel, results compared outside as plain data).

Answer extraction is linear in the response length; `grade_many` gives each item its own deadline.

    python -c "from tah.eval.grading import grade_math; print(grade_math('so \\\\boxed{\\\\frac12}', '0.5'))"
"""

from __future__ import annotations

import re
import time

from .sandbox import SandboxLimits, SandboxUnavailable, backend_for, run_tests

KINDS = ("math", "choice", "code")
_BOXED = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} whose braces balance, or None. One pass to match every brace
    (a stack), so the cost is linear in the text: a response of 100k unclosed `\\boxed{` is cheap."""
    opens = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not opens:
        return None
    close: dict[int, int] = {}
    stack: list[int] = []
    for k, c in enumerate(text):
        if c == "{":
            stack.append(k)
        elif c == "}" and stack:
            close[stack.pop()] = k
    for j in reversed(opens):
        if j in close:
            return text[j + 1:close[j]].strip()
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


def grade_code(response: str, tests: list[str], setup: str = "", limits: SandboxLimits | None = None
               ) -> tuple[bool, str | None]:
    """(all tests pass, extracted program). The program and tests run in the kernel sandbox
    (`tah.eval.sandbox`); SandboxUnavailable where this host has no isolation and none was waived."""
    code = extract_code(response)
    if code is None:
        return False, None
    ok, _, _ = run_tests("\n".join([setup, code]) if setup else code, tests, limits)
    return ok, code


def _grade_one(kind: str, response: str, reference: str, tests: list[str], limits: SandboxLimits | None = None
               ) -> tuple[bool, str | None]:
    if kind == "math":
        return grade_math(response, reference)
    if kind == "choice":
        return grade_choice(response, reference)
    if kind == "code":
        return grade_code(response, tests, limits=limits)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _worker(conn, limits: SandboxLimits | None) -> None:
    """A grading process: (index, item) in, (index, result) out, until None."""
    while True:
        job = conn.recv()
        if job is None:
            return
        idx, item = job
        conn.send(("started", idx))  # the item's deadline runs from here, not from our start-up
        try:
            conn.send((idx, _grade_one(*item, limits)))
        except SandboxUnavailable as e:
            conn.send((idx, e))
        except Exception:  # a grader crash on odd input: wrong, not fatal
            conn.send((idx, (False, None)))


class _Slot:
    def __init__(self, ctx, limits: SandboxLimits | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, limits), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[int, float] | None = None  # (item index, deadline)
        self.started = False

    def stop(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


STARTUP_SECONDS = 120.0  # a spawned worker's start-up (imports) before it takes its first item


def grade_many(items: list[tuple[str, str, str, list[str]]], workers: int = 2, timeout: float = 30.0,
               limits: SandboxLimits | None = None) -> list[tuple[bool, str | None]]:
    """Grade (kind, response, reference, tests) items in worker processes. Each item has its own
    deadline, `timeout` seconds from the moment a worker takes it: past it the item counts as wrong,
    its worker is killed and replaced at once, and the items behind it go on.

    Workers are spawned, not forked: the caller may be a Ray driver or actor with threads of its own,
    and a forked child of a threaded process can deadlock on a lock held at fork time."""
    import multiprocessing
    from multiprocessing.connection import wait

    if any(kind == "code" for kind, *_ in items):
        backend_for(limits or SandboxLimits())  # refuse before any work where there is no isolation
    ctx = multiprocessing.get_context("spawn")
    out: list[tuple[bool, str | None] | None] = [None] * len(items)
    queue = list(range(len(items)))[::-1]
    slots = [_Slot(ctx, limits) for _ in range(max(1, min(workers, len(items))))]
    deaths = 0  # workers lost in a row without a result: a broken environment, not a bad item
    try:
        while queue or any(s.job for s in slots):
            for s in slots:
                if s.job is None and queue:
                    idx = queue.pop()
                    s.conn.send((idx, items[idx]))
                    s.job = (idx, time.monotonic() + STARTUP_SECONDS)
            busy = [s for s in slots if s.job]
            left = min(s.job[1] for s in busy) - time.monotonic()
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=max(left, 0))
            for i, s in enumerate(slots):
                if s.job is None:
                    continue
                msg = None
                if s.conn in ready:
                    try:
                        msg = s.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                if msg is not None and msg[0] == "started":
                    s.job = (s.job[0], time.monotonic() + timeout)
                elif msg is not None:
                    if isinstance(msg[1], SandboxUnavailable):
                        raise msg[1]
                    out[msg[0]], s.job, deaths = msg[1], None, 0
                elif s.conn in ready or s.proc.sentinel in ready or time.monotonic() > s.job[1]:
                    out[s.job[0]] = (False, None)  # hung past its deadline, or its worker died
                    deaths += 0 if time.monotonic() > s.job[1] else 1
                    if deaths >= 3:
                        raise RuntimeError("grading workers keep dying before they answer; see their stderr")
                    s.stop(kill=True)  # its sandbox, if any, dies with it (PDEATHSIG)
                    slots[i] = _Slot(ctx, limits)
    finally:
        for s in slots:
            s.stop(kill=s.job is not None)
    return [r if r is not None else (False, None) for r in out]
