"""Kernel-isolated execution of model-generated Python, and the test protocol the graders use.

Each program runs in fresh user, PID, network, mount, IPC and UTS namespaces as uid/gid 65534 (also
when the grader is root), on a filesystem holding only the shared libraries and the Python runtime
(read-only) and a size-limited tmpfs working directory, under rlimits (CPU, address space, file
size, open files, processes), no_new_privs and a seccomp filter that refuses new processes, exec,
ptrace and namespace/kernel-admin calls; at the deadline the launcher is killed and with it PID 1 of
the namespace and everything inside. Backends, in the order `auto` tries them:

- `bwrap`   bubblewrap (Debian package `bubblewrap`), when installed and working;
- `unshare` this package's own launcher (`sandbox_init.py`: the same namespaces through the raw syscalls);
- `none`    refused unless `unsafe_code_execution: true`, which runs the harness unisolated and warns per run.

`SandboxRun.backend` says which one ran. The tests themselves run in `sandbox_harness.py`; a problem
passes only on the harness supervisor's report, which carries a per-run nonce on a pipe the candidate's
process never holds, and value tests are compared here, outside, on plain data.

    python -c "from tah.eval.sandbox import run_tests; print(run_tests('def f(x):\\n    return x + 1', ['assert f(1) == 2']))"
"""

from __future__ import annotations

import ast
import json
import logging
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
SANDBOX_UID = SANDBOX_GID = 65534
OUTPUT_CAP = 64 * 2**10          # bytes of stdout / stderr kept (the pipe is closed past it)
REPORT_CAP = 9 * 2**20           # bytes of the supervisor's report read at most


