"""``msn --help`` and ``import msn`` must not import torch: a help screen should not cost seconds; flags every
command shares are checked alike before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imports_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_does_not_import_torch():
    mods = _imports_after(
        "import contextlib, io, msn.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    msn.cli.main(['--help'])"
    )
    assert "msn.cli" in mods and "torch" not in mods and "transformers" not in mods


def test_import_msn_is_lazy_but_complete():
    assert "torch" not in _imports_after("import msn")
    mods = _imports_after("import msn\nassert callable(msn.generate) and msn.METHODS and msn.errors.MsnError")
    assert "torch" in mods  # the first use imports what it needs


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["bench"], ["demo"], ["tune-tree"], ["serve"],
                                     ["distill", "--out", "never-written.jsonl"]])
def test_threads_above_the_usable_cpus_is_one_line_on_every_command(command, monkeypatch, capsys, tmp_path):
    """Thousands of threads segfaulted, failed in libgomp or hung: every command with --threads refuses more than
    this process may run on, in one line naming the limit, before any model loads."""
    import msn.models
    from msn.cli import main
    from msn.flags import usable_cpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(msn.models, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    cpus = usable_cpus()
    assert main([*command, "--threads", str(cpus + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--threads {cpus + 1} is more than the {cpus} CPUs this process may use; use --threads {cpus}" in err
    assert "\n" not in err and not any(tmp_path.iterdir())
