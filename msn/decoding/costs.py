"""t(n): what one forward over the root plus n tree tokens costs this model on this device, measured.

The tree is sized per step by expected tokens per second, so it needs this curve: flat up to ~16 tokens
for bf16 on some CPUs, linear for fp32, flat up to hundreds on a GPU. Measured once (a few seconds) per
model shape, device, dtype and thread count, cached as JSON under the msn cache dir, then refined online
from the step times the decoder actually sees, so a loaded machine shifts the choice.
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

import torch

GRID = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # tree nodes (the root excluded)
PAST = 128  # cache length while measuring
ALPHA = 0.1  # weight of one observed step in the online refinement
logger = logging.getLogger("msn")


@torch.inference_mode()
def measure_forward(model, sizes: Sequence[int], past: int = PAST, repeats: int = 3, seed: int = 0,
                    compiled: bool = False, packed: bool = False) -> dict[int, float]:
    """Median seconds of one forward over k new tokens on a ``past``-token cache, through the same
    verification path the engine uses (k = 1: plain causal step; k > 1: a chain with explicit positions and
    a 4-D mask; ``compiled``: the static compiled path, whose first round compiles each bucket; ``packed``:
    the eager path with packed Linear weights, msn.decoding.packed; the eager paths attend as the engine does,
    msn.decoding.attention)."""
    from msn.decoding.attention import gqa_attention
    from msn.decoding.packed import packing

    with packing(model, packed) as pk, gqa_attention(model, not compiled):
        return _measure(model, sizes, past, repeats, seed, compiled, pk)


def _measure(model, sizes, past, repeats, seed, compiled, pk) -> dict[int, float]:
    from msn.decoding.static_kv import make_kv

    gen = torch.Generator().manual_seed(seed)
    vocab, device = model.config.vocab_size, model.device
    kv = make_kv(model, past + max(sizes), compiled, pk)
    kv.prefill(torch.randint(0, vocab, (1, past), generator=gen).to(device))
    none_kept = torch.empty(0, dtype=torch.long, device=device)
    times: dict[int, list[float]] = {k: [] for k in sizes}
    for rep in range(repeats + 1):  # round-robin over sizes, so drift hits every size alike
        for k in sizes:
            ids = torch.randint(0, vocab, (k,), generator=gen).to(device)
            chain = None if k == 1 else torch.ones(k, k, dtype=torch.bool, device=device).tril()  # worst case
            start = time.perf_counter()
            kv.forward(ids, torch.arange(past, past + k, device=device), chain, past)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:  # the first round warms up (and, compiled, compiles) every shape
                times[k].append(time.perf_counter() - start)
            kv.keep(past, k, none_kept)
    return {k: statistics.median(v) for k, v in times.items()}


def cache_key(model, compiled: bool = False, packed: bool = False) -> str:
    """Latency depends on shapes, not weights: the config (minus its name), device, dtype, threads, torch, and
    the forward's path (compiled, eager with packed weights, eager)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    device = model.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
    raw = json.dumps([config, where, str(model.dtype), torch.__version__], sort_keys=True, default=str)
    arch = config.get("model_type") or "model"
    kind = "-compiled" if compiled else "-packed" if packed else ""
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
    """Piecewise-linear t(n) over measured grid points, refined online."""

    def __init__(self, seconds: dict[int, float], source: str = "measured"):
        self.sizes = sorted(seconds)
        self.seconds = monotone([float(seconds[n]) for n in self.sizes])
        self.source = source

    @property
    def max_nodes(self) -> int:
        return self.sizes[-1]

    def _bracket(self, n: float) -> tuple[int, int, float]:
        i = min(max(bisect.bisect_left(self.sizes, n), 1), len(self.sizes) - 1)
        x0, x1 = self.sizes[i - 1], self.sizes[i]
        return i - 1, i, (n - x0) / (x1 - x0)

    def predict(self, n: int) -> float:
        if len(self.sizes) == 1:
            return self.seconds[0]
        a, b, w = self._bracket(n)
        return max(self.seconds[a] + (self.seconds[b] - self.seconds[a]) * w, 1e-9)

    def curve(self, upto: int) -> list[float]:
        """t(0..upto), for choosing the tree size in one pass."""
        return [self.predict(n) for n in range(upto + 1)]

    def observe(self, n: int, seconds: float) -> None:
        """Move the grid points around n toward an observed step time (outliers clipped)."""
        if len(self.sizes) == 1:
            return
        ratio = min(max(seconds / self.predict(n), 0.25), 4.0)
        a, b, w = self._bracket(min(max(n, self.sizes[0]), self.sizes[-1]))
        for j, share in ((a, 1.0 - w), (b, w)):
            self.seconds[j] *= 1.0 + ALPHA * share * (ratio - 1.0)

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "seconds": self.seconds, "source": self.source}


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
    atomically)."""
    path = latency_path(model, compiled, packed)
    try:
        data = json.loads(path.read_text())
        return Latency(dict(zip(data["sizes"], data["seconds"], strict=True)), source=str(path))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    logger.info("msn: measuring forward latency t(n) for the auto tree, once per model shape/device/dtype/"
                "threads (a few seconds): %s", path)
    return remeasure(model, compiled=compiled, packed=packed)[0]


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
    measured = measure_forward(model, [n + 1 for n in grid(model, compiled)], repeats=repeats, compiled=compiled,
                               packed=packed)
    latency = Latency({k - 1: v for k, v in measured.items()}, source=str(path))
    if model.device.type == "cpu" and _busy():
        latency.source = "measured on a busy CPU (not cached)"
        return latency, path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(latency.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next process a re-measurement
    return latency, path
