"""Issue 13 items 7 and 8: the escapes found in the HumanEval sandbox, each run for real and shown contained.

OS-layer tests run with ``guard=False`` (the Python guard off), so they prove the mount namespace itself is
the wall; they skip with the probe's reason where the machine cannot give the sandbox a mount namespace.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from msn.eval import sandbox
from msn.eval.sandbox import isolation, run_python

ISO = isolation()
needs_mountns = pytest.mark.skipif(
    not ISO.mount_namespace, reason="no mount namespace here: " + "; ".join(n for n in ISO.notes if "mount" in n)
)
guard_modes = pytest.mark.parametrize("guard", [True, False], ids=["guard", "os-only"])


@needs_mountns
@guard_modes
def test_proc_shows_no_host_process(guard):
    code = (
        "import os\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "cmds = [open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ').decode() for p in pids]\n"
        "print(pids)\n"
        "print(cmds)\n"
    )
    r = run_python(code, guard=guard)
    assert r.passed, r.stderr
    pids_line, cmds_line = r.stdout.strip().splitlines()
    assert eval(pids_line) == [1]  # noqa: S307 - only the sandboxed program itself
    assert "pytest" not in cmds_line and "_runner.py" in cmds_line
    assert str(os.getpid()) not in eval(pids_line)  # noqa: S307


@needs_mountns
def test_files_in_tmp_and_dev_shm_do_not_survive_the_run():
    name = f"msn-escape-{uuid.uuid4().hex}"
    write = (
        "import os\n"
        f"for d in ('/tmp', '/dev/shm'):\n"
        f"    with open(os.path.join(d, {name!r}), 'w') as f:\n"
        "        f.write('left behind')\n"
        f"print(sorted(os.path.exists(os.path.join(d, {name!r})) for d in ('/tmp', '/dev/shm')))\n"
    )
    r = run_python(write, guard=False)
    assert r.passed and r.stdout.strip() == "[True, True]", r.stderr  # the writes did happen, inside
    for d in ("/tmp", "/dev/shm"):
        assert not (Path(d) / name).exists(), f"{d}/{name} escaped to the host"
    look = f"import os\nprint([os.path.exists(os.path.join(d, {name!r})) for d in ('/tmp', '/dev/shm')])\n"
    assert run_python(look, guard=False).stdout.strip() == "[False, False]"  # nor does the next run see them


@needs_mountns
def test_dev_shm_cannot_exceed_its_limit():
    """tmpfs pages are not in the process's address space, so RLIMIT_AS never saw them: the size limit does."""
    code = (
        "import os\n"
        "total = 0\n"
        "chunk = b'x' * (1 << 20)\n"
        "try:\n"
        "    for i in range(64):\n"
        "        with open(f'/dev/shm/f{i}', 'wb') as f:\n"
        "            f.write(chunk)\n"
        "            f.flush()\n"
        "        total += len(chunk)\n"
        "except OSError as e:\n"
        "    print('stopped', e.errno)\n"
        "print(total)\n"
    )
    r = run_python(code, guard=False, file_mb=8)
    assert r.passed, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "stopped" and int(lines[-1]) <= 8 << 20, r.stdout


@needs_mountns
def test_rest_of_the_machine_is_read_only():
    code = (
        "import os\n"
        "errs = []\n"
        "for path in ('/var/tmp/msn-escape', '/etc/msn-escape', '/msn-escape'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as e:\n"
        "        errs.append(e.errno)\n"
        "print(errs)\n"
    )
    r = run_python(code, guard=False)
    assert r.passed, r.stderr
    assert len(eval(r.stdout)) == 3  # noqa: S307
    assert not any(Path(p).exists() for p in ("/var/tmp/msn-escape", "/etc/msn-escape", "/msn-escape"))


@pytest.mark.parametrize("attack", [
    "import io\nio.FileIO('/tmp/msn-escape-fileio', 'w')\n",
    "import _io\n_io.FileIO('/tmp/msn-escape-fileio', 'w')\n",
    "t = type(open('solution.py', 'rb').raw)\nt('/tmp/msn-escape-fileio', 'w')\n",  # the real class, not a patched name
    "import os\nos.close(os.open('/tmp/msn-escape-fileio', os.O_CREAT | os.O_WRONLY))\n",
])
def test_guard_blocks_fileio_and_raw_opens_outside_the_workdir(attack):
    r = run_python(attack)
    assert r.status == "failed" and "PermissionError: writing outside the sandbox directory" in r.stderr, r.stderr
    assert not Path("/tmp/msn-escape-fileio").exists()


@pytest.mark.parametrize("attack", [
    "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess\nprint('imported')\n",
    "import sys\nsys.modules.pop('_posixsubprocess', None)\nimport subprocess\nsubprocess.run(['true'])\nprint('ran')\n",
    "import sys\nfor m in ('ctypes', '_ctypes'):\n    del sys.modules[m]\nimport ctypes\nprint('imported')\n",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})\nprint('ran')\n",
])
def test_guard_survives_deleting_its_module_blocks(attack):
    r = run_python(attack)
    assert r.status == "failed" and "PermissionError" in r.stderr, r.stderr
    assert "imported" not in r.stdout and "ran" not in r.stdout


def test_guard_still_allows_ordinary_work_in_the_workdir():
    code = (
        "import io, os, json\n"
        "io.FileIO('a.bin', 'w').write(b'x')\n"
        "os.mkdir('d')\n"
        "json.dump([1], open('d/x.json', 'w'))\n"
        "os.rename('a.bin', 'd/b.bin')\n"
        "print(sorted(os.listdir('d')))\n"
    )
    r = run_python(code)
    assert r.passed and r.stdout.strip() == "['b.bin', 'x.json']", r.stderr


def test_no_mount_namespace_degrades_with_a_reason(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_mount_namespace", lambda *a: (False, "mount: Operation not permitted"))
    sandbox.isolation.cache_clear()
    try:
        iso = sandbox.isolation()
        assert not iso.mount_namespace
        assert any("no mount namespace (mount: Operation not permitted)" in n for n in iso.notes), iso.notes
        r = run_python("print(6 * 7)\n")
        assert r.passed and r.stdout.strip() == "42"  # still runs, with the remaining layers
    finally:
        sandbox.isolation.cache_clear()
