"""Run untrusted Python (model-written code) in a contained child process.

HumanEval executes code a language model wrote; a bad completion can loop forever, fork-bomb, delete
files, open sockets or eat all memory. Layers, outermost first, each optional so the sandbox still runs
(with less containment) where a layer is unavailable; :func:`isolation` says which ones are active:

1. ``unshare``: fresh network namespace (no network, not even loopback), PID namespace (when its
   first process exits, the kernel kills every process left inside) and mount namespace: a fresh
   ``/proc`` that shows only the sandbox's own processes, private size-limited tmpfs on ``/tmp`` (the
   working directory lives there) and ``/dev/shm`` that vanish with the run, and every other mount
   read-only. As root also a drop to an unprivileged uid (``nobody``, with no_new_privs), which makes
   RLIMIT_NPROC apply and file permissions protect the rest of the machine. Non-root users get the
   namespaces through a user namespace. Where the mount namespace cannot be set up, the sandbox runs
   without it and :func:`isolation` says why in ``notes``.
2. A pids cgroup (when writable) caps the process count regardless of uid and lets us kill stragglers.
3. ``resource`` limits set in ``preexec_fn``: address space, processes, CPU seconds, file size, no core.
4. A wall-clock timeout that SIGKILLs the whole process group, always followed by cleanup.
5. A throw-away working directory, deleted afterwards.
6. A Python-level guard run before the code: an audit hook (which Python code cannot remove) denies
   sockets, process creation, native code (ctypes) and the import of the modules that give them, and
   file writes or deletion outside the working directory (``open`` / ``io.FileIO`` / ``os.open``
   alike) with ``PermissionError``; monkeypatches on ``os`` give clearer messages on the common
   paths. It is a first filter only (Python can be escaped from Python); layers 1-3 are the wall.
"""

from __future__ import annotations

import functools
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
MEMORY_EXIT = 113  # the runner exits with this when the program dies of MemoryError
SETUP_EXIT = 114  # the mount-namespace setup exits with this when it cannot build the sandbox
MAX_OUTPUT = 64 * 1024  # bytes of stdout / stderr kept in the result
WORKDIR_PREFIX = "msn-sandbox-"


@dataclass
class SandboxResult:
    """Outcome of one run. status: passed | failed | timeout | killed (signal, memory) | error (sandbox)."""

    passed: bool
    status: str
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    returncode: int | None = None


@dataclass(frozen=True)
class Isolation:
    """The containment layers that work on this machine (probed once per process)."""

    prefix: tuple[str, ...] = ()  # command prepended to the interpreter (unshare ...)
    interpreter: str = sys.executable
    network_namespace: bool = False
    pid_namespace: bool = False
    mount_namespace: bool = False  # fresh /proc, private /tmp and /dev/shm, the rest read-only (via SETUP)
    uid: int | None = None  # uid the code runs as, when we drop privileges
    cgroup: Path | None = None  # parent pids cgroup under which each run gets its own
    notes: tuple[str, ...] = field(default=())

    @property
    def limits_processes(self) -> bool:
        """True when a fork bomb hits a kernel limit (RLIMIT_NPROC does not apply to root)."""
        return self.cgroup is not None or os.geteuid() != 0 or self.uid not in (None, 0)


# --------------------------------------------------------------------------- probing


def _runs(cmd: list[str]) -> str | None:
    """stdout of ``cmd`` if it exits 0 within a few seconds, else None."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd="/", env=_child_env("/"))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _interpreters() -> list[str]:
    """Python interpreters of our major.minor version, ours first (for the uid drop: one it can read)."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", "")]
    found += [f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}", shutil.which(f"python{ver}") or ""]
    return list(dict.fromkeys(p for p in found if p and os.path.isfile(p)))


