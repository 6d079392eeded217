"""benchmarks/serve_load.py's report: the table's ratios and text agreement, the plot, bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script

serve_load = load_script(Path(__file__).parents[1] / "benchmarks" / "serve_load.py", "serve_load")


def _level(max_batch: int, clients: int, tps: float, texts: list[str]) -> dict:
    requests = [{"question": i, "client": i % clients, "ttft": 0.1 * (i + 1), "seconds": 2.0, "tokens": 10,
                 "text": t} for i, t in enumerate(texts)]
    return {"max_batch": max_batch, "clients": clients, "wall": 1.0, "tokens": 10 * len(texts),
            "aggregate_tps": tps, "errors": [], "requests": requests, "request_tps_median": tps / clients,
            "ttft_p50": 0.2, "ttft_p95": 0.4}


def test_the_report_compares_each_server_with_max_batch_one_and_each_text_with_alone(tmp_path):
    levels = [_level(1, 1, 20.0, ["a", "b"]), _level(8, 1, 21.0, ["a", "b"]),
              _level(1, 4, 22.0, ["a", "x"]), _level(8, 4, 44.0, ["a", "y"])]
    (tmp_path / "load.json").write_text(json.dumps({"args": {
        "model": "m", "dtype": "bf16", "threads": 2, "method": "tr-jacobi", "requests": 2, "max_tokens": 8,
        "max_batch": [1, 8]}, "levels": levels}))
    assert serve_load.main(["--out", str(tmp_path), "--report-only"]) == 0
    rows = {tuple(r.split("|")[1:3]): r for r in (tmp_path / "load.md").read_text().splitlines() if r.startswith("| ")}
    assert "| 2.00x |" in rows[" 8 ", " 4 "] and "| 1/2 |" in rows[" 8 ", " 4 "]  # 44 / 22; "y" is not "b"
    assert "| 0.52x |" in rows[" 8 ", " 4 "]  # a request's own 11 tok/s against 21 alone
    assert (tmp_path / "load.png").stat().st_size > 1000


def test_bad_flags_fail_before_any_server_starts(tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"turns": ["hi"]}\n')
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--questions", str(q), "--out", str(tmp_path), "--requests", "2", "--clients", "1,4"])
    assert "fewer than the most clients" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--questions", str(q), "--out", str(tmp_path), "--clients", "0,2"])
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])


def test_the_report_says_how_many_cores_the_server_and_the_clients_used(tmp_path):
    old, new = _level(1, 1, 20.0, ["a"]), {**_level(8, 1, 30.0, ["a"]), "server_cores": 1.91, "client_cores": 0.25}
    (tmp_path / "load.json").write_text(json.dumps({"args": {
        "model": "m", "dtype": "bf16", "threads": 2, "method": "tr-jacobi", "requests": 1, "max_tokens": 8,
        "max_batch": [1, 8]}, "levels": [old, new]}))
    assert serve_load.main(["--out", str(tmp_path), "--report-only"]) == 0
    rows = {r.split("|")[1].strip(): r for r in (tmp_path / "load.md").read_text().splitlines() if r.startswith("| ")}
    assert rows["8"].endswith("| 1.91 / 0.25 |")
    assert rows["1"].endswith("| - |")  # a load.json from before the columns existed


def test_cpu_seconds_counts_a_process_and_all_its_threads():
    import os
    import threading
    import time

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    mine, by_pid = serve_load.cpu_seconds(), serve_load.cpu_seconds(os.getpid())
    worker = threading.Thread(target=spin, args=(0.3,))
    worker.start()
    worker.join()
    assert serve_load.cpu_seconds() - mine >= 0.25  # the other thread's CPU time counts
    assert serve_load.cpu_seconds(os.getpid()) - by_pid >= 0.2  # /proc's ticks, 10 ms each
    assert serve_load.cpu_seconds(2**31 - 1) != serve_load.cpu_seconds(2**31 - 1)  # NaN: no such process
