"""The test harness that runs *inside* the code sandbox (stdlib only; copied to /task/harness.py).

Never imported by the grader: `tah/eval/sandbox.py` copies this file into the sandbox and runs it as
`python -I -S /task/harness.py`, with the task's `spec.json` and `solution.py` beside it. Two
processes, so that the verdict travels on a channel the candidate's code never holds:

    supervisor (this file's main)           fd 3: result pipe to the grader, fd 4: the run's nonce
      | fork (before reading the nonce)
      worker: closes fds 3 and 4, installs the seccomp filter, imports the candidate, runs the tests,
              sends one JSON record per test to the supervisor over its own pipe
    supervisor: reads the nonce, reads the worker's records (capped), waits for it, writes
                nonce + report to fd 3; it is not dumpable, so the worker cannot read its memory.

Value tests (`assert f(3) == 7`, split by the grader) send only the call's result, converted to
plain data by exact type (never calling a method of an object the candidate made): the expected
value never enters the sandbox and the grader compares outside. Script tests (anything else) run
here with every comparison and truth test routed through `_tah_cmp` / `_tah_truth`, which refuse
operands that are not plain data, and the candidate's functions wrapped so that what they return is
plain. Run by hand (outside any sandbox, for debugging only):

    python tah/eval/sandbox_harness.py   # expects spec.json + solution.py in the cwd and fds 3, 4 open
"""

import json
import os
import struct
import sys

TASK = os.environ.get("TAH_TASK_DIR", "/task")
RECORD_CAP = 8 * 2**20  # bytes of worker records the supervisor reads at most
MAX_NODES, MAX_DEPTH, MAX_CHARS = 100_000, 64, 4 * 2**20

# ---------------------------------------------------------------------------------------------------
# plain data: exact built-in types only (a subclass could override __eq__ / __hash__ / __iter__)
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_CONTAINERS = (list, tuple, dict, set, frozenset)


class NotPlain(TypeError):
    pass


def encode(x, _budget=None, _depth=0):
    """Plain data -> a tagged JSON-able value; NotPlain for anything else. Walks by `type(x) is ...`
    and built-in iteration only, so no method of a candidate-made object runs."""
    b = _budget if _budget is not None else [MAX_NODES, MAX_CHARS]
    b[0] -= 1
    if b[0] < 0 or _depth > MAX_DEPTH:
        raise NotPlain("result too large or too deep")
    t = type(x)
    if t is type(None) or t is bool:
        return x
    if t is int:
        s = int.__repr__(x)
        b[1] -= len(s)
        if b[1] < 0:
            raise NotPlain("result too large")
        return ["int", s]
    if t is float or t is complex:
        return [t.__name__, t.__repr__(x)]
    if t is str:
        b[1] -= len(x)
        if b[1] < 0:
            raise NotPlain("result too large")
        return ["str", x]
    if t is bytes:
        b[1] -= 2 * len(x)
        if b[1] < 0:
            raise NotPlain("result too large")
        return ["bytes", bytes.hex(x)]
    if t is list or t is tuple or t is set or t is frozenset:
        return [t.__name__, [encode(v, b, _depth + 1) for v in t.__iter__(x)]]
    if t is dict:
        return ["dict", [[encode(k, b, _depth + 1), encode(v, b, _depth + 1)] for k, v in dict.items(x)]]
    raise NotPlain(f"a {t.__name__!s} is not plain data (only None, bool, int, float, complex, str, bytes, "
                   "list, tuple, dict, set, frozenset compare safely)")


def check_plain(x):
    encode(x)
    return x


def _tah_cmp(left, ops, rights):
    """`left op1 r1 op2 r2 ...` with plain operands only (rights are thunks: chained comparisons
    evaluate each operand once and lazily, as Python does)."""
    import operator

    table = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
             "GtE": operator.ge, "Is": operator.is_, "IsNot": operator.is_not,
             "In": lambda a, b: operator.contains(b, a), "NotIn": lambda a, b: not operator.contains(b, a)}
    a = check_plain(left)
    for op, thunk in zip(ops, rights):
        b = check_plain(thunk())
        r = table[op](a, b)
        if type(r) is not bool:
            raise NotPlain("comparison gave a non-bool")
        if not r:
            return False
        a = b
    return True


def _tah_truth(x):
    return bool(check_plain(x))


_FUNCTION = type(lambda: None)


def _plain_returning(fn):
    def wrapper(*args, **kwargs):
        return check_plain(fn(*args, **kwargs))

    wrapper.__name__ = getattr(fn, "__name__", "candidate")
    return wrapper


# ---------------------------------------------------------------------------------------------------
# seccomp: no new processes, no exec, no tracing, no namespace or kernel-admin calls
_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_NR = {  # syscall numbers: (x86_64, aarch64); -1 = absent on that architecture
    "fork": (57, -1), "vfork": (58, -1), "execve": (59, 221), "execveat": (322, 281), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268), "bpf": (321, 280),
    "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "kexec_load": (246, 104), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224),
    "swapoff": (168, 225), "acct": (163, 89), "personality": (135, 92), "syslog": (103, 116),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "pidfd_getfd": (438, 438),
    "kcmp": (312, 272), "setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145),
    "setresuid": (117, 147), "setregid": (114, 143), "setresgid": (119, 149), "setgroups": (116, 159),
}
_CLONE, _CLONE3, _CLONE_THREAD = (56, 220), (435, 435), 0x00010000
EPERM, ENOSYS = 1, 38


