"""The code sandbox's launcher: namespaces, mounts, privilege drop, rlimits, then exec (stdlib only).

`tah/eval/sandbox.py` runs it as `python -I -S sandbox_init.py CONFIG.json` in a new session; it is
never imported. Two modes:

- `unshare`: the launcher does what bubblewrap would, through the raw syscalls (ctypes):
  new mount namespace (plus a user namespace unless it runs as root), a fresh root on tmpfs holding
  only the shared libraries, the Python runtime (read-only, at its own path: its RUNPATH is absolute),
  the task directory (read-only) and a size-limited tmpfs working directory; then new PID, network,
  IPC and UTS namespaces; the first child (PID 1 there) mounts /proc, chroots, drops to uid/gid 65534
  (setuid as root; a nested user namespace mapping 65534 otherwise), sets PR_SET_PDEATHSIG so that
  killing the launcher kills PID 1 and with it the whole namespace, and execs the harness.
- `bwrap`: when the grader runs as root, a private mount namespace first makes the Python runtime
  reachable by uid 65534 (it may live under /root, mode 0700) and the launcher drops to 65534; then
  it runs bubblewrap with the command line the grader built, as the subreaper of what it leaves.

In both, the rlimits are set just before the exec, and the result / nonce pipes are moved to
fds 3 and 4.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS = 0x40000000, 0x08000000, 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"sandbox: {what}: {os.strerror(e)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def bind_ro(src: str, target: str) -> None:
    """Read-only bind. The remount must repeat the flags the source mount already has (a user
    namespace may not clear locked nosuid/nodev/noexec), so they are read from statvfs."""
    mount(src, target, None, MS_BIND | MS_REC)
    keep = os.statvfs(src).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mkpath(root: str, path: str, file: bool = False) -> str:
    full = root + path
    os.makedirs(os.path.dirname(full) if file else full, exist_ok=True)
    if file and not os.path.exists(full):
        open(full, "w").close()
    return full


def build_root(cfg: dict) -> str:
    """The sandbox's filesystem, under cfg['dir']/root, in the current (private) mount namespace."""
    root = os.path.join(cfg["dir"], "root")
    os.makedirs(root, exist_ok=True)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["ro_paths"]:                      # shared libraries and the Python runtime
        src = path if not os.path.islink(path) else None
        if src is None:                              # /lib -> usr/lib: recreate the link
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(os.readlink(path), root + path)
            continue
        bind_ro(cfg["sources"].get(path, path), _mkpath(root, path))
    bind_ro(os.path.join(cfg["dir"], "task"), _mkpath(root, "/task"))
    mount("tmpfs", _mkpath(root, "/work"), "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['disk_bytes']},mode=1777")
    _mkpath(root, "/dev")
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        mount(dev, _mkpath(root, dev, file=True), None, MS_BIND)
    _mkpath(root, "/proc")
    return root


def set_limits(lim: dict) -> None:
    for name, value in lim.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def move_fds(cfg: dict) -> None:
    """The result pipe to fd 3 and the nonce pipe to fd 4 (what the harness expects)."""
    import fcntl

    res, non = cfg["fds"]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (res, non)]  # out of the way of 3 and 4
    for fd in {res, non} - {3, 4}:
        os.close(fd)
    for src, dst in zip(high, (3, 4)):
        os.dup2(src, dst, inheritable=True)
        os.close(src)


def drop_to(uid: int, gid: int, as_root: bool) -> None:
    if as_root:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("sandbox: the privilege drop did not take")
    else:  # we are root of our own user namespace: nest one more that maps only uid/gid 65534
        unshare(CLONE_NEWUSER)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} 0 1")
        _write("/proc/self/gid_map", f"{gid} 0 1")


def run_unshare(cfg: dict) -> int:
    as_root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWNS | (0 if as_root else CLONE_NEWUSER))
    if not as_root:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = build_root(cfg)
    unshare(CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    launcher = os.getpid()
    pid = os.fork()
    if pid:  # the launcher: stays outside, so that killing it (the grader's deadline) ends the namespace
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    try:  # PID 1 of the new namespace
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chroot(root)
        os.chdir("/work")
        drop_to(cfg["uid"], cfg["gid"], as_root)
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG (after the uid change, which clears it)
        if os.getppid() != 0 and os.getppid() != launcher:
            os._exit(125)                              # the launcher is already gone
        set_limits(cfg["rlimits"])
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "/task/harness.py"], cfg["env"])
    except BaseException as e:
        os.write(2, f"sandbox launcher: {e}\n".encode())
        os._exit(125)


def run_bwrap(cfg: dict) -> int:
    if os.geteuid() == 0:  # stage 0: make the runtime reachable for uid 65534, then become it
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        for dst, src in cfg["stage0_binds"].items():
            bind_ro(src, dst)
        drop_to(cfg["uid"], cfg["gid"], as_root=True)
        die_with_parent()
    # bubblewrap's parent exits without reaping the namespace's PID 1, which the host's init may
    # never reap either (zombies of uid 65534 count against RLIMIT_NPROC): be their subreaper.
    _libc.prctl(36, 1, 0, 0, 0)                       # PR_SET_CHILD_SUBREAPER
    pid = os.fork()
    if pid == 0:
        try:
            set_limits(cfg["rlimits"])
            os.execv(cfg["bwrap"][0], cfg["bwrap"])
        finally:
            os._exit(125)
    status = 0
    while True:
        try:
            done, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if done == pid:
            status = st
    return os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def die_with_parent() -> None:
    """SIGKILL when the grader that started us dies (a grading worker killed at an item's deadline):
    our own death then ends the namespace. Set again after every uid change, which clears it."""
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)           # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(125)


def main() -> int:
    die_with_parent()
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    move_fds(cfg)
    try:
        return run_unshare(cfg) if cfg["mode"] == "unshare" else run_bwrap(cfg)
    except OSError as e:
        os.write(2, f"sandbox launcher: {e}\n".encode())
        return 125


if __name__ == "__main__":
    sys.exit(main())
