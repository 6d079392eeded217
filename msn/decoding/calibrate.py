"""Online calibration: a source's score is not a probability of acceptance; what was accepted is.

For every candidate whose parent turned out correct, we know whether the candidate itself was: that is a
trial of P(node accepted | parent accepted) for the candidate's (source, bucket). Counting trials over all
proposed candidates, not only the verified ones, keeps the estimate free of the tree's own selection.
"""

from __future__ import annotations

from typing import Any

PRIOR_WEIGHT = 2.0  # pseudo-trials given to a source's own score before evidence arrives
HALF_LIFE = 2000.0  # counts are halved past this many trials per bucket, so estimates follow drift


class Calibrator:
    def __init__(self, prior_weight: float = PRIOR_WEIGHT, half_life: float = HALF_LIFE):
        self.prior_weight, self.half_life = prior_weight, half_life
        self.counts: dict[tuple[str, Any], list[float]] = {}  # (source, bucket) -> [hits, trials]

    def estimate(self, source: str, bucket: Any, score: float) -> float:
        hits, trials = self.counts.get((source, bucket), (0.0, 0.0))
        prior = min(max(score, 0.001), 0.99)
        return (hits + self.prior_weight * prior) / (trials + self.prior_weight)

    def record(self, source: str, bucket: Any, hit: bool) -> None:
        c = self.counts.setdefault((source, bucket), [0.0, 0.0])
        c[0] += hit
        c[1] += 1.0
        if c[1] > self.half_life:
            c[0] *= 0.5
            c[1] *= 0.5

    def table(self) -> dict[str, dict[str, float]]:
        """Observed acceptance per source and bucket (for reports)."""
        out: dict[str, dict[str, float]] = {}
        for (source, bucket), (hits, trials) in sorted(self.counts.items(), key=str):
            out.setdefault(source, {})[str(bucket)] = round(hits / trials, 4) if trials else 0.0
        return out
