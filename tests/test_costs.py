"""t(n): the forward latency curve the auto tree is sized with, measured, cached and refined online."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import msn
from msn.decoding import costs
from msn.decoding.costs import (
    GRID,
    Latency,
    cache_key,
    latency_path,
    load_or_measure,
    measure_forward,
    monotone,
)
from msn.decoding.engine import decoder_state
from msn.decoding.trie import choose_size
from msn.outputs import atomic_write_text

# ---------------------------------------------------------------------------------------------------------
# Latency


def test_interpolation_and_extrapolation():
    lat = Latency({8: 4.0, 0: 1.0, 4: 2.0})
    assert lat.sizes == [0, 4, 8] and lat.max_nodes == 8
    assert [lat.predict(n) for n in (0, 2, 4, 6, 8)] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert lat.predict(10) == 5.0 and lat.predict(12) == 6.0, "linear beyond the last point"
    assert lat.curve(3) == [1.0, 1.25, 1.5, 1.75]
    assert len(lat.curve(10)) == 11
    assert Latency({1: 0.5}).predict(7) == 0.5, "a single point: constant"
    assert Latency({1: 0.5, 2: 5.0}).predict(0) == pytest.approx(1e-9), "never zero or negative"
    assert lat.to_dict() == {"version": costs.VERSION, "sizes": [0, 4, 8], "seconds": [1.0, 2.0, 4.0],
                             "raw": [1.0, 2.0, 4.0], "source": "measured", "past": costs.PAST, "slope_sizes": [0], "slopes": [0.0]}


def test_the_whole_curve_at_once_equals_each_size_predicted_on_its_own():
    lat = Latency({n: 0.02 + 0.0005 * n + 0.002 * (n % 3) for n in GRID}, slopes={0: 1e-6, 16: 4e-6, 64: 2e-5})
    lat.overhead = 0.0013
    for past in (0, 40, costs.PAST, 700, 3000):
        for upto in (0, 1, 5, 33, GRID[-1], GRID[-1] + 6):  # past the grid: extrapolated as predict() does
            want = [lat.predict(n, past) + lat.overhead for n in range(upto + 1)]
            assert lat.curve(upto, past) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_sources_propose_what_a_forward_of_at_most_twice_a_plain_step_verifies(monkeypatch):
    lat = Latency({0: 0.010, 4: 0.012, 16: 0.020, 32: 0.030, 64: 0.050})
    assert lat.proposal_cap() == 16, "t(16) = 2 t(0)"
    lat.overhead = 0.010
    assert lat.proposal_cap() == 32, "the step's own work is paid by every size: t(n) + 10 <= 2 (t(0) + 10)"
    assert Latency({0: 0.01, 64: 0.011}).proposal_cap() == 64, "a flat curve (a GPU): the whole grid"
    monkeypatch.setattr(costs, "PROPOSE_UP_TO", None)
    assert lat.proposal_cap() is None


def test_measured_points_are_made_non_decreasing():
    assert monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert monotone([5.0, 1.0, 0.0]) == [2.0, 2.0, 2.0]
    assert monotone([1.0, 1.0, 2.0]) == [1.0, 1.0, 2.0]
    assert monotone([]) == []
    lat = Latency({0: 1.0, 1: 3.0, 2: 2.0, 4: 4.0})
    assert lat.seconds == [1.0, 2.5, 2.5, 4.0]
    assert lat.curve(4) == sorted(lat.curve(4)), "verifying more never costs less"


def test_observe_moves_the_nearby_grid_points():
    lat = Latency({0: 1.0, 4: 2.0, 8: 4.0})
    lat.observe(4, 3.0)  # on a grid point: only that point moves, by ALPHA of the way (ratio 1.5)
    assert lat.seconds == pytest.approx([1.0, 2.0 * (1 + costs.ALPHA * 0.5), 4.0])
    lat = Latency({0: 1.0, 4: 2.0, 8: 4.0})
    lat.observe(2, 3.0)  # halfway between 0 and 4: both move by half as much (ratio 2)
    assert lat.seconds == pytest.approx([1.0 * (1 + costs.ALPHA * 0.5), 2.0 * (1 + costs.ALPHA * 0.5), 4.0])
    lat = Latency({0: 1.0, 4: 2.0, 8: 4.0})
    lat.observe(50, 1.0)  # beyond the grid: the last point
    assert lat.seconds[:2] == [1.0, 2.0] and lat.seconds[2] < 4.0
    lat = Latency({0: 1.0, 4: 2.0, 8: 4.0})
    lat.observe(6, 3.0)  # exactly as predicted: nothing moves
    assert lat.seconds == pytest.approx([1.0, 2.0, 4.0])


def test_observe_converges_to_the_observed_time():
    lat = Latency({0: 1.0, 4: 2.0, 8: 4.0})
    for _ in range(300):
        lat.observe(4, 3.0)
    assert lat.predict(4) == pytest.approx(3.0, rel=1e-3)
    assert lat.predict(0) == 1.0


@pytest.mark.parametrize("outlier, clipped", [(1000.0, 4.0), (1e-6, 0.25)])
def test_observe_clips_outliers(outlier, clipped):
    a, b = Latency({0: 1.0, 4: 2.0}), Latency({0: 1.0, 4: 2.0})
    a.observe(4, 2.0 * outlier)
    b.observe(4, 2.0 * clipped)
    assert a.seconds == b.seconds
    assert a.seconds[1] == pytest.approx(2.0 * (1 + costs.ALPHA * (clipped - 1)))


def test_observe_keeps_the_curve_non_decreasing():
    """A refined point below its left neighbours would make every later tree that size (it looks cheaper
    than a smaller one): the refinement pools them instead."""
    lat = Latency({0: 1.0, 4: 1.0, 8: 1.0})
    for _ in range(50):
        lat.observe(8, 0.5)
        assert lat.seconds == sorted(lat.seconds)
    assert lat.predict(8) < 1.0 and lat.predict(0) == lat.predict(8), "pooled with the points it passed"


def test_drift_is_judged_against_the_points_as_measured_not_the_pooled_curve():
    """A real dip (fp32 on a CPU: one token runs unpacked, two tokens packed cost more, three or more less) is
    pooled for sizing the tree, but one-token steps that take what was measured are not drift."""
    lat = Latency({0: 0.040, 1: 0.060, 2: 0.010, 4: 0.010, 8: 0.100})
    assert lat.predict(0) == pytest.approx(0.030), "pooled with 1, 2 and 4 for the choice"
    for _ in range(200):
        lat.observe(0, 0.040)
    assert not lat.stale and lat.drift == pytest.approx(1.0), "40 ms is what was measured (x1.33 the pooled)"
    again = Latency.from_dict(json.loads(json.dumps(lat.to_dict())))  # the cached file keeps the points
    assert again.raw == [0.040, 0.060, 0.010, 0.010, 0.100] and again.measured == pytest.approx(lat.measured)
    older = {k: v for k, v in lat.to_dict().items() if k != "raw"}  # a file written before ``raw``: pooled points
    assert Latency.from_dict(older).raw == lat.seconds


def test_drift_marks_a_curve_measured_under_other_load_stale():
    # measured during a burst: 1.5x what every step then takes; refinement alone would only fix the sizes chosen
    lat = Latency({0: 0.15, 8: 0.15, 16: 0.15})
    for _ in range(costs.DRIFT_MIN_STEPS - 1):
        lat.observe(8, 0.10)
        assert not lat.stale, "judged only after enough steps"
    for _ in range(100):
        lat.observe(8, 0.10)
    assert lat.stale and lat.drift < 1 / costs.DRIFT_LIMIT
    # the same steps within ~10% of the measurement, noise included: never stale
    calm = Latency({0: 0.10, 8: 0.11, 16: 0.13})
    for i in range(500):
        calm.observe(8, 0.11 * (1.25 if i % 10 == 0 else 0.97))
        assert not calm.stale
    # a short burst of slow steps is averaged away
    burst = Latency({0: 0.10, 8: 0.11})
    for i in range(300):
        burst.observe(8, 0.25 if 100 <= i < 110 else 0.11)
        assert not burst.stale


def write_curve(path, seconds: dict[int, float]) -> Latency:
    atomic_write_text(path, json.dumps(Latency(seconds, source=str(path)).to_dict()))
    return Latency(seconds, source=str(path), path=path)


def test_a_stale_curve_is_flagged_on_disk_and_measured_again_by_the_next_process(tmp_path, monkeypatch):
    quick_measurements(tmp_path, monkeypatch, busy=False)
    model = tiny_model("llama")
    path = latency_path(model)
    lat = write_curve(path, {n: 10.0 for n in GRID})  # 10 s a step: nothing this tiny model will show
    assert load_or_measure(model).seconds == lat.seconds, "the cached curve is used"
    for _ in range(costs.DRIFT_MIN_STEPS + 50):
        lat.observe(4, 0.01)
    assert lat.stale and json.loads(path.read_text())["stale"] is True
    fresh = load_or_measure(model)  # a new process: measures again, caches the fresh curve without the flag
    assert max(fresh.seconds) < 10.0 and "stale" not in json.loads(path.read_text())
    assert json.loads(path.read_text())["seconds"] == fresh.seconds


def test_a_stale_curve_does_not_clobber_one_another_process_measured_since(tmp_path, monkeypatch):
    monkeypatch.setenv("MSN_CACHE", str(tmp_path))
    path = latency_path(tiny_model("llama"))
    lat = write_curve(path, {0: 10.0, 4: 10.0})
    newer = {"sizes": [0, 4], "seconds": [0.01, 0.02], "source": str(path)}
    atomic_write_text(path, json.dumps(newer))
    for _ in range(costs.DRIFT_MIN_STEPS + 50):
        lat.observe(4, 0.01)
    assert lat.stale and json.loads(path.read_text()) == newer


def test_the_next_request_measures_a_stale_curve_again_a_few_times_at_most(tmp_path, monkeypatch):
    quick_measurements(tmp_path, monkeypatch, busy=False)
    model = tiny_model("llama")
    lat = Latency({n: 10.0 for n in GRID})
    assert costs.for_next_request(lat, model) is lat, "not stale: kept"
    generations = []
    for _ in range(costs.MAX_GENERATIONS + 2):
        for _ in range(costs.DRIFT_MIN_STEPS + 50):
            lat.observe(4, 1000.0 * lat.predict(4))  # whatever is measured, the steps disagree
        assert lat.stale
        lat = costs.for_next_request(lat, model)
        generations.append(lat.generation)
    assert generations == [1, 2, 3, 3, 3], "re-measured up to MAX_GENERATIONS times, then left as it is"


def test_generate_measures_a_stale_curve_again_before_its_next_request(tmp_path, monkeypatch):
    quick_measurements(tmp_path, monkeypatch, busy=False)
    model = tiny_model("qwen2")
    ids = torch.tensor([[40, 41, 42, 43, 40, 41, 42]])
    state = decoder_state(model)
    stale = Latency({n: 10.0 for n in GRID}, path=None)
    stale.steps, stale.drift = costs.DRIFT_MIN_STEPS, 0.01
    state.latencies["packed"] = stale
    out = msn.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert state.latencies["packed"] is not stale and state.latencies["packed"].generation == 1
    assert max(state.latencies["packed"].measured) < 10.0
    ref = msn.generate(model, ids, max_new_tokens=8, method="ar", eos_token_id=[])
    assert torch.equal(out.sequences, ref.sequences)


def test_the_suite_never_writes_into_the_users_cache():
    import os

    from msn.models import cache_dir

    assert cache_dir() == Path(os.environ["MSN_CACHE"]) and "msn-cache" in str(cache_dir())
    assert (cache_dir() / "models").is_symlink(), "presets are shared with the real cache"


# ---------------------------------------------------------------------------------------------------------
# Measuring


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_measure_forward_one_positive_time_per_size(family):
    model = tiny_model(family)
    times = measure_forward(model, [1, 2, 5, 9], past=16, repeats=2)
    assert sorted(times) == [1, 2, 5, 9]
    assert all(isinstance(t, float) and t > 0 for t in times.values())


def test_load_or_measure_writes_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSN_CACHE", str(tmp_path))
    monkeypatch.setattr(costs, "_busy", lambda: False)  # this test machine is shared: its load varies
    calls = []
    real = costs.measure_forward

    def spy(model, sizes, *args, **kwargs):
        calls.append(list(sizes))
        return real(model, sizes, past=kwargs.get("past", 16), repeats=1, warmup=0.0)

    monkeypatch.setattr(costs, "measure_forward", spy)
    model = tiny_model("llama")
    path = latency_path(model)
    assert path.parent == tmp_path / "latency" and not path.exists()
    first = load_or_measure(model)
    assert calls == [[n + 1 for n in GRID], [n + 1 for n in costs.LONG_GRID]], "the root plus n tree tokens"
    assert first.sizes == list(GRID) and all(s > 0 for s in first.seconds)
    data = json.loads(path.read_text())
    assert data["sizes"] == list(GRID) and data["seconds"] == first.seconds
    assert not list(path.parent.glob("*.tmp")), "written atomically"
    # reused: no measurement, same curve; the same shapes with other weights share it
    again = load_or_measure(tiny_model("llama", seed=7))
    assert len(calls) == 2 and again.seconds == first.seconds and again.source == str(path)
    # another dtype is another key; a corrupt file is measured again
    assert cache_key(tiny_model("llama", dtype=torch.bfloat16)) != cache_key(model)
    assert cache_key(tiny_model("qwen2")) != cache_key(model)
    path.write_text("{not json")
    load_or_measure(model)
    assert len(calls) == 4 and json.loads(path.read_text())["sizes"] == list(GRID)


def quick_measurements(tmp_path, monkeypatch, busy: bool) -> None:
    """A private cache dir, a fixed answer to "is the CPU busy?", and a short (real) measurement."""
    monkeypatch.setenv("MSN_CACHE", str(tmp_path))
    monkeypatch.setattr(costs, "_busy", lambda: busy)
    real = costs.measure_forward
    monkeypatch.setattr(costs, "measure_forward", lambda model, sizes, **kw: real(model, sizes, past=16, repeats=1,
                                                                            packed=kw.get("packed", False),
                                                                            warmup=0.0))


def test_a_busy_cpu_measurement_is_not_cached(tmp_path, monkeypatch):
    quick_measurements(tmp_path, monkeypatch, busy=True)
    model = tiny_model("llama")
    latency = load_or_measure(model)
    assert latency.sizes == list(GRID) and "busy" in latency.source
    assert not latency_path(model).exists()


def test_auto_tree_measures_once_and_refines_online(tmp_path, monkeypatch):
    quick_measurements(tmp_path, monkeypatch, busy=False)
    model = tiny_model("gemma3")
    ids = torch.tensor([[40, 41, 42, 43, 40, 41, 42]])
    out = msn.generate(model, ids, max_new_tokens=12, eos_token_id=[])  # tree=None: the auto tree
    assert out.packed, "a CPU fp32 model verifies with packed weights by default"
    path = latency_path(model, packed=True)
    assert out.tree.name == "auto" and path.is_file() and not latency_path(model).exists()
    latency = decoder_state(model).latency
    assert latency is not None and latency.sizes == list(GRID)
    assert latency.seconds != json.loads(path.read_text())["seconds"], "refined by the steps"
    assert all(0 <= n <= latency.max_nodes for n in out.tree_sizes)
    ref = msn.generate(model, ids, max_new_tokens=12, method="ar", eos_token_id=[])
    assert torch.equal(out.sequences, ref.sequences)


# ---------------------------------------------------------------------------------------------------------
# The past term, the step's own work, and what is said about a re-measurement


def test_the_curve_grows_with_the_past_as_measured_at_two_cache_lengths():
    base = {0: 0.010, 4: 0.012, 16: 0.020}
    long = {0: 0.011, 16: 0.040}  # at 1024 past: one token +1 ms, a 16-node tree +20 ms
    lat = Latency.from_measurements(base, long, long_past=1024)
    assert lat.predict(16) == pytest.approx(0.020) and lat.predict(16, past=costs.PAST) == pytest.approx(0.020)
    assert lat.predict(16, past=1024) == pytest.approx(0.040)
    assert lat.predict(0, past=1024) == pytest.approx(0.011)
    assert lat.predict(8, past=1024) == pytest.approx(0.012 + 0.008 / 3 + (0.001 + 0.020) / 2), "slopes interpolated"
    assert lat.predict(16, past=2048) == pytest.approx(0.020 + 2 * 0.020 * (2048 - 128) / (2 * (1024 - 128))), \
        "linear beyond the measured past"
    assert lat.predict(16, past=0) >= 0.5 * lat.predict(16), "a short cache never makes a forward nearly free"
    # a wide tree pays more per past token than a narrow one: on a long prompt the best tree is smaller
    short_q, t_short, t_long = [0.9] * 4 + [0.3] * 12, lat.curve(16), lat.curve(16, past=4096)
    assert choose_size(short_q, t_long) < choose_size(short_q, t_short)
    assert Latency.from_dict(lat.to_dict()).predict(16, past=1024) == pytest.approx(0.040), "cached with its slopes"


def test_the_steps_own_work_enters_the_choice_but_not_the_drift():
    lat = Latency({0: 0.010, 8: 0.011, 16: 0.020})
    for _ in range(300):
        lat.observe(8, 0.011, costs.PAST, step_seconds=0.016)  # the forward as measured, 5 ms around it
    assert lat.overhead == pytest.approx(0.005, rel=0.01) and lat.drift == pytest.approx(1.0)
    assert not lat.stale and lat.curve(8)[8] == pytest.approx(0.016, rel=0.01)
    # with a fixed cost per step, more drafts per forward pay off sooner
    q = [0.2] * 16
    assert choose_size(q, lat.curve(16)) >= choose_size(q, [lat.predict(n) for n in range(17)])


def test_a_curve_from_an_older_msn_is_measured_again(tmp_path, monkeypatch):
    quick_measurements(tmp_path, monkeypatch, busy=False)
    model = tiny_model("llama")
    path = latency_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"sizes": list(GRID), "seconds": [10.0] * len(GRID), "source": "old"}))
    fresh = load_or_measure(model)
    assert max(fresh.seconds) < 10.0 and json.loads(path.read_text())["version"] == costs.VERSION


def test_a_re_measurement_is_announced_once_per_curve_and_process(tmp_path, monkeypatch, caplog):
    quick_measurements(tmp_path, monkeypatch, busy=False)
    monkeypatch.setattr(costs, "_ANNOUNCED", set())
    model = tiny_model("llama")
    lat = Latency({n: 10.0 for n in GRID}, path=tmp_path / "curve.json")
    with caplog.at_level(logging.INFO, logger="msn"):
        for _ in range(costs.MAX_GENERATIONS):
            for _ in range(costs.DRIFT_MIN_STEPS + 50):
                lat.observe(4, 1000.0 * lat.predict(4))
            fresh = costs.for_next_request(lat, model)
            fresh.path, lat = tmp_path / "curve.json", fresh
    said = [r for r in caplog.records if "measuring it again" in r.getMessage()]
    assert len(said) == 1 and lat.generation == costs.MAX_GENERATIONS
