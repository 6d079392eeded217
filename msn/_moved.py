"""Old import paths of moved modules. Each old module is a stub calling :func:`alias`, which warns (a
``DeprecationWarning`` at the line that imported the old path) and puts the new module in the old one's place:
the old name *is* the new module, so a monkeypatch through either name reaches the same object.

The stubs go in msn 0.2; README.md ("Moved modules") lists them.
"""

from __future__ import annotations

import importlib
import sys
import warnings

REMOVED_IN = "0.2"


def alias(old: str, new: str) -> None:
    """Make the module being imported as ``old`` the module ``new``, with one warning."""
    module = importlib.import_module(new)
    # stacklevel 3: this function, the stub, then the importing line (warnings skips importlib's own frames)
    warnings.warn(f"{old} moved to {new}; import it from there (the old path goes in msn {REMOVED_IN})",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = module
