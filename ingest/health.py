"""How each ingest source is doing, per stream: what the rule engine's source-health rules read.

`SourceHealth` keeps, per (source, stream), how many records were accepted and rejected over the
last five minutes (in ten-second buckets, so memory is constant) and when the last record
arrived. The service records each batch once (per batch, never per record) and builds
`source_health_frame(...)` at every tick; the engine turns it into the `source` and
`source_stream` views (IngestStalled, a feed that is mostly rejected).

Call it from one thread (the service's event loop); it takes no lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import polars as pl

WINDOW_MS = 5 * 60 * 1000
BUCKET_MS = 10 * 1000

# Must equal rules.views.SOURCES_SCHEMA (a unit test keeps them in step; ingest does not import
# rules).
SOURCE_HEALTH_SCHEMA = pl.Schema(
    {
        "source": pl.String(),
        "stream": pl.String(),
        "up": pl.Boolean(),
        "last_event_ms": pl.Int64(),
        "accepted_recent": pl.Int64(),
        "rejected_recent": pl.Int64(),
    }
)


@dataclass
class _Counts:
    # (bucket start ms, accepted, rejected), oldest first
    buckets: deque[list[int]] = field(default_factory=deque)
    last_event_ms: int | None = None


class SourceHealth:
    def __init__(self, window_ms: int = WINDOW_MS, bucket_ms: int = BUCKET_MS) -> None:
        if window_ms <= 0 or bucket_ms <= 0 or window_ms % bucket_ms:
            raise ValueError("window_ms must be a positive multiple of bucket_ms")
        self._window_ms = window_ms
        self._bucket_ms = bucket_ms
        self._counts: dict[tuple[str, str], _Counts] = {}

    def register(self, source: str, streams: Iterable[str]) -> None:
        """Make `source`'s streams appear (with no events yet) before their first record."""
        for stream in streams:
            self._counts.setdefault((source, stream), _Counts())

    def record(self, source: str, stream: str, accepted: int, rejected: int, at_ms: int) -> None:
        """One batch of `stream` from `source` arrived at `at_ms`: `accepted` valid records and
        `rejected` dead letters."""
        counts = self._counts.setdefault((source, stream), _Counts())
        if accepted + rejected > 0:
            counts.last_event_ms = max(at_ms, counts.last_event_ms or at_ms)
        start = at_ms - at_ms % self._bucket_ms
        if counts.buckets and counts.buckets[-1][0] >= start:
            # Same bucket (or a caller's clock stepped back): count it in the newest one.
            counts.buckets[-1][1] += accepted
            counts.buckets[-1][2] += rejected
        else:
            counts.buckets.append([start, accepted, rejected])
        self._expire(counts, at_ms)

    def _expire(self, counts: _Counts, now_ms: int) -> None:
        oldest = now_ms - self._window_ms
        while counts.buckets and counts.buckets[0][0] + self._bucket_ms <= oldest:
            counts.buckets.popleft()

    def recent(self, source: str, stream: str, now_ms: int) -> tuple[int, int]:
        """(accepted, rejected) over the last window before `now_ms`."""
        counts = self._counts.get((source, stream))
        if counts is None:
            return 0, 0
        self._expire(counts, now_ms)
        return sum(b[1] for b in counts.buckets), sum(b[2] for b in counts.buckets)

    def rows(self, up: Mapping[str, bool], now_ms: int) -> list[tuple[str, str, bool, int | None, int, int]]:
        out = []
        for (source, stream), counts in sorted(self._counts.items()):
            accepted, rejected = self.recent(source, stream, now_ms)
            out.append((source, stream, bool(up.get(source, False)), counts.last_event_ms, accepted, rejected))
        return out


def source_health_frame(health: SourceHealth, up: Mapping[str, bool], now_ms: int) -> pl.DataFrame:
    """One row per (source, stream) with SOURCE_HEALTH_SCHEMA: whether the source's transport is
    connected (`up`, by source name), when its last record of the stream arrived (null before
    the first), and the accepted / rejected records of the last five minutes."""
    return pl.DataFrame(health.rows(up, now_ms), schema=SOURCE_HEALTH_SCHEMA, orient="row")
