"""The sandbox contains hostile model-written code: each attack runs for real and we check the machine.

Attacks run twice where possible: with the Python-level guard (the default) and with ``guard=False``, to
prove that the OS layers (namespaces, uid drop, rlimits, cgroup) contain the code on their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from msn.eval.sandbox import WORKDIR_PREFIX, isolation, run_python

ISO = isolation()
needs_uid_drop = pytest.mark.skipif(
    ISO.uid is None or os.geteuid() != 0, reason="OS-level file protection needs the uid drop (root + unshare -S)"
)
needs_netns = pytest.mark.skipif(not ISO.network_namespace, reason="no network namespace on this machine")
needs_proc_limit = pytest.mark.skipif(not ISO.limits_processes, reason="no kernel process limit (root, no cgroup)")
guard_modes = pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-only"])


def _leftovers() -> list[str]:
    """Command lines of live (non-zombie) processes started from a sandbox working directory."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if state != "Z" and (WORKDIR_PREFIX in cwd or "_runner.py" in cmd and WORKDIR_PREFIX in cmd):
            found.append(f"{proc.name}: {cmd}")
    return found


def _assert_no_leftovers(grace: float = 2.0) -> None:
    """Killing a PID namespace is asynchronous in the kernel: allow a short grace period."""
    deadline = time.monotonic() + grace
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers() == []


def test_passing_program():
    r = run_python("def f(x):\n    return x * 2\nassert f(21) == 42\nprint('ok')\n")
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.stdout.strip() == "ok"
    assert r.duration < 5


def test_failing_program_reports_traceback():
    r = run_python("def f(x):\n    return x + 2\nassert f(21) == 42, 'wrong'\n")
    assert not r.passed and r.status == "failed"
    assert "AssertionError: wrong" in r.stderr


def test_syntax_error_is_a_failure():
    r = run_python("def f(:\n")
    assert r.status == "failed" and "SyntaxError" in r.stderr


def test_workdir_is_usable_and_thrown_away():
    code = "import os\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.remove('a.txt')\nprint(os.getcwd())\n"
    r = run_python(code)
    assert r.passed, r.stderr
    workdir = Path(r.stdout.strip())
    assert workdir.name.startswith(WORKDIR_PREFIX)
    assert not workdir.exists()


def test_guard_allows_ordinary_file_use():
    code = (
        "import tempfile, os\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n"
        "    f.write('x')\n"
        "assert f.name.startswith(os.getcwd())\n"
        "open(os.devnull, 'w').write('discarded')\n"
        "print(open('/etc/hostname').read() != '')\n"
    )
    r = run_python(code)
    assert r.passed, r.stderr


def test_infinite_loop_times_out_and_is_gone():
    t = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < 3.0
    _assert_no_leftovers()


def test_escaped_background_child_is_killed():
    """A child that leaves the process group (setsid) and loops is still killed (PID namespace, cgroup,
    or at least the scan for processes left in the working directory)."""
    code = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\nprint('parent done')\n"
    r = run_python(code, timeout=2.0, guard=False)
    assert r.status == "passed" and "parent done" in r.stdout
    _assert_no_leftovers()


@needs_proc_limit
@guard_modes
def test_fork_bomb_is_contained(guard: bool):
    bomb = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.write(1, b'c\\n')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    t = time.monotonic()
    r = run_python(bomb, timeout=1.5, max_processes=16, guard=guard)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < 4.0
    forks = r.stdout.count("c")
    if guard:
        assert forks == 0  # os.fork raises in the guard
    else:
        assert forks < 16  # real forks hit the kernel limit
        if ISO.uid is not None or ISO.cgroup is not None:
            assert forks > 0  # a fresh uid / cgroup starts empty, so some forks did happen
    _assert_no_leftovers()
    assert run_python("print('fine')").stdout.strip() == "fine"  # the machine still runs processes


@guard_modes
def test_file_deletion_outside_workdir_is_blocked(guard: bool):
    if not guard and (ISO.uid is None or os.geteuid() != 0) and not ISO.mount_namespace:
        pytest.skip("OS-level file protection needs the uid drop (root + unshare -S) or a read-only mount namespace")
    # Not under /tmp: the sandbox has a private /tmp, so a canary there would simply be invisible to it.
    folder = Path(tempfile.mkdtemp(prefix="msn-canary-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    folder.chmod(0o755)  # visible (read-only) to the unprivileged sandbox user
    canary = folder / "canary.txt"
    canary.write_text("alive")
    code = (
        "import os, shutil\n"
        f"p = {str(canary)!r}\n"
        "assert os.path.exists(p)\n"
        "errors = []\n"
        "for attack in (lambda: os.remove(p), lambda: os.unlink(p), lambda: open(p, 'w').write('x'),\n"
        "               lambda: shutil.rmtree(os.path.dirname(p)), lambda: os.rename(p, 'stolen')):\n"
        "    try:\n"
        "        attack()\n"
        "    except OSError as e:\n"
        "        errors.append(type(e).__name__)\n"
        "print(errors)\n"
    )
    try:
        r = run_python(code, guard=guard)
        assert r.status == "passed", r.stderr
        errors = eval(r.stdout)  # noqa: S307 - our own printed list
        assert len(errors) == 5, errors
        if guard:
            assert errors == ["PermissionError"] * 5
        assert canary.read_text() == "alive"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@guard_modes
def test_socket_cannot_reach_local_server(guard: bool):
    if not guard and not ISO.network_namespace:
        pytest.skip("no network namespace on this machine")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'leak')\n"
            "print('connected')\n"
        )
        r = run_python(code, timeout=5.0, guard=guard)
        assert r.status == "failed" and "connected" not in r.stdout
        assert ("PermissionError" if guard else "OSError") in r.stderr or "unreachable" in r.stderr
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever arrived
    finally:
        server.close()


@guard_modes
def test_memory_hog_is_killed(guard: bool):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))\n"
    t = time.monotonic()
    r = run_python(code, timeout=10.0, memory_mb=256, guard=guard)
    assert r.status == "killed" and not r.passed
    assert "memory limit" in r.stderr
    assert time.monotonic() - t < 5.0  # stopped by the limit, not by the timeout


def test_huge_output_is_truncated():
    r = run_python("import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 100 + '\\n')\n")
    assert r.passed
    assert len(r.stdout) < 70_000 and r.stdout.endswith("[... output truncated]")


@needs_netns
@needs_uid_drop
def test_isolation_layers_probed():
    assert ISO.pid_namespace and ISO.uid == 65534
    r = run_python("import os\nprint(os.getuid(), os.getpid())\n")
    assert r.stdout.split() == ["65534", "1"]  # unprivileged, and init of its own PID namespace


def test_fallback_without_os_layers(monkeypatch):
    """Where no namespace or cgroup works, timeouts, limits and cleanup still hold."""
    from msn.eval import sandbox

    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation())
    assert run_python("print(6 * 7)").stdout.strip() == "42"
    assert run_python("while True:\n    pass\n", timeout=1.0).status == "timeout"
    assert run_python("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256).status == "killed"
    escaped = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        pass\n"
    assert run_python(escaped, timeout=2.0, guard=False).status == "passed"
    _assert_no_leftovers()
