"""Moved to :mod:`msn.training.train`; this path imports it, with a ``DeprecationWarning``, until msn 0.2
(``python -m msn.train`` still runs ``msn train``)."""

if __name__ == "__main__":  # pragma: no cover
    import runpy
    import warnings

    warnings.warn("python -m msn.train moved to python -m msn.training.train (or: msn train)", DeprecationWarning,
                  stacklevel=1)
    runpy.run_module("msn.training.train", run_name="__main__", alter_sys=True)
else:
    from msn._moved import alias

    alias(__name__, "msn.training.train")
