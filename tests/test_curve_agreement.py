"""benchmarks/curve_agreement.py: observed forward times against the measured t(n, past), per step."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import helpers

from msn.decoding import costs

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "curve_agreement.py"


def test_each_step_is_compared_with_the_curve_at_its_own_past():
    mod = helpers.load_script(SCRIPT, "curve_agreement")
    lat = costs.Latency.from_measurements({0: 0.010, 16: 0.020}, {0: 0.011, 16: 0.040}, long_past=1024)
    rows: list = []
    mod.recorded(lat, rows)
    lat.observe(16, 0.030, past=1024, step_seconds=0.032)
    lat.observe(0, 0.010)
    assert rows == [(16, 1024, 0.030, lat._at(lat.measured, 16, 1024)), (0, costs.PAST, 0.010, 0.010)]
    assert rows[0][3] == 0.040 and lat.steps == 2, "the curve itself still observes"


def test_the_script_reports_every_step(tiny_dir, tmp_path, monkeypatch, capsys):
    mod = helpers.load_script(SCRIPT, "curve_agreement")
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) + "\n"
                         for i, (c, t) in enumerate([("writing", "Write a haiku."), ("qa", "What is 2 + 2?")])))
    monkeypatch.setattr(costs, "measure_forward", lambda model, sizes, **kw: {k: 0.001 * k for k in sizes})
    monkeypatch.setattr(sys, "argv", ["curve_agreement", "--model", str(tiny_dir), "--dtype", "fp32", "--questions",
                                      str(q), "--max-new-tokens", "12"])
    mod.main()
    out = capsys.readouterr().out
    steps = int(re.search(r"(\d+) steps", out).group(1))
    assert steps >= 2 and "overall: median" in out and "of steps" in out
