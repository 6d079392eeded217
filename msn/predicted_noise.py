"""Moved to :mod:`msn.training.predicted_noise`; this path imports it, with a ``DeprecationWarning``, until msn 0.2."""

from msn._moved import alias

alias(__name__, "msn.training.predicted_noise")