@dataclass
class SandboxLimits:
    """Limits and backend of one sandboxed program (the code grader's `sandbox` settings)."""

    cpu_seconds: int = 5
    """RLIMIT_CPU of each process."""
    memory_mb: int = 1024
    """RLIMIT_AS of each process."""
    wall_seconds: float = 10.0
    """Wall-clock deadline from the launch; the whole namespace is killed at it."""
    file_mb: int = 16
    """RLIMIT_FSIZE: the largest file it may write."""
    disk_mb: int = 32
    """Size of the tmpfs working directory: all files together."""
    open_files: int = 64
    processes: int = 256
    """RLIMIT_NPROC: tasks (threads too) of host uid 65534, summed over every sandbox running on the
    host; the seccomp filter refuses new processes anyway, so this only backs it up."""
    allow_processes: bool = False
    """Leave fork/exec to the rlimits (no seccomp filter); for tests of the namespace teardown."""
    backend: Literal["auto", "bwrap", "unshare"] = "auto"
    unsafe_code_execution: bool = False
    """Run without isolation where none is available (a warning per run). Never on a shared host."""

    def __post_init__(self) -> None:
        from ..config import check_choices

        check_choices(self)
        for name in ("cpu_seconds", "memory_mb", "wall_seconds", "file_mb", "disk_mb", "open_files", "processes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class SandboxRun:
    backend: str
    verdict: dict[str, Any] | None     # the supervisor's report (None: none arrived, or a forged one)
    reason: str                         # "" or why no verdict arrived
    stdout: bytes = b""
    stderr: bytes = b""
    seconds: float = 0.0
    seccomp: str = ""


@dataclass
class TestPlan:
    """Tests split for the sandbox: value tests are compared here, script tests run inside."""

    script_tests: list[str] = field(default_factory=list)
    value_calls: list[str] = field(default_factory=list)
    expected: list[Any] = field(default_factory=list)


class SandboxUnavailable(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------
# splitting and rewriting the tests (trusted side)
class _GuardComparisons(ast.NodeTransformer):
    """`a == b < c` -> `_tah_cmp(a, ['Eq', 'Lt'], [lambda: b, lambda: c])`; `assert x` -> `assert _tah_truth(x)`."""

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        ops = ast.List([ast.Constant(type(o).__name__) for o in node.ops], ast.Load())
        thunks = ast.List([ast.Lambda(ast.arguments([], [], None, [], [], None, []), c) for c in node.comparators],
                          ast.Load())
        return ast.Call(ast.Name("_tah_cmp", ast.Load()), [node.left, ops, thunks], [])

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        self.generic_visit(node)
        node.test = ast.Call(ast.Name("_tah_truth", ast.Load()), [node.test], [])
        return node


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(self.new, node.ctx), node) if node.id == self.old else node


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _value_test(st: ast.stmt) -> tuple[str, Any] | None:
    """`assert <expr> == <literal>` (either side) -> (expr source, literal value)."""
    if not (isinstance(st, ast.Assert) and isinstance(st.test, ast.Compare) and len(st.test.ops) == 1
            and isinstance(st.test.ops[0], ast.Eq)):
        return None
    left, right = st.test.left, st.test.comparators[0]
    (lok, lval), (rok, rval) = _literal(left), _literal(right)
    if rok and not lok:
        return ast.unparse(left), rval
    if lok and not rok:
        return ast.unparse(right), lval
    return None


def plan_tests(tests: list[str]) -> TestPlan:
    """Split benchmark tests into value tests (expected value kept outside) and guarded script tests.
    A HumanEval-style `def check(candidate)` called as `check(f)` is inlined with candidate -> f."""
    src = "\n".join(tests)
    try:
        mod = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return TestPlan(script_tests=[src])  # the harness reports the error: the problem fails
    checks = {n.name: n for n in mod.body if isinstance(n, ast.FunctionDef) and len(n.args.args) == 1
              and not (n.args.vararg or n.args.kwarg or n.args.kwonlyargs or n.decorator_list)}
    body: list[ast.stmt] = []
    inlined: set[str] = set()
    for node in mod.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in checks
                and len(call.args) == 1 and isinstance(call.args[0], ast.Name) and not call.keywords):
            fn = checks[call.func.id]
            ren = _Rename(fn.args.args[0].arg, call.args[0].id)
            body += [ast.fix_missing_locations(ren.visit(ast.parse(ast.unparse(st)).body[0])) for st in fn.body]
            inlined.add(fn.name)
        else:
            body.append(node)
    plan = TestPlan()
    for st in body:
        if isinstance(st, ast.FunctionDef) and st.name in inlined:
            continue
        vt = _value_test(st)
        if vt is not None:
            plan.value_calls.append(vt[0])
            plan.expected.append(vt[1])
        else:
            guarded = ast.fix_missing_locations(_GuardComparisons().visit(ast.Module([st], [])))
            plan.script_tests.append(ast.unparse(guarded))
    return plan


def decode(v: Any) -> Any:
    """The harness's tagged plain data -> Python objects (built here, so comparing them is safe)."""
    if v is None or type(v) is bool:
        return v
    tag, x = v
    if tag == "int":
        return int(x)
    if tag in ("float", "complex"):
        return {"float": float, "complex": complex}[tag](x)
    if tag == "str":
        return x
    if tag == "bytes":
        return bytes.fromhex(x)
    if tag == "dict":
        return {decode(k): decode(w) for k, w in x}
    return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](decode(w) for w in x)


