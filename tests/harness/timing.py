"""Start/stop durations of harness services, reported by tests/conftest.py
at the end of a pytest run (we track what the real components cost)."""

from __future__ import annotations

# (label, phase, seconds), in the order things happened.
TIMINGS: list[tuple[str, str, float]] = []


def record_timing(label: str, phase: str, seconds: float) -> None:
    TIMINGS.append((label, phase, seconds))
