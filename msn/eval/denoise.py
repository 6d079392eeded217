"""Moved to :mod:`msn.training.denoise`; this path imports it, with a ``DeprecationWarning``, until msn 0.2."""

from msn._moved import alias

alias(__name__, "msn.training.denoise")
