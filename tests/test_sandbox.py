"""The code sandbox against a hostile corpus: one program per attack class, on every backend here.

Each hostile program is written so that it would *pass* its tests if the attack worked (it defines
the right function only when the escape succeeded), so "it fails" means "the attack failed"; where
an attack leaves traces outside (files, connections, processes, the grader's health) the test
checks those too. After the corpus, correct programs still grade correctly.

    .venv/bin/python -m pytest -q tests/test_sandbox.py
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time

import pytest

from tah.eval import sandbox
from tah.eval.grading import grade_code, grade_many, last_boxed
from tah.eval.sandbox import SandboxLimits, SandboxUnavailable, plan_tests, run_tests

BACKENDS = ["unshare"] + (["bwrap"] if shutil.which("bwrap") else [])
TESTS = ["assert f(1) == 3", "assert f(10) == 21"]
GOOD = "def f(x):\n    return 2 * x + 1\n"
FAST = dict(cpu_seconds=2, wall_seconds=8)  # wall: generous, the machine may be busy


def lim(backend: str, **kw) -> SandboxLimits:
    return SandboxLimits(backend=backend, **{**FAST, **kw})


def if_escaped(cond: str) -> str:
    """A program that is correct only when `cond` (the attack) evaluated true."""
    return f"_escaped = bool({cond})\ndef f(x):\n    return 2 * x + 1 if _escaped else -1\n"


def attempt(body: str) -> str:
    """`body` sets `ok = True` when its attack succeeded; any exception means it did not."""
    return "ok = False\ntry:\n" + "".join("    " + ln + "\n" for ln in body.splitlines()) + \
        "except BaseException:\n    pass\n" + if_escaped("ok")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Things outside the sandbox that attacks aim at: a file, a directory, a listener, a secret."""
    d = tmp_path_factory.mktemp("host")
    (d / "victim.txt").write_text("intact")
    os.chmod(d, 0o777)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    os.environ["TAH_TEST_SECRET"] = "s3cr3t-grader-env"
    yield {"dir": d, "port": srv.getsockname()[1], "accepted": accepted}
    stop.set()
    t.join()
    srv.close()
    os.environ.pop("TAH_TEST_SECRET", None)


