"""t(n): what one forward over the root plus n tree tokens costs this model on this device, measured.

The tree is sized per step by expected tokens per second, so it needs this curve: flat up to ~16 tokens
for bf16 on some CPUs, linear for fp32, flat up to hundreds on a GPU. Measured once (a few seconds) per
model shape, device, dtype and thread count, cached as JSON under the msn cache dir, then refined online
from the step times the decoder actually sees, so a loaded machine shifts the choice. The refinement can
only correct the sizes the decoder picks, so a curve measured under other conditions (a neighbour's burst of
work during the few seconds of measuring) would keep its wrong shape; when step times stay far off the
measured curve, the curve is marked stale and measured again before the next request.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from msn.decoding.request import context_limit
from msn.outputs import atomic_write_text

GRID = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # tree nodes (the root excluded)
PAST = 128  # cache length while measuring
LONG_PAST = 1024  # a second cache length, for what each past token adds (long prompts: attention grows)
LONG_GRID = (0, 4, 16, 64)  # tree sizes measured at LONG_PAST too; the cost per past token is interpolated
WARMUP_SECONDS = 1.0  # forwards run before timing: a fresh process's first forwards ran ~1.5x slower (§21)
WARMUP_ROUNDS = 10  # ... or this many rounds over the sizes, whichever comes first
VERSION = 2  # cached curves of another version (no past term, cold measurement) are measured again
ALPHA = 0.1  # weight of one observed step in the online refinement
DRIFT_ALPHA = 0.02  # weight of one step in the drift estimate: ~50 steps, longer than a neighbour's burst
DRIFT_LIMIT = 1.3  # step times this far off the measured curve, sustained: it was measured under other load
DRIFT_MIN_STEPS = 64  # steps observed before a curve can be judged stale
MAX_GENERATIONS = 3  # re-measurements per curve and process: a machine that never settles is not chased
# Sources propose at most the nodes a forward costing this many one-token forwards verifies (None: no cap). A
# tree that costs twice a plain step pays only if more than one more token is accepted per step. SmolLM2 on this
# 2-core CPU: 17-27 nodes in bf16, 21-25 in fp32 (longer pasts fewer), while the chosen trees stay within ~20; on a
# GPU's flat curve the cap is the whole grid.
PROPOSE_UP_TO = 2.0
logger = logging.getLogger("msn")


@torch.inference_mode()
def measure_forward(model, sizes: Sequence[int], past: int = PAST, repeats: int = 3, seed: int = 0,
                    compiled: bool = False, packed: bool = False, warmup: float = WARMUP_SECONDS) -> dict[int, float]:
    """Median seconds of one forward over k new tokens on a ``past``-token cache, through the same
    verification path the engine uses (k = 1: plain causal step; k > 1: a chain with explicit positions and
    a 4-D mask; ``compiled``: the static compiled path, whose first round compiles each bucket; ``packed``:
    the eager path with packed Linear weights, msn.decoding.packed; the eager paths attend as the engine does,
    msn.decoding.attention). Timing starts after ``warmup`` seconds of forwards (one round at least)."""
    from msn.decoding.attention import gqa_attention
    from msn.decoding.packed import packing

    with packing(model, packed) as pk, gqa_attention(model, not compiled):
        return _measure(model, list(sizes), past, repeats, seed, compiled, pk, warmup)


def _measure(model, sizes, past, repeats, seed, compiled, pk, warmup) -> dict[int, float]:
    from msn.decoding.static_kv import make_kv

    gen = torch.Generator().manual_seed(seed)
    vocab, device = model.config.vocab_size, model.device
    kv = make_kv(model, past + max(sizes), compiled, pk)
    kv.prefill(torch.randint(0, vocab, (1, past), generator=gen).to(device))
    none_kept = torch.empty(0, dtype=torch.long, device=device)
    times: dict[int, list[float]] = {k: [] for k in sizes}
    began, rounds, warm = time.perf_counter(), 0, False
    while len(times[sizes[0]]) < repeats:  # round-robin over sizes, so drift hits every size alike
        for k in sizes:
            ids = torch.randint(0, vocab, (k,), generator=gen).to(device)
            chain = None if k == 1 else torch.ones(k, k, dtype=torch.bool, device=device).tril()  # worst case
            start = time.perf_counter()
            kv.forward(ids, torch.arange(past, past + k, device=device), chain, past)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if warm:
                times[k].append(time.perf_counter() - start)
            kv.keep(past, k, none_kept)
        # Warm-up: one round at least (compiled: it compiles every shape), then ``warmup`` seconds of forwards
        # or WARMUP_ROUNDS rounds, whichever comes first (a tiny model's round takes milliseconds).
        rounds += 1
        warm = warm or time.perf_counter() - began >= warmup or rounds >= WARMUP_ROUNDS
    return {k: statistics.median(v) for k, v in times.items()}


def measure_curve(model, repeats: int = 3, compiled: bool = False,
                  packed: bool = False) -> tuple[dict[int, float], dict[int, float], int]:
    """t(n) on the grid at PAST, and at a long past (LONG_PAST, or less where the model's positions end) for
    LONG_GRID: (base, long, long past). Eager only: a compiled graph is per cache length, and a GPU's
    attention barely grows with the past. Keys are tree nodes (the root excluded)."""
    sizes = grid(model, compiled)
    base = measure_forward(model, [n + 1 for n in sizes], repeats=repeats, compiled=compiled, packed=packed)
    wanted = [n + 1 for n in LONG_GRID if n in sizes]
    long_past = min(LONG_PAST, (context_limit(model.config) or LONG_PAST + 2 * max(GRID)) - max(wanted) - 1)
    long: dict[int, float] = {}
    if not compiled and long_past >= 2 * PAST:
        long = {k - 1: v for k, v in measure_forward(model, wanted, past=long_past, repeats=repeats, packed=packed,
                                                      warmup=0.0).items()}
    return {k - 1: v for k, v in base.items()}, long, long_past



def cache_key(model, compiled: bool = False, packed: bool = False) -> str:
    """Latency depends on shapes, not weights: the config (minus its name), device, dtype, threads, torch, and
    the forward's path (compiled, eager with packed weights, eager; eager with grouped-head tree attention)."""
    from msn.decoding import attention

    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    device = model.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
    quant = getattr(model, "_msn_quantize", "none")  # int4 Linear layers (msn.int4): another kernel, another t(n)
    ident = [config, where, str(model.dtype), torch.__version__] + ([quant] if quant != "none" else [])
    raw = json.dumps(ident, sort_keys=True, default=str)
    arch = config.get("model_type") or "model"
    kind = "-compiled" if compiled else "-packed" if packed else ""
    gqa = not compiled and attention.applies(model)
    kind += "-gqa" if gqa else ""
    kind += "-rows" if gqa and attention.tree_rows and model.dtype in attention.ROWS_DTYPES else ""
    kind += f"-{quant}" if quant != "none" else ""
    return (f"{arch}-{str(model.dtype).removeprefix('torch.')}-{where.replace(' ', '_')}{kind}-"
            f"{hashlib.sha1(raw.encode()).hexdigest()[:12]}")


def monotone(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): verifying more tokens never costs
    less, so a dip in a noisy measurement is noise."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return [s / c for s, c in blocks for _ in range(int(c))]


class Latency:
    """Piecewise-linear t(n, past) over measured grid points, refined online; ``stale`` once forward times
    have drifted far from what was measured.

    t(n, past) = t(n) at PAST + slope(n) * (past - PAST): attention grows with the cache, and more for wide
    trees, so a curve measured at one past mis-sizes trees on long prompts. The engine observes the forward
    alone (what was measured) and, apart, the step's own work around it (drafting, choosing, accepting): that
    ``overhead`` is paid whatever the tree's size, so it enters the tokens/s choice but not the drift."""

    def __init__(self, seconds: dict[int, float], source: str = "measured", path: Path | None = None,
                 generation: int = 0, slopes: dict[int, float] | None = None):
        self.sizes = sorted(seconds)
        # As measured, dips included: drift is judged against these. A dip can be real (fp32: a one-token step runs
        # unpacked, 57 ms, a 2-token tree packed, 65 ms, 3-5 tokens 49 ms; §24), and judged against the pooled
        # curve every one-token step looked 7-17% slow until the curve was called stale.
        self.raw = [float(seconds[n]) for n in self.sizes]
        self.seconds = monotone(self.raw)  # what the tree is sized with: a noisy dip would draw every tree to it
        slopes = slopes or {0: 0.0}  # none measured: no past term
        self.slope_sizes = sorted(slopes)
        self.slopes = [max(float(slopes[n]), 0.0) for n in self.slope_sizes]  # seconds per past token
        self.source, self.path, self.generation = source, path, generation
        self.drift, self.steps = 1.0, 0  # moving average of observed / measured forward time; steps observed
        self.overhead = 0.0  # moving average of a step's seconds outside the forward

    @classmethod
    def from_measurements(cls, base: dict[int, float], long: dict[int, float], long_past: int = LONG_PAST,
                          **kw) -> Latency:
        """From t(n) at PAST and t(n) at ``long_past`` for some n (none: no past term)."""
        slopes = {n: (t - base[n]) / (long_past - PAST) for n, t in long.items() if n in base}
        return cls(base, slopes=slopes or None, **kw)

    @property
    def max_nodes(self) -> int:
        return self.sizes[-1]

    def _bracket(self, n: float) -> tuple[int, int, float]:
        i = min(max(bisect.bisect_left(self.sizes, n), 1), len(self.sizes) - 1)
        x0, x1 = self.sizes[i - 1], self.sizes[i]
        return i - 1, i, (n - x0) / (x1 - x0)

    def _interpolate(self, values: Sequence[float], n: float) -> float:
        if len(self.sizes) == 1:
            return values[0]
        a, b, w = self._bracket(n)
        return max(values[a] + (values[b] - values[a]) * w, 1e-9)

    def slope(self, n: float) -> float:
        """Seconds each past token adds to a forward over n tree nodes (linear between measured sizes)."""
        xs, ys = self.slope_sizes, self.slopes
        if n <= xs[0] or len(xs) == 1:
            return ys[0]
        if n >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_left(xs, n)
        w = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + (ys[i] - ys[i - 1]) * w

    def _at(self, values: Sequence[float], n: float, past: int) -> float:
        base = self._interpolate(values, n)
        return max(base + self.slope(n) * (past - PAST), 0.5 * base)  # below PAST: never less than half

    def predict(self, n: int, past: int = PAST) -> float:
        """The forward alone: n tree nodes (the root excluded) on a cache of ``past`` entries."""
        return self._at(self.seconds, n, past)

    def curve(self, upto: int, past: int = PAST) -> list[float]:
        """A step's seconds for n = 0..upto tree nodes at this past, the step's own work included: what the
        tree is sized with."""
        if len(self.sizes) == 1 or upto > self.sizes[-1]:  # extrapolating: the scalar path's own rule
            return [self.predict(n, past) + self.overhead for n in range(upto + 1)]
        n = np.arange(upto + 1)  # predict() for every n at once: this runs every step, over up to 64 sizes
        base = np.maximum(np.interp(n, self.sizes, self.seconds), 1e-9)
        slope = np.interp(n, self.slope_sizes, self.slopes)  # np.interp holds the end values, as slope() does
        return (np.maximum(base + slope * (past - PAST), 0.5 * base) + self.overhead).tolist()

    def proposal_cap(self, past: int = PAST) -> int | None:
        """The most nodes worth proposing at this past: the largest n with t(n) <= PROPOSE_UP_TO x t(0)."""
        if PROPOSE_UP_TO is None:
            return None
        t = self.curve(self.max_nodes, past)  # the step's own work is in every entry: it only loosens the cap
        return max(n for n in range(len(t)) if t[n] <= PROPOSE_UP_TO * t[0])

    def observe(self, n: int, seconds: float, past: int = PAST, step_seconds: float | None = None) -> None:
        """Move the grid points around n toward an observed forward time (outliers clipped), keep the curve
        non-decreasing (a dip would draw every later tree to it), track the drift from the measurement and,
        given the whole step's time, the work around the forward."""
        was_stale = self.stale
        self.steps += 1
        self.drift *= 1.0 + DRIFT_ALPHA * (_clip(seconds / self._at(self.raw, n, past)) - 1.0)
        if step_seconds is not None:
            self.overhead += ALPHA * (max(step_seconds - seconds, 0.0) - self.overhead)
        if self.stale and not was_stale:
            mark_stale(self)
        if len(self.sizes) == 1:
            return
        ratio = _clip(seconds / self.predict(n, past))
        a, b, w = self._bracket(min(max(n, self.sizes[0]), self.sizes[-1]))
        for j, share in ((a, 1.0 - w), (b, w)):
            self.seconds[j] *= 1.0 + ALPHA * share * (ratio - 1.0)
        self.seconds = monotone(self.seconds)

    @property
    def stale(self) -> bool:
        """Forward times have stayed DRIFT_LIMIT off the measured curve: it was measured under other
        conditions, and its shape, which sizes the tree, is suspect."""
        return self.steps >= DRIFT_MIN_STEPS and not 1.0 / DRIFT_LIMIT <= self.drift <= DRIFT_LIMIT

    @property
    def measured(self) -> list[float]:
        """The pooled curve as it was measured (the refinement moves ``seconds``): what a cached file holds."""
        return monotone(self.raw)

    def to_dict(self) -> dict:
        return {"version": VERSION, "sizes": self.sizes, "seconds": self.seconds, "raw": self.raw,
                "source": self.source, "past": PAST, "slope_sizes": self.slope_sizes, "slopes": self.slopes}

    @classmethod
    def from_dict(cls, data: dict, **kw) -> Latency:
        """``raw`` (the points before pooling) where the file has them; a file written before them pools as before."""
        slopes = dict(zip(data["slope_sizes"], data["slopes"], strict=True))
        points = data.get("raw") or data["seconds"]
        return cls(dict(zip(data["sizes"], points, strict=True)), slopes=slopes, **kw)


def _clip(ratio: float) -> float:
    return min(max(ratio, 0.25), 4.0)


def mark_stale(latency: Latency) -> None:
    """Flag the cached file this curve came from, so the next process measures again (a one-request CLI
    never reaches a second request of its own). Left alone if another process has re-measured it since."""
    if latency.path is None:
        return
    try:
        data = json.loads(latency.path.read_text())
        if data.get("seconds") == latency.measured:
            _write_json(latency.path, {**data, "stale": True})
    except (OSError, ValueError, AttributeError):
        pass


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def latency_path(model, compiled: bool = False, packed: bool = False) -> Path:
    from msn.models import cache_dir

    return cache_dir() / "latency" / f"{cache_key(model, compiled, packed)}.json"


def grid(model=None, compiled: bool = False) -> list[int]:
    """Tree sizes (root excluded) to measure. Compiled, each bucket measured is one more compilation: up to
    the largest bucket on a GPU, up to 16 tokens on a CPU (where larger trees rarely pay anyway)."""
    from msn.decoding.static_kv import CPU_AUTO_TOKENS, auto_buckets

    if not compiled:
        return list(GRID)
    cap = CPU_AUTO_TOKENS if model is None else max(auto_buckets(model))
    return [n for n in GRID if n + 1 <= cap]


def load_or_measure(model, compiled: bool = False, packed: bool = False) -> Latency:
    """The cached curve for this model shape/device/dtype/threads/path, or a fresh measurement (saved
    atomically) when there is none or the cached one was marked stale."""
    path = latency_path(model, compiled, packed)
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            logger.info("msn: the cached t(n) curve is from an older msn; measuring it again (a few seconds): %s",
                        path)
        elif not data.get("stale"):
            return Latency.from_dict(data, source=str(path), path=path)
        else:
            logger.info("msn: the cached t(n) curve did not match the forward times of its last use; measuring it "
                        "again (a few seconds): %s", path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        logger.info("msn: measuring forward latency t(n) for the auto tree, once per model shape/device/dtype/"
                    "threads (a few seconds): %s", path)
    return remeasure(model, compiled=compiled, packed=packed)[0]


def for_next_request(latency: Latency | None, model, compiled: bool = False, packed: bool = False,
                     measure_again: bool = True) -> Latency:
    """The curve a new request should size its trees with: the one in use, unless step times have shown it
    stale (then measured again, up to MAX_GENERATIONS times per process, and only where ``measure_again``:
    not while other requests decode beside it, whom a measurement would stall for seconds), or the cached one."""
    if latency is None:
        return load_or_measure(model, compiled, packed)
    if not measure_again or not latency.stale or latency.generation >= MAX_GENERATIONS:
        return latency
    log = logger.info if latency.path not in _ANNOUNCED else logger.debug  # said once per curve and process
    _ANNOUNCED.add(latency.path)
    log("msn: forward times ran x%.2f the measured t(n) curve; measuring it again (a few seconds)", latency.drift)
    fresh = remeasure(model, compiled=compiled, packed=packed)[0]
    fresh.generation = latency.generation + 1
    return fresh


_ANNOUNCED: set = set()  # curves whose re-measurement this process has already announced


def _busy() -> bool:
    """More runnable work than cores: a measurement now says more about the neighbours than the model."""
    try:
        return os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)
    except OSError:
        return False


def remeasure(model, repeats: int = 3, compiled: bool = False, packed: bool = False) -> tuple[Latency, Path]:
    """Measure t(n) on the grid now and replace the cached curve (``msn tune-tree`` calls this). On a
    CPU that is busy with other work the curve is used for this process only, never cached."""
    path = latency_path(model, compiled, packed)
    base, long, long_past = measure_curve(model, repeats=repeats, compiled=compiled, packed=packed)
    latency = Latency.from_measurements(base, long, long_past, source=str(path), path=path)
    if model.device.type == "cpu" and _busy():
        latency.source, latency.path = "measured on a busy CPU (not cached)", None
        return latency, path
    try:
        _write_json(path, latency.to_dict())
    except OSError:
        pass  # a read-only cache only costs the next process a re-measurement
    return latency, path