def judge(plan: TestPlan, run: SandboxRun) -> tuple[bool, str]:
    """(passed, reason). Passes only on a genuine verdict in which every test ran and passed."""
    if run.verdict is None:
        return False, run.reason or "no verdict"
    recs = run.verdict["records"]
    for r in recs:
        if "import_error" in r:
            return False, f"solution failed to load: {r['import_error']}"
    if not any(r.get("done") is True for r in recs):
        return False, "the tests did not finish (%s)" % (run.reason or "worker died")
    scripts = {r["script"]: r for r in recs if isinstance(r.get("script"), int)}
    values = {r["value"]: r for r in recs if isinstance(r.get("value"), int)}
    for k in range(len(plan.script_tests)):
        if not scripts.get(k, {}).get("ok") is True:
            return False, f"test {k} failed: {scripts.get(k, {}).get('error', 'not run')}"
    for k, want in enumerate(plan.expected):
        rec = values.get(k)
        if rec is None or "result" not in rec:
            return False, f"value test {k} failed: {(rec or {}).get('error', 'not run')}"
        try:
            got = decode(rec["result"])
        except (ValueError, TypeError, KeyError, OverflowError):
            return False, f"value test {k}: malformed result"
        if not got == want:
            return False, f"value test {k}: {plan.value_calls[k]} gave {str(got)[:80]}, expected {str(want)[:80]}"
    return True, ""


