"""Small helpers shared by the benchmarks: timing, resident memory, deterministic randomness."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import polars as pl

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process now (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def settled_rss_bytes(timeout_s: float = 30.0, step_s: float = 1.0) -> int:
    """Resident set size once it has stopped falling: polars' allocator (jemalloc) hands freed
    pages back to the system after a decay of about 10 s, so right after a burst of work the
    RSS still counts memory the process no longer holds. Polled every `step_s` until two
    readings agree within 1 MiB, at most `timeout_s`."""
    previous = rss_bytes()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(step_s)
        current = rss_bytes()
        if abs(previous - current) < 2**20:
            return current
        previous = current
    return previous


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a small sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(samples_s: list[float]) -> dict[str, float]:
    values = [ms(s) for s in samples_s]
    return {
        "median_ms": statistics.median(values),
        "p90_ms": percentile(values, 90),
        "min_ms": min(values),
        "max_ms": max(values),
        "n": len(values),
    }


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def uniform(index: pl.Expr, seed: int) -> pl.Expr:
    """A deterministic pseudo-random float in [0, 1) per row, from the row's index (no numpy)."""
    return (index.hash(seed) % (1 << 32)).cast(pl.Float64) / float(1 << 32)


def machine_line() -> str:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), polars {pl.__version__}, threads {pl.thread_pool_size()}"
