"""speedup.png: per-category speedup bars, one bar per method, so a reader sees where each method wins."""

from __future__ import annotations

import os
from collections.abc import Mapping


def plot_speedup(summary: Mapping, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = summary.get("baseline")
    methods = [m for m in summary["methods"] if m != baseline]
    groups = [*summary["categories"], "overall"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.0))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        entry = summary["methods"][m]
        stats = [entry["categories"][c] for c in groups[:-1]] + [entry["overall"]]
        values = [s["speedup"] or 0.0 for s in stats]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right")
    ax.set_ylabel(f"speedup vs {baseline or 'baseline'}")
    ax.set_title(f"{summary.get('model', '')} {summary.get('dtype', '')} on {summary.get('device', '')}".strip())
    if methods:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
