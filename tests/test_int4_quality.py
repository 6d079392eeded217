"""benchmarks/int4_quality.py: its "kernel only" format really runs every forward on the 4-bit kernel."""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
import torch
from conftest import tiny_model

from msn.decoding.packed import bf16_packable
from msn.int4 import Int4Linear, quantize_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "int4_quality.py"


@pytest.mark.skipif(not bf16_packable(), reason="the wide path needs oneDNN bf16 (AVX-512 or AVX-NE-CONVERT)")
def test_kernel_only_takes_every_forward_off_the_wide_path(monkeypatch):
    mod = helpers.load_script(SCRIPT, "int4_quality")
    model = tiny_model("llama", dtype=torch.bfloat16)
    quantize_model(model)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.wide is not None for m in layers), "bf16: the hybrid by default"
    calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    ids = torch.arange(3, 19)[None]  # 16 rows: above WIDE_ROWS
    with torch.no_grad():
        model(ids)
        assert calls == [], "16 rows run on the packed bf16 copy"
        mod.kernel_only(model)
        model(ids)
    assert calls and set(calls) == {16} and all(m.wide is None for m in layers)
