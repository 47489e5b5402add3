"""Durations as people read them on a clock, H:MM:SS: one format for the progress lines' ETAs and the
`runs` table's wall times. A module of its own, importing nothing, so that `python -m app runs` shows it
without importing torch or ignite."""
from __future__ import annotations


def clock(seconds: float) -> str:
    """H:MM:SS, the hours unbounded (a week-long run shows 168:00:00), seconds rounded."""
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"