def hostile_corpus(h) -> dict[str, str]:
    victim, port, me = h["dir"] / "victim.txt", h["port"], os.getpid()
    d = h["dir"]
    return {
        # the old audit-hook guard and anything like it: gone is gone, the kernel still says no
        "escape the hook": attempt("import sys\nsys.audit = lambda *a: None\n"
                                   f"open({str(d / 'hook.txt')!r}, 'w').write('x')\nok = True"),
        # every route to a new process
        "os.system": attempt("import os\nok = os.system('true') == 0"),
        "subprocess": attempt("import subprocess, sys\nok = subprocess.run([sys.executable, '-c', '1']).returncode == 0"),
        "os.fork": attempt("import os\npid = os.fork()\nif pid == 0: os._exit(0)\nok = True"),
        "os.posix_spawn": attempt("import os, sys\nos.posix_spawn(sys.executable, [sys.executable, '-c', '1'], {})\nok = True"),
        "os.spawnv": attempt("import os, sys\nok = os.spawnv(os.P_WAIT, sys.executable, [sys.executable, '-c', '1']) == 0"),
        "multiprocessing": attempt("import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n"
                                   "ok = p.exitcode == 0"),
        "pty.spawn": attempt("import pty, sys\npty.spawn([sys.executable, '-c', '1'])\nok = True"),
        "os.exec": attempt("import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'print(1)'])"),
        "raw fork syscall": attempt("import ctypes\nok = ctypes.CDLL(None).syscall(57) >= 0"),
        "raw clone syscall": attempt("import ctypes\nok = ctypes.CDLL(None).syscall(56, 17, 0, 0, 0, 0) >= 0"),
        "fork bomb": ("import os\nwhile True:\n    os.fork()\n" + GOOD, "Operation not permitted"),
        # the filesystem outside
        "write outside": attempt(f"open({str(victim)!r}, 'w').write('pwned')\nok = True"),
        "create outside": attempt(f"open({str(d / 'new.txt')!r}, 'x').write('x')\nok = True"),
        "rename outside": attempt(f"import os\nos.rename({str(victim)!r}, {str(d / 'moved.txt')!r})\nok = True"),
        "link outside": attempt(f"import os\nos.link({str(victim)!r}, 'here.txt')\nok = True"),
        "symlink outside": attempt(f"import os\nos.symlink({str(victim)!r}, 'l')\nok = open('l').read() == 'intact'"),
        "truncate outside": attempt(f"import os\nos.truncate({str(victim)!r}, 0)\nok = True"),
        "delete outside": attempt(f"import os\nos.remove({str(victim)!r})\nok = True"),
        "write the runtime": attempt("import os, sys\nopen(os.path.join(sys.prefix, 'pwn.txt'), 'w')\nok = True"),
        "write the task": attempt("open('/task/harness.py', 'a').write('#')\nok = True"),
        "read host files": attempt("ok = len(open('/etc/passwd').read()) > 0"),
        "see the host root": attempt("import os\nok = bool({'etc', 'home', 'tmp', 'var'} & set(os.listdir('/')))"),
        # processes and the grader
        "read another process's environment": attempt(
            "import os\nfor p in os.listdir('/proc'):\n    try:\n"
            "        ok = ok or b's3cr3t' in open(f'/proc/{p}/environ', 'rb').read()\n    except OSError:\n        pass"),
        "see the grader": attempt(f"import os\nok = os.path.exists('/proc/{me}')"),
        "signal the grader": attempt(f"import os, signal\nos.kill({me}, signal.SIGKILL)\nok = True"),
        "signal everyone": attempt("import os, signal\nos.kill(-1, signal.SIGKILL)\nok = True"),
        "ptrace the supervisor": attempt("import ctypes\nok = ctypes.CDLL(None).ptrace(16, 1, 0, 0) == 0"),
        "read the supervisor's memory": attempt("ok = len(open('/proc/1/mem', 'rb').read(1)) > 0"),
        "steal the verdict pipe": attempt("import os\nfd = os.open('/proc/1/fd/3', os.O_WRONLY)\nos.write(fd, b'x')\nok = True"),
        "write the verdict fd": attempt("import os\nos.write(3, b'forged\\n{}')\nok = True"),
        "new user namespace": attempt("import ctypes\nok = ctypes.CDLL(None).unshare(0x10000000) == 0"),
        "mount": attempt("import ctypes\nok = ctypes.CDLL(None).mount(b'none', b'/work', b'tmpfs', 0, None) == 0"),
        # the network
        "socket to the host": attempt(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nok = True"),
        "socket anywhere": attempt("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\nok = True"),
        # resources
        "allocate 10 GB": ("b = bytearray(10 * 1024 ** 3)\n" + GOOD, "MemoryError"),
        "loop forever": ("while True:\n    pass\n" + GOOD, "did not finish|wall-clock"),  # RLIMIT_CPU, or the clock under load
        "sleep forever": ("import time\ntime.sleep(3600)\n" + GOOD, "wall-clock"),
        "huge output": ("import sys\nchunk = 'x' * 2 ** 20\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n" + GOOD,
                        "BrokenPipeError"),
        "fill the disk, one file": attempt("with open('big', 'wb') as fh:\n    for _ in range(64):\n"
                                           "        fh.write(b'x' * 2 ** 20)\nok = True"),
        "fill the disk, many files": attempt("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * 2 ** 20 * 8)\nok = True"),
        "open every file": attempt("fs = [open('/dev/null') for _ in range(100000)]\nok = True"),
        # the verdict
        "exit early": ("import os\nos._exit(0)\n" + GOOD, "did not finish"),
        "sys.exit at import": ("import sys\nsys.exit(0)\n" + GOOD, "SystemExit"),
        "exit inside the call": ("def f(x):\n    import os\n    os._exit(0)\n", "did not finish"),
        "print a fake verdict": ("print('ok'); print('{\"done\": true}')\nimport os\nos._exit(0)\n", "did not finish"),
        "always-equal object": ("class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
                                "def f(x):\n    return A()\n", "not plain data"),
        "int subclass": ("class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                         "def f(x):\n    return I(0)\n", "not plain data"),
        "read the expected values": attempt("import sys, gc\nok = any(type(o) is dict and 'expected' in o for o in gc.get_objects())"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_programs_fail_and_leave_no_trace(backend, host):
    corpus = hostile_corpus(host)
    results = {}
    t_all = time.monotonic()
    for name, entry in corpus.items():
        program, expect = entry if isinstance(entry, tuple) else (entry, "gave -1")  # attempt(): ran, attack failed
        t = time.monotonic()
        ok, reason, run = run_tests(program, TESTS, lim(backend))
        results[name] = (ok, reason, time.monotonic() - t, expect)
        assert run.backend == backend
    escaped = {k: v for k, v in results.items() if v[0]}
    assert not escaped, escaped
    # failed for the reason the attack meets, not because the sandbox itself broke down
    wrong = {k: v[1] for k, v in results.items() if not re.search(v[3], v[1])}
    assert not wrong, wrong
    slow = {k: v for k, v in results.items() if v[2] > FAST["wall_seconds"] + 3}
    assert not slow, slow  # every item ends by its deadline (plus teardown)
    assert (host["dir"] / "victim.txt").read_text() == "intact"
    assert sorted(p.name for p in host["dir"].iterdir()) == ["victim.txt"]
    assert host["accepted"] == []
    assert not _sandbox_processes(), "a sandboxed process outlived its run"
    # and the grader still grades correctly afterwards
    assert run_tests(GOOD, TESTS, lim(backend))[0]
    assert not run_tests(GOOD.replace("+ 1", "+ 2"), TESTS, lim(backend))[0]
    print(f"\n{backend}: {len(corpus)} hostile programs, all failed, {time.monotonic() - t_all:.1f} s")


def _sandbox_processes() -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if b"/task/harness.py" in open(f"/proc/{p}/cmdline", "rb").read():
                    pids.append(int(p))
            except OSError:
                pass
    return pids


PROBE = """import os, socket, json
facts = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "procs": sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
         "root": sorted(os.listdir('/')), "cwd": os.getcwd(), "env": sorted(os.environ)}
for line in open('/proc/self/status'):
    k, _, v = line.partition(':')
    if k in ('CapEff', 'NoNewPrivs', 'Seccomp'):
        facts[k] = v.strip()
facts["ifaces"] = sorted(n for _, n in socket.if_nameindex())
st = os.statvfs('/work')
facts["disk"] = st.f_blocks * st.f_frsize
print(json.dumps(facts))
def f(x):
    return 2 * x + 1
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sandbox_is_what_it_says(backend):
    import json

    ok, reason, run = run_tests(PROBE, TESTS, lim(backend, disk_mb=8))
    assert ok, (reason, run.stderr)
    facts = json.loads(run.stdout.decode().splitlines()[-1])
    assert (facts["uid"], facts["gid"]) == (65534, 65534)
    assert facts["CapEff"] == "0000000000000000" and facts["NoNewPrivs"] == "1" and facts["Seccomp"] == "2"
    assert run.seccomp == "on"
    assert max(facts["procs"]) <= 3                  # its own PID namespace: the supervisor, the worker
    assert facts["ifaces"] == ["lo"]                 # no interface but loopback
    assert facts["cwd"] == "/work" and facts["disk"] <= 8 * 2**20
    runtime_top = sandbox._python()[1].split("/")[1]   # the runtime sits at its own path (absolute RUNPATH)
    assert set(facts["root"]) <= {"usr", "lib", "lib64", "task", "work", "dev", "proc", runtime_top}
    assert "TAH_TEST_SECRET" not in facts["env"] and "AWS_SECRET_ACCESS_KEY" not in facts["env"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_outlives_the_deadline(backend):
    """Processes allowed (no seccomp): a daemon that double-forks and setsid()s still dies with the run."""
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
              "    os._exit(0)\ntime.sleep(60)\n" + GOOD)
    t = time.monotonic()
    ok, reason, run = run_tests(daemon, TESTS, lim(backend, allow_processes=True, wall_seconds=2))
    assert not ok and "wall-clock" in reason
    assert time.monotonic() - t < 10
    time.sleep(0.5)
    assert not _sandbox_processes()


def test_value_tests_keep_expected_values_outside():
    plan = plan_tests(["assert f(1) == 3", "assert 21 == f(10)", "import math\nassert math.isclose(f(2), 5.0)",
                       "def check(candidate):\n    assert candidate([1, 2]) == [3, 5]\n    assert abs(candidate(0)) < 2\n",
                       "check(g)"])
    assert plan.value_calls == ["f(1)", "f(10)", "g([1, 2])"] and plan.expected == [3, 21, [3, 5]]
    assert "21" not in "".join(plan.script_tests) and "[3, 5]" not in "".join(plan.script_tests)
    assert any("_tah_cmp" in s for s in plan.script_tests) and any("_tah_truth" in s for s in plan.script_tests)


def test_plain_comparisons_follow_python():
    prog = "def f(x):\n    return {'t': (1, 2.5), 'l': [b'x', None, True], 's': {1, 2}, 'big': 10 ** 40}\n"
    assert run_tests(prog, ["assert f(0) == {'t': (1, 2.5), 'l': [b'x', None, True], 's': {2, 1}, 'big': 10 ** 40}"])[0]
    assert not run_tests(prog, ["assert f(0) == {'t': [1, 2.5], 'l': [b'x', None, True], 's': {2, 1}, 'big': 10 ** 40}"])[0]
    assert run_tests("def f(x):\n    return 1.0\n", ["assert f(0) == 1"])[0]            # 1.0 == 1, as in Python
    assert run_tests("def f(x):\n    return [x, x]\n", ["assert len(f(3)) == 2 and f(3)[0] < 4"])[0]


def test_no_isolation_refuses_unless_waived(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "_probe", lambda backend: False)
    monkeypatch.setattr(sandbox, "_BACKEND", {})
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_tests(GOOD, TESTS)
    with pytest.raises(SandboxUnavailable):
        grade_many([("code", f"```python\n{GOOD}```", "", TESTS)])
    ok, _, run = run_tests(GOOD, TESTS, SandboxLimits(unsafe_code_execution=True))
    assert ok and run.backend == "none"
    assert "without isolation" in capsys.readouterr().err
    assert not run_tests(GOOD.replace("+ 1", "- 1"), TESTS, SandboxLimits(unsafe_code_execution=True))[0]


def test_grade_many_deadline_per_item_and_worker_replaced(monkeypatch):
    """A hung item is killed at its own deadline; items queued behind it are graded normally."""
    slow_code = "```python\nimport time\ntime.sleep(3600)\n```"
    good = f"```python\n{GOOD}```"
    items = [("code", slow_code, "", TESTS), ("math", r"\boxed{4}", "4", []), ("code", good, "", TESTS),
             ("choice", r"\boxed{B}", "B", []), ("code", good, "", TESTS)]
    t = time.monotonic()
    out = grade_many(items, workers=1, timeout=3.0,
                     limits=SandboxLimits(wall_seconds=60, cpu_seconds=60))  # the sandbox would wait 60 s
    assert [ok for ok, _ in out] == [False, True, True, True, True]
    assert time.monotonic() - t < 30
    time.sleep(0.5)
    assert not _sandbox_processes(), "the killed worker's sandbox outlived it"


def test_extraction_is_linear_on_hostile_responses():
    from tah.eval.grading import extract_choice, extract_code, extract_math

    hostile = ["\\boxed{" * 100_000, "\\boxed{" + "{" * 200_000, ("\\boxed{x}" + "}" * 10) * 20_000,
               "answer" + " " * 200_000, "answer is (" * 50_000, "A " * 100_000 + "x", "(" * 200_000,
               "```\n" * 50_000, "```python\n" + "x" * 200_000, "1" * 100_000 + "/" + "2" * 100_000,
               "-1." * 70_000]
    for text in hostile:
        t = time.monotonic()
        for extract in (last_boxed, extract_choice, extract_code, extract_math):
            extract(text)
        assert time.monotonic() - t < 2.0, text[:20]   # quadratic would take minutes here
    assert last_boxed("\\boxed{" * 1000 + "\\boxed{7}") == "7"
    assert last_boxed("a \\boxed{1} b \\boxed{2") == "1"


def test_grade_code_uses_the_sandbox():
    assert grade_code(f"```python\n{GOOD}```", TESTS) == (True, GOOD)
    assert grade_code("no code", TESTS) == (False, None)
