"""``msn --help`` and ``import msn`` must not import torch: a help screen should not cost seconds."""

from __future__ import annotations

import subprocess
import sys


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