def seccomp_program(machine: str) -> bytes:
    """The BPF filter as bytes (struct sock_filter[]); ValueError on an architecture without a table."""
    if machine not in _ARCH:
        raise ValueError(f"no seccomp table for {machine}")
    a = 0 if machine == "x86_64" else 1
    ins = []

    def op(code, jt, jf, k):
        ins.append(struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF))

    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
    op(ld, 0, 0, 4)                               # A = arch
    op(jeq, 1, 0, _ARCH[machine])
    op(ret, 0, 0, kill)
    op(ld, 0, 0, 0)                               # A = syscall number
    if machine == "x86_64":
        op(jge, 0, 1, 0x40000000)                 # the x32 ABI: refuse outright
        op(ret, 0, 0, kill)
    op(jeq, 0, 4, _CLONE[a])                      # clone: threads only
    op(ld, 0, 0, 16)                              # A = low word of arg0 (flags)
    op(jset, 0, 1, _CLONE_THREAD)
    op(ret, 0, 0, allow)
    op(ret, 0, 0, errno | EPERM)
    op(jeq, 0, 1, _CLONE3[a])                     # clone3: ENOSYS makes libc fall back to clone
    op(ret, 0, 0, errno | ENOSYS)
    for nrs in _NR.values():
        if nrs[a] >= 0:
            op(jeq, 0, 1, nrs[a])
            op(ret, 0, 0, errno | EPERM)
    op(ret, 0, 0, allow)
    return b"".join(ins)


def install_seccomp() -> str:
    """Install the filter on this process (and its future threads); returns 'on' or why not."""
    import ctypes

    try:
        prog = seccomp_program(os.uname().machine)
    except ValueError as e:
        return f"off ({e})"

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:        # PR_SET_NO_NEW_PRIVS
        return f"off (no_new_privs: errno {ctypes.get_errno()})"
    fprog = SockFprog(len(prog) // 8, prog)
    if libc.prctl(22, 2, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        return f"off (errno {ctypes.get_errno()})"
    return "on"


def _set_dumpable(flag: int) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(4, flag, 0, 0, 0)     # PR_SET_DUMPABLE


# ---------------------------------------------------------------------------------------------------
def _send(fd: int, rec: dict) -> None:
    data = (json.dumps(rec) + "\n").encode("utf-8", "surrogatepass")
    while data:
        data = data[os.write(fd, data):]


def worker(out: int, spec: dict) -> None:
    """Import the candidate and run the tests; one record per test on `out`."""
    import ast

    seccomp = install_seccomp() if spec.get("seccomp", True) else "off (allow_processes)"
    _send(out, {"seccomp": seccomp})
    ns: dict = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        with open(os.path.join(TASK, "solution.py"), encoding="utf-8", errors="surrogateescape") as f:
            src = f.read()
        exec(compile(src, "solution.py", "exec"), ns)
    except BaseException as e:  # SystemExit included: exiting while being imported fails the problem
        _send(out, {"import_error": f"{type(e).__name__}: {str(e)[:300]}"})
        return
    tns = {k: (_plain_returning(v) if type(v) is _FUNCTION else v) for k, v in ns.items()}
    tns.update(_tah_cmp=_tah_cmp, _tah_truth=_tah_truth)
    for k, code in enumerate(spec["script_tests"]):
        try:
            exec(compile(ast.parse(code), f"test_{k}.py", "exec"), tns)
            _send(out, {"script": k, "ok": True})
        except BaseException as e:
            _send(out, {"script": k, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    for k, call in enumerate(spec["value_calls"]):
        try:
            _send(out, {"value": k, "result": encode(eval(compile(call, f"value_{k}", "eval"), tns))})
        except BaseException as e:
            _send(out, {"value": k, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    _send(out, {"done": True})


def supervisor() -> int:
    with open(os.path.join(TASK, "spec.json")) as f:
        spec = json.load(f)
    _set_dumpable(0)  # the worker (same uid) may not ptrace us or read /proc/<pid>/mem or /fd
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(3)
        os.close(4)
        _set_dumpable(1)
        try:
            worker(w, spec)
        finally:
            for stream in (sys.stdout, sys.stderr):  # what the candidate printed, for the grader's log
                try:
                    stream.flush()
                except BaseException:
                    pass
            os._exit(0)
    os.close(w)
    if spec.get("seccomp", True):
        install_seccomp()
    nonce = os.read(4, 256).decode().strip()  # read only now: the worker never had it
    os.close(4)
    chunks, size = [], 0
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        if size < RECORD_CAP:
            chunks.append(b[:RECORD_CAP - size])
        size += len(b)
    _, status = os.waitpid(pid, 0)
    records = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if type(rec) is dict:
            records.append(rec)
    report = {"records": records, "worker_status": status, "truncated": size > RECORD_CAP}
    data = (nonce + "\n" + json.dumps(report)).encode()
    while data:
        data = data[os.write(3, data):]
    os.close(3)
    return 0


if __name__ == "__main__":
    sys.exit(supervisor())
