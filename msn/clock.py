"""When and under what load: the two facts every record of a run carries (bench, distill, reproduce driver).

On a shared 2-core machine a timing means little without the load it was taken under, and a result file
without a UTC time cannot be matched to the log of what else ran then.
"""

from __future__ import annotations

import datetime as _dt
import os


def now() -> str:
    """UTC wall time to the minute, e.g. ``2026-11-27 14:50 UTC``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> float | None:
    """1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
