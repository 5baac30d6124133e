"""How each ingest source is doing, per stream and partition: what the source-health rules read.

`SourceHealth` keeps, per (source, stream, partition), how many records were accepted and
rejected over the last five minutes (in ten-second buckets, so memory is constant) and when the
last record arrived. Partitions are Kafka's (a partition carries the instances whose keys hash
to it, so one broken edge feed shows up in its partition even while the topic as a whole is
fine); sources without partitions (MQTT) count under partition None. The service records each
batch once per partition it holds (never per record) and builds `source_health_frame(...)` at
every tick; the engine turns it into the `source`, `source_stream` and `source_partition` views
(IngestStalled, a feed that is mostly rejected).

Call it from one thread (the service's event loop); it takes no lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from collections import Counter

import polars as pl

WINDOW_MS = 5 * 60 * 1000
BUCKET_MS = 10 * 1000

# Must equal rules.views.SOURCES_SCHEMA (a unit test keeps them in step; ingest does not import
# rules).
SOURCE_HEALTH_SCHEMA = pl.Schema(
    {
        "source": pl.String(),
        "stream": pl.String(),
        "partition": pl.Int32(),  # null for sources without partitions
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
        self._counts: dict[tuple[str, str, int | None], _Counts] = {}

    def register(self, source: str, streams: Iterable[str]) -> None:
        """Make `source`'s streams appear (with no events yet) before their first record."""
        for stream in streams:
            if not any(key[:2] == (source, stream) for key in self._counts):
                self._counts[(source, stream, None)] = _Counts()

    def record_batch(
        self, source: str, stream: str, partitions: Sequence[int], rejected: Iterable[int], at_ms: int
    ) -> None:
        """One batch: `partitions[i]` is the partition of its record i (negative: the transport
        has none) and `rejected` the positions of the records that went to dead letters."""
        total = Counter(partitions)  # C-level counting: no Python frame per record
        bad = Counter(partitions[i] for i in rejected)
        self.record_counts(source, stream, total - bad, bad, at_ms)

    def record_counts(
        self, source: str, stream: str, accepted: Mapping[int, int], rejected: Mapping[int, int], at_ms: int
    ) -> None:
        """Accepted and rejected records of one batch, by partition (negative: none)."""
        for partition in sorted(set(accepted) | set(rejected)):
            self.record(source, stream, accepted.get(partition, 0), rejected.get(partition, 0), at_ms, partition)

    def record(
        self, source: str, stream: str, accepted: int, rejected: int, at_ms: int, partition: int | None = None
    ) -> None:
        """`accepted` valid records and `rejected` dead letters of `stream` from `source`'s
        `partition` (None or negative: no partitions) arrived at `at_ms`."""
        key = (source, stream, partition if partition is not None and partition >= 0 else None)
        if key[2] is not None:
            # The stream has partitions after all: the placeholder `register` made goes.
            placeholder = self._counts.get((source, stream, None))
            if placeholder is not None and not placeholder.buckets and placeholder.last_event_ms is None:
                del self._counts[(source, stream, None)]
        counts = self._counts.setdefault(key, _Counts())
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

    def recent(self, source: str, stream: str, now_ms: int, partition: int | None = None) -> tuple[int, int]:
        """(accepted, rejected) of one partition over the last window before `now_ms`."""
        counts = self._counts.get((source, stream, partition))
        if counts is None:
            return 0, 0
        self._expire(counts, now_ms)
        return sum(b[1] for b in counts.buckets), sum(b[2] for b in counts.buckets)

    def rows(
        self, up: Mapping[str, bool], now_ms: int
    ) -> list[tuple[str, str, int | None, bool, int | None, int, int]]:
        out = []
        for (source, stream, partition), counts in sorted(self._counts.items(), key=lambda kv: _order(kv[0])):
            accepted, rejected = self.recent(source, stream, now_ms, partition)
            out.append(
                (source, stream, partition, bool(up.get(source, False)), counts.last_event_ms, accepted, rejected)
            )
        return out


def _order(key: tuple[str, str, int | None]) -> tuple[str, str, int]:
    source, stream, partition = key
    return source, stream, -1 if partition is None else partition


def source_health_frame(health: SourceHealth, up: Mapping[str, bool], now_ms: int) -> pl.DataFrame:
    """One row per (source, stream, partition) with SOURCE_HEALTH_SCHEMA: whether the source's
    transport is connected (`up`, by source name), when its last record of the stream and
    partition arrived (null before the first), and the accepted / rejected records of the last
    five minutes."""
    return pl.DataFrame(health.rows(up, now_ms), schema=SOURCE_HEALTH_SCHEMA, orient="row")
