"""Moved modules: each old path imports the new module itself (not a copy), with one DeprecationWarning that
names the new path, until msn 0.2 (README.md, "Moved modules")."""

from __future__ import annotations

import subprocess
import sys

import pytest

MOVED = [("msn.noise", "msn.training.noise"), ("msn.noise_loss", "msn.training.noise_loss"),
         ("msn.predicted_noise", "msn.training.predicted_noise"), ("msn.train", "msn.training.train"),
         ("msn.eval.denoise", "msn.training.denoise")]


def test_an_old_path_is_the_new_module_with_a_warning():
    """In a fresh process (one for all: each new module is imported before its old path is)."""
    probe = ("import importlib, sys, warnings\n"
             f"for old, new in {MOVED!r}:\n"
             "    warnings.simplefilter('error')\n"
             "    importlib.import_module(new)\n"
             "    with warnings.catch_warnings(record=True) as w:\n"
             "        warnings.simplefilter('always')\n"
             "        m = importlib.import_module(old)\n"
             "    assert m is sys.modules[new] is sys.modules[old], old\n"
             "    assert [x.category for x in w] == [DeprecationWarning], (old, w)\n"
             "    print(w[0].message)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for old, new in MOVED:
        assert f"{old} moved to {new};" in out.stdout


def test_msn_data_collator_moved_with_a_warning():
    import msn
    import msn.data
    from msn.training.collator import MSNCollator

    with pytest.warns(DeprecationWarning, match="msn.training.collator"):
        assert msn.data.MSNCollator is MSNCollator
    assert msn.MSNCollator is MSNCollator


def test_the_shared_flags_left_bench_with_a_warning():
    import msn.flags
    from msn.bench import flags as bench_flags

    for name in ("usable_cpus", "at_least", "QUANTIZE_CHOICES", "add_quantize_argument", "check_quantize_flag",
                 "add_sampling_arguments", "sampling_settings", "sampling_kwargs"):
        with pytest.warns(DeprecationWarning, match=f"msn.flags.{name}"):
            assert getattr(bench_flags, name) is getattr(msn.flags, name)
    assert bench_flags.check_run_flags and bench_flags.RUN_MINIMUMS and bench_flags.BENCH_SEED_HELP  # bench's own