# ---------------------------------------------------------------------------------------------------
# backends
def _python() -> tuple[str, str]:
    """(interpreter, runtime prefix) the sandbox runs: the base interpreter, not the venv's packages."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not exe.startswith(prefix + os.sep):
        prefix = os.path.dirname(os.path.dirname(exe))
    return exe, prefix


def _ro_paths(prefix: str) -> list[str]:
    base = ["/usr/lib", "/usr/lib64", "/lib", "/lib64"] if prefix != "/usr" else ["/usr", "/lib", "/lib64"]
    paths = [p for p in base if os.path.lexists(p)]
    return paths + ([prefix] if not any(prefix == p or prefix.startswith(p + "/") for p in paths) else [])


def _rlimits(lim: SandboxLimits) -> dict[str, int]:
    return {"RLIMIT_CPU": lim.cpu_seconds, "RLIMIT_AS": lim.memory_mb * 2**20, "RLIMIT_FSIZE": lim.file_mb * 2**20,
            "RLIMIT_NOFILE": lim.open_files, "RLIMIT_NPROC": lim.processes, "RLIMIT_CORE": 0}


_ENV = {"PATH": "/nonexistent", "HOME": "/work", "TMPDIR": "/work", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1"}


# The launcher and bubblewrap's own PID 1 keep the environment they are started with, and the
# sandboxed program can read /proc/1/environ: start them with nothing of the grader's (secrets).
_LAUNCH_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _bwrap_argv(d: str, lim: SandboxLimits, exe: str, prefix: str) -> tuple[list[str], dict[str, str]]:
    root = os.geteuid() == 0
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
            "--disable-userns", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--clearenv"]
    stage0: dict[str, str] = {}
    for p in _ro_paths(prefix):
        if os.path.islink(p):
            argv += ["--symlink", os.readlink(p), p]
            continue
        src = p
        if root and p == prefix:  # uid 65534 cannot traverse /root: stage 0 binds it somewhere it can
            src = os.path.join(d, "rt")
            os.makedirs(src)
            stage0[src] = p
        argv += ["--ro-bind", src, p]
    argv += ["--ro-bind", os.path.join(d, "task"), "/task", "--dev", "/dev", "--proc", "/proc",
             "--size", str(lim.disk_mb * 2**20), "--perms", "1777", "--tmpfs", "/work", "--remount-ro", "/",
             "--chdir", "/work"]
    for k, v in _ENV.items():
        argv += ["--setenv", k, v]
    return argv + [exe, "-I", "-S", "/task/harness.py"], stage0


def _launch(d: str, lim: SandboxLimits, backend: str, fds: tuple[int, int]) -> subprocess.Popen:
    exe, prefix = _python()
    cfg: dict[str, Any] = {"dir": d, "fds": list(fds), "uid": SANDBOX_UID, "gid": SANDBOX_GID,
                           "rlimits": _rlimits(lim), "python": exe, "env": _ENV, "mode": backend}
    if backend == "bwrap":
        cfg["bwrap"], cfg["stage0_binds"] = _bwrap_argv(d, lim, exe, prefix)
    else:
        cfg.update(ro_paths=_ro_paths(prefix), sources={}, disk_bytes=lim.disk_mb * 2**20)
    with open(os.path.join(d, "launch.json"), "w") as f:
        json.dump(cfg, f)
    return subprocess.Popen([sys.executable, "-I", "-S", str(HERE / "sandbox_init.py"), os.path.join(d, "launch.json")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=fds, start_new_session=True, cwd=d, env=_LAUNCH_ENV)


def _launch_unsafe(d: str, lim: SandboxLimits, fds: tuple[int, int]) -> subprocess.Popen:
    log.warning("unsafe_code_execution: running model-generated code WITHOUT isolation (no namespaces, no seccomp)")
    print("WARNING: tah sandbox: running model-generated code without isolation (unsafe_code_execution)",
          file=sys.stderr)
    work = os.path.join(d, "work")
    os.makedirs(work)
    code = ("import os,resource,sys;r,n=%r;os.dup2(r,3);os.dup2(n,4);"
            "[resource.setrlimit(getattr(resource,k),(v,v)) for k,v in %r.items() if k!='RLIMIT_NPROC'];"
            "os.execve(sys.executable,[sys.executable,'-I','-S',%r],%r)"
            % (fds, _rlimits(lim), os.path.join(d, "task", "harness.py"),
               {**_ENV, "HOME": work, "TMPDIR": work, "TAH_TASK_DIR": os.path.join(d, "task")}))
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds, start_new_session=True,
                            cwd=work, env=_LAUNCH_ENV)


def _kill(proc: subprocess.Popen, graceful: float = 0.0) -> None:
    """End a run. Kill the launcher's child (bubblewrap, or PID 1 of the namespace) while the
    launcher lives, so that the launcher reaps what is left: killed first, it would orphan them to
    the host's init, which may never reap them (zombies of uid 65534 count against RLIMIT_NPROC)."""
    import signal

    try:
        proc.wait(timeout=graceful)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5 if children else 0)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run(solution: str, spec: dict[str, Any], lim: SandboxLimits, backend: str) -> SandboxRun:
    t0 = time.monotonic()
    d = tempfile.mkdtemp(prefix="tah-sandbox-")
    res_r = res_w = non_r = non_w = -1
    try:
        os.chmod(d, 0o755)  # uid 65534 must traverse it (bwrap as 65534 binds task/ and rt/ from here)
        task = os.path.join(d, "task")
        os.makedirs(task, mode=0o755)
        shutil.copy(HERE / "sandbox_harness.py", os.path.join(task, "harness.py"))
        with open(os.path.join(task, "solution.py"), "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(solution)
        with open(os.path.join(task, "spec.json"), "w") as f:
            json.dump({**spec, "seccomp": not lim.allow_processes}, f)
        for name in os.listdir(task):
            os.chmod(os.path.join(task, name), 0o644)
        res_r, res_w = os.pipe()
        non_r, non_w = os.pipe()
        proc = (_launch_unsafe(d, lim, (res_w, non_r)) if backend == "none"
                else _launch(d, lim, backend, (res_w, non_r)))
        os.close(res_w)
        os.close(non_r)
        res_w = non_r = -1
        nonce = secrets.token_hex(16)
        try:
            os.write(non_w, (nonce + "\n").encode())
        except BrokenPipeError:
            pass
        os.close(non_w)
        non_w = -1
        out, reason = _collect(proc, res_r, lim.wall_seconds, t0)
        verdict = None
        report = out["result"].decode("utf-8", "replace")
        head, _, body = report.partition("\n")
        if secrets.compare_digest(head, nonce):
            try:
                verdict = json.loads(body)
            except ValueError:
                reason = reason or "malformed verdict"
        else:
            reason = reason or ("no verdict (exit %s): %s" % (proc.returncode,
                                                             out["stderr"].decode(errors="replace")[-300:]))
        seccomp = next((r.get("seccomp") for r in (verdict or {}).get("records", []) if "seccomp" in r), "")
        return SandboxRun(backend, verdict, reason, out["stdout"], out["stderr"], time.monotonic() - t0,
                          seccomp or "")
    finally:
        for fd in (res_r, res_w, non_r, non_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


def _collect(proc: subprocess.Popen, res_fd: int, wall: float, t0: float) -> tuple[dict[str, bytes], str]:
    """Read stdout, stderr (OUTPUT_CAP each) and the report pipe (REPORT_CAP) until all close or the
    deadline; a stream past its cap is closed, so a huge write costs the writer, not us."""
    sel = selectors.DefaultSelector()
    caps = {"stdout": OUTPUT_CAP, "stderr": OUTPUT_CAP, "result": REPORT_CAP}
    bufs: dict[str, bytearray] = {k: bytearray() for k in caps}
    files = {"stdout": proc.stdout, "stderr": proc.stderr}
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(res_fd, selectors.EVENT_READ, "result")
    reason = ""
    try:
        while sel.get_map():
            left = t0 + wall - time.monotonic()
            if left <= 0:
                reason = f"wall-clock limit ({wall}s)"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                name = key.data
                data = os.read(key.fd, 65536)
                room = caps[name] - len(bufs[name])
                bufs[name] += data[:max(room, 0)]
                if not data or len(data) > room:
                    sel.unregister(key.fd)
                    if name != "result":  # (the report pipe is the caller's to close)
                        files[name].close()
                    if data and name == "result":
                        reason = "verdict too large"
    finally:
        sel.close()
        _kill(proc, graceful=0.0 if reason else 2.0)  # finished: let it exit and reap its own
        for f in files.values():
            if not f.closed:
                f.close()
    return {k: bytes(v) for k, v in bufs.items()}, reason


_BACKEND: dict[str, str] = {}


def _probe(backend: str) -> bool:
    plan = plan_tests(["assert f() == 1"])
    try:
        run = _run("def f():\n    return 1\n", {"script_tests": [], "value_calls": plan.value_calls},
                   SandboxLimits(wall_seconds=30), backend)
    except OSError as e:
        log.info("sandbox backend %s unavailable: %s", backend, e)
        return False
    ok = judge(plan, run)[0]
    if not ok:
        log.info("sandbox backend %s unavailable: %s %s", backend, run.reason, run.stderr[-300:])
    return ok


def backend_for(lim: SandboxLimits) -> str:
    """The backend that will run (probed once per process and choice); SandboxUnavailable if none."""
    key = lim.backend
    if key not in _BACKEND:
        order = {"auto": ["bwrap", "unshare"], "bwrap": ["bwrap"], "unshare": ["unshare"]}[key]
        order = [b for b in order if b != "bwrap" or shutil.which("bwrap")]
        _BACKEND[key] = next((b for b in order if _probe(b)), "none")
    found = _BACKEND[key]
    if found == "none" and not lim.unsafe_code_execution:
        raise SandboxUnavailable(
            f"no kernel isolation for generated code on this host (backend {key!r}): install bubblewrap "
            "(`apt-get install bubblewrap`) or enable user namespaces (`sysctl -w user.max_user_namespaces=15000`, "
            "and `kernel.unprivileged_userns_clone=1` where that exists); only on a host you can lose, set "
            "`unsafe_code_execution: true` to run it unisolated")
    return found


def run_tests(solution: str, tests: list[str], limits: SandboxLimits | None = None) -> tuple[bool, str, SandboxRun]:
    """Run `tests` against `solution` in the sandbox: (passed, reason, the run)."""
    lim = limits or SandboxLimits()
    plan = plan_tests(tests)
    run = _run(solution, {"script_tests": plan.script_tests, "value_calls": plan.value_calls}, lim,
               backend_for(lim))
    ok, reason = judge(plan, run)
    return ok, reason, run