def _pids_cgroup_parent() -> Path | None:
    """A writable pids cgroup directory (v1 controller or v2 with pids enabled), or None."""
    candidates: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/pids") / rel.lstrip("/"))
        elif controllers == "":
            for v2 in (Path("/sys/fs/cgroup") / rel.lstrip("/"), Path("/sys/fs/cgroup/unified") / rel.lstrip("/")):
                try:
                    if "pids" in (v2 / "cgroup.subtree_control").read_text().split():
                        candidates.append(v2)
                except OSError:
                    continue
    for parent in candidates:
        probe = parent / f"{WORKDIR_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            ok = (probe / "pids.max").exists()
            probe.rmdir()
        except OSError:
            continue
        if ok:
            return parent
    return None


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe the layers once: try the strongest unshare variant first, fall back step by step."""
    notes: list[str] = []
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    ver_check = "import sys; print('%d.%d' % sys.version_info[:2])"
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    pid_ns = ("--pid", "--fork", "--kill-child")
    userns = () if root else ("--user", "--map-root-user")
    variants: list[tuple[tuple[str, ...], bool, bool, int | None]] = []
    chosen = Isolation(notes=())
    why = "no usable interpreter"
    if unshare:
        mount_prefix = (unshare, *userns, "--mount", "--mount-proc", "--net", *pid_ns)
        mount_uid = NOBODY if root else None
        for interp in _interpreters():
            ok, why = _probe_mount_namespace(mount_prefix, interp, mount_uid, want)
            if ok:
                chosen = Isolation(mount_prefix, interp, True, True, True, mount_uid)
                break
        else:
            notes.append(f"no mount namespace ({why}): /proc shows host processes, /tmp and /dev/shm are shared")
        if root:
            variants.append(((unshare, "--net", *pid_ns, "-S", str(NOBODY), "-G", str(NOBODY)), True, True, NOBODY))
        variants += [((unshare, *userns, "--net", *pid_ns), True, True, None), ((unshare, *userns, "--net"), True, False, None)]
    else:
        notes.append("no unshare binary: no network / PID / mount namespace")
    for prefix, net, pid, uid in variants if not chosen.mount_namespace else []:
        interp = next((p for p in _interpreters() if _runs([*prefix, p, "-I", "-c", ver_check]) == want), None)
        if interp:
            chosen = Isolation(prefix, interp, net, pid, uid=uid)
            break
        notes.append(f"unavailable: {' '.join(prefix[1:])}")
    if root and chosen.uid is None:
        notes.append("running as root without uid drop: RLIMIT_NPROC does not apply, file permissions do not protect")
    cgroup = _pids_cgroup_parent()
    if cgroup is None:
        notes.append("no writable pids cgroup")
    return Isolation(chosen.prefix, chosen.interpreter, chosen.network_namespace, chosen.pid_namespace,
                     chosen.mount_namespace, chosen.uid, cgroup, tuple(notes))


def _setup_command(prefix: tuple[str, ...], interp: str, workdir: str, uid: int | None, tmp_mb: int,
                   shm_mb: int) -> list[str]:
    inner = "/tmp/" + os.path.basename(workdir)
    return [*prefix, interp, "-I", "-S", "-c", SETUP, workdir, inner, str(-1 if uid is None else uid),
            str(tmp_mb), str(shm_mb), interp]


def _probe_mount_namespace(prefix: tuple[str, ...], interp: str, uid: int | None, want: str) -> tuple[bool, str]:
    """Build a real sandbox once with a program that prints the version: the mount layer works end to end."""
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    try:
        Path(workdir, "solution.py").write_text("")
        Path(workdir, "_runner.py").write_text("import sys; print('%d.%d' % sys.version_info[:2])\n")
        try:
            done = subprocess.run(_setup_command(prefix, interp, workdir, uid, 1, 1), capture_output=True, text=True,
                                  timeout=20, cwd="/", env=_child_env("/"))
        except (OSError, subprocess.SubprocessError) as e:
            return False, str(e)
        if done.returncode == 0 and done.stdout.strip() == want:
            return True, ""
        lines = (done.stderr or done.stdout).strip().splitlines()
        return False, lines[-1] if lines else f"exit status {done.returncode}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the mount-namespace setup

# Runs as (namespace) root as the first process of the new namespaces, before the untrusted code: makes
# every mount private and read-only, puts fresh size-limited tmpfs on /tmp and /dev/shm, copies the two
# script files into the working directory inside the new /tmp, drops to the unprivileged uid with
# no_new_privs, and execs the runner. Any failure exits with SETUP_EXIT and one line on stderr.
SETUP = r'''
import ctypes, os, sys
src, inner, uid, tmp_mb, shm_mb, interp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
def fail(what, err=None):
    err = ctypes.get_errno() if err is None else err
    sys.stderr.write("msn sandbox setup: %s: %s\n" % (what, os.strerror(err)))
    sys.stderr.flush()
    os._exit(114)
try:
    files = {}
    for name in ("solution.py", "_runner.py"):
        with open(os.path.join(src, name), "rb") as f:
            files[name] = f.read()
except OSError as e:
    fail("reading the script", e.errno)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
if libc.mount(b"none", b"/", None, REC | PRIVATE, None) != 0:
    fail("making mounts private")
class Attr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64), ("prop", ctypes.c_uint64), ("userns", ctypes.c_uint64)]
attr = Attr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY, recursively over every mount (mount_setattr, Linux >= 5.12)
if libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
    flags = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC}
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:  # older kernels: remount each mount read-only, keeping its other flags
        point = fields[4].encode().decode("unicode_escape").encode("latin-1")
        keep = sum(flags.get(o, 0) for o in fields[5].split(","))
        if libc.mount(None, point, None, REMOUNT | BIND | RDONLY | keep, None) != 0 and point == b"/":
            fail("remounting / read-only")
opts = "size=%dm,mode=1777" % tmp_mb
if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", NOSUID | NODEV, opts.encode()) != 0:
    fail("mounting a private /tmp")
if os.path.isdir("/dev/shm"):
    opts = "size=%dm,mode=1777" % shm_mb
    if libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", NOSUID | NODEV | NOEXEC, opts.encode()) != 0:
        fail("mounting a private /dev/shm")
os.mkdir(inner, 0o700)
for name, data in files.items():
    with open(os.path.join(inner, name), "wb") as f:
        f.write(data)
    if uid >= 0:
        os.chown(os.path.join(inner, name), uid, uid)
if uid >= 0:
    os.chown(inner, uid, uid)
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as e:
        fail("dropping to uid %d" % uid, e.errno)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid binary gives privileges back
    fail("setting no_new_privs")
os.chdir(inner)
env = dict(os.environ, HOME=inner, TMPDIR=inner)
os.execve(interp, [interp, "-I", "-B", "_runner.py"], env)
'''


# --------------------------------------------------------------------------- the guard run inside the child

GUARD = r'''
import builtins as _b, io as _io, os as _os, posix as _posix, shutil as _shutil, socket as _socket
import sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())

def _inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor: opening it was checked
    real = _os.path.realpath(_os.path.join(_ROOT, _os.fsdecode(path)))
    return real == _ROOT or real.startswith(_ROOT + _os.sep) or real == "/dev/null"

def _deny(name):
    def denied(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the msn sandbox")
    return denied

def _confine(fn, name, npaths=1, first=0):
    def confined(*args, **kwargs):
        for p in args[first:npaths]:
            if not _inside(p):
                raise PermissionError(f"{name} outside the sandbox directory: {p!r}")
        return fn(*args, **kwargs)
    return confined

for _mod in (_os, _posix):
    for _n in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
               "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
               "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid",
               "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "chroot", "putenv", "unsetenv"):
        if hasattr(_mod, _n):
            setattr(_mod, _n, _deny(f"os.{_n}"))
    for _n, _k in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("rename", 2), ("renames", 2),
                   ("replace", 2), ("truncate", 1), ("chmod", 1), ("lchmod", 1), ("chown", 1), ("lchown", 1),
                   ("link", 2), ("symlink", 2), ("mkdir", 1), ("makedirs", 1), ("chdir", 1), ("utime", 1)):
        if hasattr(_mod, _n):
            setattr(_mod, _n, _confine(getattr(_mod, _n), f"os.{_n}", _k))
for _n, _k, _f in (("rmtree", 1, 0), ("chown", 1, 0), ("move", 2, 0), ("copy", 2, 1), ("copy2", 2, 1),
                   ("copyfile", 2, 1), ("copytree", 2, 1)):
    setattr(_shutil, _n, _confine(getattr(_shutil, _n), f"shutil.{_n}", _k, _f))

_real_open, _real_os_open = _b.open, _posix.open
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"writing outside the sandbox directory: {file!r}")
    return _real_open(file, mode, *args, **kwargs)
def _os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"writing outside the sandbox directory: {path!r}")
    return _real_os_open(path, flags, *args, **kwargs)
_b.open = _io.open = _open
_os.open = _posix.open = _os_open

for _n in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
           "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(_socket, _n, _deny(f"socket.{_n}"))
import _socket as _raw_socket
_raw_socket.socket = _deny("socket.socket")
_BLOCKED = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "resource", "_posixsubprocess", "multiprocessing",
                      "_multiprocessing", "psutil", "pty", "tkinter", "_tkinter", "_xxsubinterpreters"))
for _n in _BLOCKED:
    if _n != "_posixsubprocess" or _n not in _sys.modules:
        _sys.modules[_n] = None
del _mod, _n, _k

# The audit hook: unlike the patches above, nothing in Python removes it, and it sees the calls the patches
# miss (io.FileIO, a module re-imported after deleting its sys.modules entry, ...).
_DENIED = frozenset(("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
                     "os.killpg", "subprocess.Popen", "os.putenv", "os.unsetenv", "socket.__new__",
                     "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
                     "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "ctypes.dlopen", "ctypes.dlsym",
                     "ctypes.cdata", "ctypes.call_function"))
_PATHS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
          "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
          "os.chdir": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
          "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
          "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.chown": (0,), "shutil.unpack_archive": (1,),
          "shutil.make_archive": (0,)}
_DIR_FD = {"os.remove": (1,), "os.rmdir": (1,), "os.rename": (2, 3), "os.mkdir": (2,), "os.chmod": (2,),
           "os.chown": (3,), "os.link": (2, 3), "os.symlink": (2,), "os.utime": (3,)}
_busy = [False]
def _audit(event, args):
    if _busy[0]:
        return
    if event in _DENIED:
        raise PermissionError(f"{event} is disabled in the msn sandbox")
    if event == "import":
        if args[0] in _BLOCKED or args[0].split(".")[0] in _BLOCKED:
            raise PermissionError(f"import of {args[0]} is disabled in the msn sandbox")
        return
    _busy[0] = True
    try:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS)
            if writing and path is not None and not _inside(path):
                raise PermissionError(f"writing outside the sandbox directory: {path!r}")
        elif event in _PATHS:
            for i in _PATHS[event]:
                if i < len(args) and args[i] is not None and not _inside(args[i]):
                    raise PermissionError(f"{event} outside the sandbox directory: {args[i]!r}")
            for i in _DIR_FD.get(event, ()):
                if i < len(args) and isinstance(args[i], int) and args[i] >= 0:
                    raise PermissionError(f"{event} relative to a directory descriptor is disabled in the msn sandbox")
    finally:
        _busy[0] = False
_sys.addaudithook(_audit)
del _audit
'''

RUNNER = r'''
import os, sys, traceback
with open("solution.py", encoding="utf-8") as f:
    __source = f.read()
{guard}
__globals = {{"__name__": "__main__", "__builtins__": __builtins__}}
try:
    exec(compile(__source, "solution.py", "exec"), __globals)
except MemoryError:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit({memory_exit})
'''


# --------------------------------------------------------------------------- running


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class _Cgroup:
    """A per-run pids cgroup: caps process count, and lets us kill whatever is left inside."""

    def __init__(self, parent: Path, max_processes: int) -> None:
        self.path = parent / f"{WORKDIR_PREFIX}{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_processes))
        self.procs = str(self.path / "cgroup.procs")

    def kill_all(self) -> None:
        for _ in range(200):
            try:
                pids = [int(p) for p in Path(self.procs).read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)  # processes still exiting


def _limits(memory_mb: int, max_processes: int, cpu_s: int, file_mb: int, cgroup_procs: str | None):
    """The preexec_fn: only syscalls (no imports, little allocation), since it runs between fork and exec."""
    mem = memory_mb * 1024 * 1024
    fsize = file_mb * 1024 * 1024

    def apply() -> None:
        if cgroup_procs is not None:
            with open(cgroup_procs, "w") as f:  # noqa: PTH123 - join before exec so every descendant is inside
                f.write(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))  # soft = hard: SIGKILL, even for a PID-ns init
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _read(f, limit: int = MAX_OUTPUT) -> str:
    f.seek(0)
    data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for exit WITHOUT reaping (so the process-group id stays ours); True when it exited in time."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def _status(rc: int | None, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if rc is None or rc < 0 or rc == MEMORY_EXIT or rc > 128:  # signal (unshare re-raises it) or memory
        return "killed"
    return "failed"


def run_python(
    code: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 32,
    *,
    file_mb: int = 64,
    guard: bool = True,
) -> SandboxResult:
    """Run ``code`` as a script in a contained child; never raises for anything the code does.

    ``guard=False`` skips the Python-level guard (layer 6), which the tests use to prove that the OS
    layers alone contain hostile code. With the mount namespace, the private ``/tmp`` (which holds the
    working directory) and ``/dev/shm`` are limited to ``file_mb`` each and vanish with the run.
    """
    iso = isolation()
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    cgroup: _Cgroup | None = None
    proc: subprocess.Popen | None = None
    timed_out = False
    try:
        Path(workdir, "solution.py").write_text(code, encoding="utf-8", errors="replace")
        runner = RUNNER.format(guard=GUARD if guard else "", memory_exit=MEMORY_EXIT)
        Path(workdir, "_runner.py").write_text(runner, encoding="utf-8")
        os.chmod(workdir, 0o700)
        if iso.uid is not None:
            os.chown(workdir, iso.uid, iso.uid)
        if iso.cgroup is not None:
            try:
                cgroup = _Cgroup(iso.cgroup, max_processes)
            except OSError:
                cgroup = None
        if iso.mount_namespace:  # the files are copied into a private /tmp; /tmp and /dev/shm get file_mb each
            cmd = _setup_command(iso.prefix, iso.interpreter, workdir, iso.uid, file_mb, file_mb)
        else:
            cmd = [*iso.prefix, iso.interpreter, "-I", "-B", "_runner.py"]
        cpu_s = max(1, int(timeout) + 1)
        limits = _limits(memory_mb, max_processes, cpu_s, file_mb, cgroup.procs if cgroup else None)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, preexec_fn=limits, start_new_session=True,
                                        close_fds=True)
            except (OSError, subprocess.SubprocessError) as e:
                return SandboxResult(False, "error", "", f"sandbox failed to start: {e}",
                                     time.perf_counter() - start)
            timed_out = not _wait(proc, timeout)
            _kill_group(proc)
            rc = proc.wait()
            proc = None
            duration = time.perf_counter() - start
            status = _status(rc, timed_out)
            stderr = _read(err)
            if rc == SETUP_EXIT and iso.mount_namespace and "msn sandbox setup:" in stderr:
                status = "error"
            if status == "killed" and rc == MEMORY_EXIT:
                stderr += f"\n[msn sandbox: memory limit of {memory_mb} MB reached]"
            elif timed_out:
                stderr += f"\n[msn sandbox: wall-clock timeout of {timeout:g} s]"
            return SandboxResult(status == "passed", status, _read(out), stderr, duration, rc)
    finally:
        if proc is not None:  # an exception between start and reaping: never leave the child behind
            _kill_group(proc)
            proc.wait()
        if cgroup is not None:
            cgroup.remove()
        if not iso.pid_namespace and cgroup is None:
            _kill_by_cwd(workdir)  # last resort for children that left the process group
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child is a zombie at most, so the id is still ours)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_by_cwd(workdir: str) -> None:
    """SIGKILL every process whose working directory is inside ``workdir`` (fallback cleanup)."""
    real = os.path.realpath(workdir)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            if cwd == real or cwd.startswith(real + os.sep):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue
