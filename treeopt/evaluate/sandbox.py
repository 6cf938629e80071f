"""The sandbox that runs model-written programs (pass@1): isolation first, limits second.

:func:`run_program` runs a Python program in a fresh temporary folder and classifies its
outcome. What it does, in order of strength, each step where the platform allows it:

- **Another user.** When treeopt runs as root, the program runs as ``nobody`` (uid/gid
  65534, no supplementary groups); otherwise in a fresh user namespace where it is
  ``nobody`` and holds no capability once it runs. Either way it cannot read
  ``/proc/<pid>/environ`` of treeopt or of any other process of treeopt's user, nor signal
  or trace them. ``no_new_privs`` is set, so set-uid programs (``sudo``, ``su``) cannot give
  privileges back.
- **Own namespaces**: PID (the program sees only its own processes; a fresh ``/proc``; every
  process it starts dies with it, even one that left its process group), mount, IPC, UTS and
  an empty network namespace (no interface but a down loopback: nothing is reachable).
- **A read-only file system**: inside its mount namespace every mount is made read-only
  except the program's private working folder (its ``HOME`` and ``TMPDIR``, deleted
  afterwards). Where the interpreter lies under a folder ``nobody`` may not enter (a Python
  installed in root's home), that folder is covered by an empty in-memory one holding only
  the interpreter's installation, read-only: the rest of it stays hidden.
- **Limits** (rlimits, set before the program starts): address space, CPU time, size of any
  file written (stdout and stderr too), no core dumps, processes of the user (binding now
  that the user is ``nobody``), a wall-clock timeout after which the whole process group is
  killed, and an environment of only ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG``.
- HumanEval's ``reliability_guard`` (in the program itself, see ``passk.GUARD``): stops
  accidents, not attacks.

What was achieved is reported per program (:class:`Isolation`, one line; :func:`probe`
runs an empty program to find out). When a machine gives nothing but the limits (no way to
change user, no mount namespace), scoring refuses to run model-written code unless asked
to (``Limits.allow_unisolated``).

Compared with the HumanEval and bigcode harnesses: their ``reliability_guard`` only
disables functions inside the program's own interpreter (``ctypes`` or a re-import gets
around it) and sets memory limits; the program runs as the calling user with its whole file
system and network. This sandbox keeps their guard and adds the user, namespace and
read-only boundaries above, enforced by the kernel.

Not isolated even at best: the kernel itself (a kernel exploit escapes every namespace;
there is no seccomp filter), files that ``nobody`` may read (world-readable files, read-only),
Unix sockets bound in the file system that ``nobody`` may connect to, and the machine's
CPU and memory beyond the per-process limits (no cgroup). A container or a virtual machine
is a stronger boundary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from treeopt.evaluate.errors import EvalError

#: The first stderr line the launcher writes: ``<prefix> user=... pid=0|1 fs=0|1 net=0|1``.
SANDBOX_PREFIX = "treeopt-sandbox"
#: uid and gid of ``nobody``.
NOBODY = 65534


class SandboxError(EvalError):
    """The sandbox cannot run programs as asked; the message is one line."""


@dataclass(frozen=True)
class Limits:
    """What a program may use. timeout_s: wall clock (the process group is killed after
    it); memory_mb: address space; cpu_s: CPU seconds (None: the timeout + 1); file_mb:
    largest file written (stdout and stderr too); nproc: processes of the user
    (``RLIMIT_NPROC``; binds the ``nobody`` the program runs as, not root); output_chars:
    how much of stdout/stderr a result keeps; isolate_network: an empty network namespace;
    allow_unisolated: score even where the sandbox achieves nothing but the limits."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int | None = None
    file_mb: int = 16
    nproc: int = 64
    output_chars: int = 2000
    isolate_network: bool = True
    allow_unisolated: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 3600):
            raise SandboxError(f"the pass@1 timeout must be in (0, 3600] seconds, got "
                               f"{self.timeout_s!r}")
        for name in ("memory_mb", "file_mb", "nproc", "output_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SandboxError(f"pass@1 limit {name} must be a positive integer, "
                                   f"got {v!r}")
        if self.memory_mb < 64:
            raise SandboxError(f"pass@1 memory limit {self.memory_mb} MiB is too small for "
                               "Python to start; give at least 64")

    def rlimits(self) -> list[tuple[str, int]]:
        cpu = self.cpu_s if self.cpu_s is not None else int(math.ceil(self.timeout_s)) + 1
        return [("RLIMIT_AS", self.memory_mb << 20), ("RLIMIT_CPU", cpu),
                ("RLIMIT_FSIZE", self.file_mb << 20), ("RLIMIT_CORE", 0),
                ("RLIMIT_NPROC", self.nproc)]

    def key(self) -> str:
        """The limits that can change an outcome, as text for the results cache."""
        return f"t{self.timeout_s:g}/m{self.memory_mb}/c{self.cpu_s}/f{self.file_mb}"


@dataclass(frozen=True)
class Isolation:
    """What the sandbox achieved for one program. user: "nobody" (another user), "userns"
    (``nobody`` without capabilities in a user namespace; treeopt's user outside it) or
    "same" (treeopt's user); pid_ns: own PID namespace and /proc; read_only: the file system is
    read-only outside the working folder; network: an empty network namespace."""

    user: str = "same"
    pid_ns: bool = False
    read_only: bool = False
    network: bool = False

    @classmethod
    def parse(cls, line: str) -> "Isolation":
        """From the launcher's first stderr line (no line: nothing was achieved)."""
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        return cls(fields.get("user", "same"), fields.get("pid") == "1",
                   fields.get("fs") == "1", fields.get("net") == "1")

    @property
    def rlimits_only(self) -> bool:
        """Neither another user nor a read-only file system: only the limits hold."""
        return self.user == "same" and not self.read_only

    def describe(self) -> str:
        """One line, e.g. "user nobody, own PID namespace, read-only file system outside
        the work folder, no network"."""
        if self.rlimits_only and not self.pid_ns and not self.network:
            return ("rlimits only: same user as treeopt, file system writable, network "
                    "reachable")
        parts = [{"nobody": "user nobody",
                  "userns": "user nobody in a user namespace (treeopt's user outside)"}.get(
                      self.user, "SAME user as treeopt"),
                 "own PID namespace" if self.pid_ns else "shared PID namespace",
                 "read-only file system outside the work folder" if self.read_only
                 else "WRITABLE file system",
                 "no network" if self.network else "network reachable"]
        return ", ".join(parts)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program. status: "passed" (exit 0 after every test ran),
    "failed" (an assertion of the tests failed), "timeout" (killed at the wall-clock
    limit) or "error" (anything else: an exception, a crash, a limit, an early exit);
    reason: a short line saying why (empty when passed); returncode: the exit status
    (negative: killed by that signal; None on timeout); stdout, stderr: their first
    ``output_chars`` characters; isolation: what the sandbox achieved."""

    status: str
    reason: str
    seconds: float
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    isolation: Isolation = Isolation()

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def network_isolated(self) -> bool:
        return self.isolation.network


# The launcher runs as treeopt's user, sets up isolation, and execs the program. It is run
# as its own interpreter (not a preexec_fn, which is unsafe in a process with threads).
LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
prog, work, exe = sys.argv[2], cfg["work"], cfg["exe"]
NS, UTS, IPC, USER, PID, NET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
linux = sys.platform.startswith("linux")
libc = ctypes.CDLL(None, use_errno=True) if linux else None
root = os.geteuid() == 0
got = {"user": "same", "pid": 0, "fs": 0, "net": 0}
flags = NS | UTS | IPC | PID | (NET if cfg["net"] else 0)

def unshare(f):
    return libc is not None and libc.unshare(ctypes.c_int(f)) == 0

def write(path, text):
    with open(path, "w") as fh:
        fh.write(text)

def mount(src, dst, fstype, fl, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(fl), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), "mount %s" % dst)

class Attr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64),
                ("prop", ctypes.c_uint64), ("userns", ctypes.c_uint64)]

def setattr_ro(path, ro, recursive):
    a = Attr(1 if ro else 0, 0 if ro else 1, 0, 0)
    r = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), path.encode(),
                     ctypes.c_uint(0x8000 if recursive else 0), ctypes.byref(a),
                     ctypes.c_size_t(ctypes.sizeof(a)))
    if r != 0:
        raise OSError(ctypes.get_errno(), "mount_setattr %s" % path)

mode = None
if linux:
    if root and unshare(flags):
        mode = "root"
    elif unshare(flags | USER):
        mode = "userns"
        try:
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", "%d %d 1" % (65534, os.getuid()))
            write("/proc/self/gid_map", "%d %d 1" % (65534, os.getgid()))
        except OSError:
            pass
    elif cfg["net"] and (unshare(NET) or unshare(NET | USER)):
        got["net"] = 1
if mode:
    got["net"] = 1 if cfg["net"] else 0

def setup_mounts():
    """In the new mount namespace: the interpreter made reachable, /proc fresh, every mount
    read-only but the work folder. Returns whether the interpreter is reachable."""
    reachable = True
    mount(None, "/", None, 0x4000 | 0x40000)  # MS_REC | MS_PRIVATE
    if mode == "root" and cfg["expose"]:
        covered = []
        try:
            # Detached copies of what is exposed (open_tree), taken before the covers hide
            # it, then attached inside the covers (move_mount).
            trees = []
            for cover, exposed in cfg["expose"]:
                fd = libc.syscall(ctypes.c_long(428), ctypes.c_int(-100), exposed.encode(),
                                  ctypes.c_uint(1 | 0o2000000 | 0x8000))  # CLONE|CLOEXEC|REC
                if fd < 0:
                    raise OSError(ctypes.get_errno(), "open_tree %s" % exposed)
                trees.append((fd, os.path.isdir(exposed)))
            for cover in sorted({c for c, _ in cfg["expose"]}):
                mount("tmpfs", cover, "tmpfs", 0x2 | 0x4, "mode=755,size=64k")
                covered.append(cover)
            for (cover, exposed), (fd, is_dir) in zip(cfg["expose"], trees):
                os.makedirs(os.path.dirname(exposed), mode=0o755, exist_ok=True)
                if is_dir:
                    os.mkdir(exposed, 0o755)
                else:
                    open(exposed, "w").close()
                if libc.syscall(ctypes.c_long(429), ctypes.c_int(fd), b"", ctypes.c_int(-100),
                                exposed.encode(), ctypes.c_uint(4)) != 0:  # F_EMPTY_PATH
                    raise OSError(ctypes.get_errno(), "move_mount %s" % exposed)
        except OSError:
            reachable = False
            for cover in reversed(covered):  # back to the file system as it was
                libc.umount2(cover.encode(), ctypes.c_int(2))  # MNT_DETACH
    mount(work, work, None, 0x1000)  # MS_BIND: its own mount, left writable
    try:
        mount("proc", "/proc", "proc", 0x2 | 0x4 | 0x8)  # nosuid, nodev, noexec
        got["pid"] = 1
    except OSError:
        try:  # no fresh /proc: hide the outer one rather than show treeopt's processes
            mount("tmpfs", "/proc", "tmpfs", 0x2 | 0x4 | 0x8, "size=4k")
        except OSError:
            pass
    try:
        setattr_ro("/", True, True)
        setattr_ro(work, False, False)
        got["fs"] = 1
    except OSError:
        pass
    return reachable

def limits():
    for name, value in cfg["rlimits"]:
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            hard = resource.getrlimit(which)[1]
            soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
            top = soft + 1 if name == "RLIMIT_CPU" else soft
            resource.setrlimit(which, (soft, top if hard == resource.RLIM_INFINITY
                                       else min(top, hard)))
        except (ValueError, OSError):
            pass

def run_program(reachable):
    if mode == "userns":
        got["user"] = "userns" if os.getuid() == 65534 else "same"
    elif root and reachable and cfg["drop"]:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            got["user"] = "nobody"
        except OSError:
            pass
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    os.chdir(work)
    limits()
    os.write(2, ("%s user=%s pid=%d fs=%d net=%d\n" % (
        cfg["prefix"], got["user"], got["pid"], got["fs"], got["net"])).encode())
    try:
        os.execve(exe, [exe, "-I", prog], dict(os.environ))
    except OSError as exc:
        os.write(2, ("sandbox: cannot start the program: %s\n" % exc).encode())
        os._exit(126)

if not mode:
    run_program(cfg["drop"] and not cfg["expose"])
r, w = os.pipe()
init = os.fork()
if init == 0:  # PID 1 of the new namespace: set up, run the program, reap, report
    os.close(r)
    try:
        reachable = setup_mounts()
    except OSError:
        reachable = not cfg["expose"]
    child = os.fork()
    if child == 0:
        os.close(w)
        run_program(reachable)
    status = 0
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            status = st
            break
    os.write(w, str(status).encode())
    os._exit(0)  # every process left in the namespace dies with it
os.close(w)
os.waitpid(init, 0)
text = os.read(r, 64)
status = int(text) if text.strip() else (128 + signal.SIGKILL) << 8
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os.kill(os.getpid(), signal.SIGKILL)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
'''


def _traversable_by_nobody(st: os.stat_result) -> bool:
    if st.st_uid == NOBODY:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == NOBODY:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def exposures(paths: list[str]) -> list[tuple[str, str]]:
    """(folder to cover, path to expose) pairs that make every path of ``paths`` reachable
    by ``nobody``: for a path below folders ``nobody`` may not enter, the highest of them is
    covered by an empty in-memory folder and the path's part below the deepest of them is
    exposed in it. Empty when every path is reachable already."""
    out: dict[str, str] = {}
    for p in paths:
        parts = Path(p).parts
        blocked = [i for i in range(1, len(parts))
                   if not _traversable_or_missing(str(Path(*parts[:i])))]
        if not blocked:
            continue
        cover = str(Path(*parts[:blocked[0]]))
        exposed = str(Path(*parts[:blocked[-1] + 1]))
        if cover == "/":
            return []  # cannot cover the root; the program then runs as treeopt's user
        out.setdefault(exposed, cover)
    kept = {e: c for e, c in out.items()
            if not any(e != o and e.startswith(o.rstrip("/") + "/") for o in out)}
    return sorted((c, e) for e, c in kept.items())


def _traversable_or_missing(folder: str) -> bool:
    try:
        return _traversable_by_nobody(os.stat(folder))
    except OSError:
        return True


def _interpreter_paths() -> list[str]:
    paths = {os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix),
             os.path.realpath(sys.prefix)}
    return sorted(paths)


def _env(home: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def read_head(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(chars * 4).decode("utf-8", errors="replace")[:chars]
    except OSError:
        return ""


def read_tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Raw:
    """What :func:`execute` saw: exit status (None: timed out), seconds, the head of stdout
    and stderr (without the launcher's line), the tail of each, what was isolated."""

    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    stdout_tail: str
    stderr_tail: str
    isolation: Isolation


def execute(program: str, limits: Limits) -> Raw:
    """Run ``program`` (Python source) isolated as far as the platform allows (see the
    module docstring) and return what it did."""
    base = Path(tempfile.mkdtemp(prefix="treeopt-passk-"))
    try:
        work = base / "work"
        work.mkdir()
        prog = base / "program.py"
        prog.write_text(program, encoding="utf-8")
        drop = hasattr(os, "geteuid") and os.geteuid() == 0
        expose = exposures(_interpreter_paths() + [str(base)]) if drop else []
        if drop:
            os.chmod(base, 0o711)  # nobody may reach program.py and work, not list them
            os.chmod(prog, 0o644)
            os.chown(work, NOBODY, NOBODY)
        out_path, err_path = base / "stdout", base / "stderr"
        cfg = {"net": limits.isolate_network, "rlimits": limits.rlimits(),
               "prefix": SANDBOX_PREFIX, "work": str(work), "base": str(base),
               "exe": sys.executable, "drop": drop, "expose": expose}
        cmd = [sys.executable, "-I", "-c", LAUNCHER, json.dumps(cfg), str(prog)]
        t0 = time.perf_counter()
        private = {"opener": lambda p, flags: os.open(p, flags, 0o600)}  # not for nobody
        with open(out_path, "wb", **private) as out, open(err_path, "wb", **private) as err:
            proc = subprocess.Popen(cmd, cwd=work, env=_env(str(work)), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True,
                                    close_fds=True)
            try:
                rc: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                _kill_group(proc.pid)
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout = read_head(out_path, limits.output_chars)
        stderr = read_head(err_path, limits.output_chars + 200)
        isolation = Isolation()
        if stderr.startswith(SANDBOX_PREFIX):
            head, _, stderr = stderr.partition("\n")
            isolation = Isolation.parse(head)
        tail = "\n".join(ln for ln in read_tail(err_path).splitlines()
                         if not ln.startswith(SANDBOX_PREFIX))
        return Raw(rc, round(seconds, 4), stdout, stderr[:limits.output_chars],
                   read_tail(out_path), tail, isolation)
    finally:
        shutil.rmtree(base, ignore_errors=True)


_PROBED: dict[bool, Isolation] = {}


def probe(limits: Limits = Limits()) -> Isolation:
    """What the sandbox achieves on this machine (an empty program run once per network
    setting and remembered)."""
    key = limits.isolate_network
    if key not in _PROBED:
        raw = execute("print('ok')\n", Limits(timeout_s=30.0, memory_mb=256,
                                              isolate_network=key))
        if raw.returncode != 0 or raw.stdout.strip() != "ok":
            why = (raw.stderr_tail.strip().splitlines() or [f"exit status {raw.returncode}"])[-1]
            raise SandboxError(f"the pass@1 sandbox cannot run Python on this machine "
                               f"({why[:200]}); nothing was scored")
        _PROBED[key] = raw.isolation
    return _PROBED[key]


def require_isolation(limits: Limits) -> Isolation:
    """The isolation :func:`probe` finds, after refusing (one line) to go on where only the
    limits hold unless ``limits.allow_unisolated``; then a warning goes to stderr."""
    iso = probe(limits)
    if iso.rlimits_only:
        if not limits.allow_unisolated:
            raise SandboxError(
                "the pass@1 sandbox cannot isolate programs on this machine (no other user, "
                "no read-only file system: " + iso.describe() + "); refusing to run "
                "model-written code. Run treeopt as root or where user namespaces are "
                "allowed, or pass --pass-allow-unisolated to run it anyway")
        print("WARNING: pass@1 runs model-written code with rlimits only (same user as "
              "treeopt, file system writable); it can read and change your files",
              file=sys.stderr)
    return iso
