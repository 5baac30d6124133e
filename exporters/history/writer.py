"""The history writer: evaluation ticks in, one row per entity per interval out.

`HistoryWriter` is synchronous and single-threaded: `absorb` folds one tick's views into the
current interval (running max / min / newest value per entity) and, when a tick belongs to a
later interval, writes the finished one; `add_transitions` queues alert transitions, written
within `transitions_delay_ms` (10 s) or with the next finished interval. `BackgroundWriter` runs it on its own thread so that writing never delays
evaluation: `offer` is O(1) and never blocks. Samples are "latest wins" — if the writer falls
behind, ticks are skipped (the interval's max is then taken over fewer ticks, its newest values
stay exact) — but alert transitions are never dropped.

A write that fails (disk full, store unreachable) is kept and retried at the next flush: alert
transitions always, finished intervals up to `max_pending_intervals`, oldest dropped first.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from exporters.history.store import HistoryStore
from exporters.history.tables import ALERTS, CLUSTER, LINK, NODE, VM, Table
from rules.engine import TickResult
from rules.views import Views

logger = logging.getLogger(__name__)

MAX_PENDING_INTERVALS = 10
TRANSITIONS_DELAY_MS = 10_000


@dataclass(frozen=True)
class Value:
    column: str  # in the table
    agg: str  # max | min | last
    expr: pl.Expr  # over the view


@dataclass(frozen=True)
class SampleSpec:
    """How one view becomes one series table."""

    table: Table
    view: str
    keys: tuple[str, ...]  # view columns that identify the entity (same names in the table)
    attrs: tuple[str, ...]  # labels that follow the newest sample
    values: tuple[Value, ...]

    def project(self, views: Views) -> pl.DataFrame:
        frame = views.of(self.view)
        attrs = [pl.col(a).cast(self.table.schema[a]) for a in self.attrs]
        values = [v.expr.cast(self.table.schema[v.column]).alias(v.column) for v in self.values]
        return frame.select(*self.keys, *attrs, *values)


SPECS: tuple[SampleSpec, ...] = (
    SampleSpec(
        VM,
        "vm_replication",
        ("vm",),
        ("hci_cluster", "target", "technology", "service_group"),
        (
            Value("lag_max_seconds", "max", pl.col("lag_seconds")),
            Value("lag_last_seconds", "last", pl.col("lag_seconds")),
            Value("rpo_target_seconds", "last", pl.col("rpo_target_seconds")),
            Value("pending_bytes", "last", pl.col("pending_bytes")),
        ),
    ),
    SampleSpec(
        LINK,
        "link",
        ("hci_cluster", "target"),
        (),
        (
            Value("saturation_max_ratio", "max", pl.col("saturation_ratio")),
            Value("saturation_last_ratio", "last", pl.col("saturation_ratio")),
        ),
    ),
    SampleSpec(
        CLUSTER,
        "cluster",
        ("hci_cluster",),
        (),
        (
            Value("iops_headroom_min_ratio", "min", pl.col("iops_headroom_ratio")),
            Value("iops_headroom_last_ratio", "last", pl.col("iops_headroom_ratio")),
        ),
    ),
    SampleSpec(
        NODE,
        "node",
        ("hci_cluster", "node"),
        (),
        (Value("up_min", "min", pl.col("up")), Value("up_last", "last", pl.col("up"))),
    ),
)

_SEEN = "__seen"
_NEW = "__new"
_HASH = "__hash"
_SEED = 0x5EED


@dataclass
class WriterStats:
    ticks: int = 0
    intervals_written: int = 0
    rows_written: int = 0
    transitions_written: int = 0
    write_failures: int = 0
    intervals_dropped: int = 0
    last_flush_ms: int | None = None
    fast_folds: int = 0  # ticks folded positionally (same entities in the same order)
    joined_folds: int = 0  # ticks folded by a join on the keys


class _Accumulator:
    """The current interval of one series table: one row per entity seen so far.

    Views come in a different row order at every tick (they are built with hash joins), so
    folding a tick needs the rows aligned by entity. A join on the labels costs about 600 ms at
    1,000,000 VMs; instead the accumulator keeps its rows sorted by a 64-bit hash of the keys,
    and each tick is sorted the same way (an integer arg-sort) — when the two hash columns are
    equal, the fold is positional. Labels (strings) are not moved at all on that path: they are
    taken from the newest tick, in its sorted order, when the interval is written. A tick with
    entities added or gone takes the join path, and so does a table once two of its entities
    share a hash within a tick (then every tick joins on the labels themselves). Not detected:
    one entity replaced by another with the same 64-bit hash between two ticks, all else equal
    (about 2^-64 per change)."""

    def __init__(self, spec: SampleSpec, stats: WriterStats) -> None:
        self.spec = spec
        self.stats = stats
        self.values = [v.column for v in spec.values]
        self.frame: pl.DataFrame | None = None  # _HASH, values, samples, last_at_ms; sorted by _HASH
        self.labels: pl.DataFrame | None = None  # keys and attrs aligned with `frame`, when known
        self.newest: tuple[pl.DataFrame, pl.Series] | None = None  # (tick, order) giving `labels`
        self.collided = False

    def _hash(self, sample: pl.DataFrame) -> pl.Series:
        keys = self.spec.keys
        expr = pl.col(keys[0]).hash(_SEED) if len(keys) == 1 else pl.struct(*keys).hash(_SEED)
        return sample.select(expr.alias(_HASH)).to_series()

    def _labels(self) -> pl.DataFrame:
        if self.labels is None:
            assert self.newest is not None
            tick, order = self.newest
            self.labels = tick.select(*self.spec.keys, *self.spec.attrs)[order]
        return self.labels

    def add(self, sample: pl.DataFrame, now_ms: int) -> None:
        hashes = self._hash(sample)
        order = hashes.arg_sort()
        sorted_hashes = hashes.gather(order)
        same = self.frame is not None and self.frame.get_column(_HASH).equals(sorted_hashes)
        # (The accumulator's hashes are distinct, so a tick with the same ones has no repeats.)
        if not self.collided and not same and (sorted_hashes == sorted_hashes.shift(1)).any():
            self.collided = True  # two entities, one hash: align by the labels from now on
        if self.frame is None:
            self.frame = sample.select(self.values)[order].with_columns(
                sorted_hashes, pl.lit(1, dtype=pl.Int64).alias("samples"), pl.lit(now_ms).alias("last_at_ms")
            )
            self.newest, self.labels = (sample, order), None
            if self.collided:
                self._labels()
            return
        if not self.collided and same:
            new = sample.select(self.values)[order].rename({c: c + _NEW for c in self.values})
            both = pl.concat([self.frame, new.with_columns(pl.lit(True).alias(_SEEN))], how="horizontal")
            self.frame = both.select(_HASH, *self._folded(), *self._counters(now_ms))
            self.newest, self.labels = (sample, order), None
            self.stats.fast_folds += 1
            return
        self._join(sample, hashes, now_ms)
        self.stats.joined_folds += 1

    def _folded(self) -> list[pl.Expr]:
        seen = pl.col(_SEEN).fill_null(False)
        out: list[pl.Expr] = []
        for v in self.spec.values:
            if v.agg == "max":
                out.append(pl.max_horizontal(v.column, v.column + _NEW).alias(v.column))
            elif v.agg == "min":
                out.append(pl.min_horizontal(v.column, v.column + _NEW).alias(v.column))
            else:
                out.append(pl.when(seen).then(pl.col(v.column + _NEW)).otherwise(pl.col(v.column)).alias(v.column))
        return out

    def _counters(self, now_ms: int) -> list[pl.Expr]:
        seen = pl.col(_SEEN).fill_null(False)
        return [
            (pl.col("samples").fill_null(0) + seen.cast(pl.Int64)).alias("samples"),
            pl.when(seen).then(pl.lit(now_ms)).otherwise(pl.col("last_at_ms")).alias("last_at_ms"),
        ]

    def _join(self, sample: pl.DataFrame, hashes: pl.Series, now_ms: int) -> None:
        assert self.frame is not None
        spec = self.spec
        labels = [*spec.keys, *spec.attrs]
        acc = pl.concat([self.frame, self._labels()], how="horizontal")
        new = sample.with_columns(hashes)
        new = new.rename({c: c + _NEW for c in new.columns if c != _HASH or self.collided})
        new = new.with_columns(pl.lit(True).alias(_SEEN))
        if self.collided:
            both = acc.join(
                new, left_on=list(spec.keys), right_on=[k + _NEW for k in spec.keys], how="full", nulls_equal=True
            )
        else:
            both = acc.join(new, on=_HASH, how="full", coalesce=True)
        seen = pl.col(_SEEN).fill_null(False)
        newest = [pl.when(seen).then(pl.col(c + _NEW)).otherwise(pl.col(c)).alias(c) for c in labels]
        folded = both.select(
            pl.when(seen).then(pl.col(_HASH + _NEW) if self.collided else pl.col(_HASH)).otherwise(pl.col(_HASH)).alias(_HASH),
            *newest,
            *self._folded(),
            *self._counters(now_ms),
        ).sort(_HASH, *spec.keys)
        self.frame = folded.select(_HASH, *self.values, "samples", "last_at_ms")
        self.labels, self.newest = folded.select(labels), None

    def rows(self, start_ms: int, interval_ms: int) -> pl.DataFrame:
        table = self.spec.table
        if self.frame is None:
            return table.empty()
        return (
            pl.concat([self.frame, self._labels()], how="horizontal")
            .with_columns(
                pl.lit(start_ms, dtype=pl.Int64).alias("ts_ms"), pl.lit(interval_ms, dtype=pl.Int64).alias("interval_ms")
            )
            .select(table.schema.names())
            .cast(dict(table.schema))  # type: ignore[arg-type]
        )


def transitions_rows(transitions: pl.DataFrame) -> pl.DataFrame:
    """A tick's transitions (rules.lifecycle.TRANSITION_SCHEMA with the alerts' `labels` and
    `annotations` JSON) as rows of the alert log."""
    missing = [pl.lit(None, dtype=pl.String).alias(c) for c in ("labels", "annotations") if c not in transitions.columns]
    return transitions.with_columns(*missing).with_columns(
        pl.col("labels").str.json_path_match("$.vm").alias("vm"),
        pl.col("labels").str.json_path_match("$.node").alias("node"),
    ).select(ALERTS.schema.names()).cast(dict(ALERTS.schema))  # type: ignore[arg-type]


@dataclass
class HistoryWriter:
    """Folds ticks into intervals of `interval_ms` and writes them to `store`. Not thread-safe:
    call from one thread (BackgroundWriter does)."""

    store: HistoryStore
    interval_ms: int = 60_000
    specs: tuple[SampleSpec, ...] = SPECS
    max_pending_intervals: int = MAX_PENDING_INTERVALS
    transitions_delay_ms: int = TRANSITIONS_DELAY_MS
    stats: WriterStats = field(default_factory=WriterStats)

    def __post_init__(self) -> None:
        if self.interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self._start: int | None = None
        self._acc = [_Accumulator(s, self.stats) for s in self.specs]
        self._pending: deque[tuple[Table, pl.DataFrame]] = deque()
        self._transitions: list[pl.DataFrame] = []
        self._transitions_since: int | None = None

    @property
    def interval_start_ms(self) -> int | None:
        return self._start

    def absorb(self, views: Views) -> None:
        """Fold one tick into the current interval; write the previous one when this tick is
        in a later interval."""
        start = views.now_ms - views.now_ms % self.interval_ms
        if self._start is not None and start != self._start:
            self._finish_interval()
        self._start = start
        for acc in self._acc:
            acc.add(acc.spec.project(views), views.now_ms)
        self.stats.ticks += 1
        if self._transitions_since is not None and views.now_ms - self._transitions_since >= self.transitions_delay_ms:
            self._write_pending()

    def add_transitions(self, transitions: pl.DataFrame) -> None:
        """Queue alert transitions; they are written within `transitions_delay_ms` of evaluation
        time (at the next tick after that), or with the next finished interval."""
        if not transitions.is_empty():
            self._transitions.append(transitions_rows(transitions))
            if self._transitions_since is None:
                self._transitions_since = int(transitions.get_column("at_ms").min())  # type: ignore[arg-type]

    def flush(self, partial: bool = False) -> None:
        """Write what is pending. With `partial`, also the current, unfinished interval (at
        shutdown; its rows merge by key with the rest of the interval written after a restart)."""
        if partial and self._start is not None:
            self._finish_interval()
        self._write_pending()

    def _finish_interval(self) -> None:
        assert self._start is not None
        for acc in self._acc:
            rows = acc.rows(self._start, self.interval_ms)
            if not rows.is_empty():
                self._pending.append((acc.spec.table, rows))
        self._acc = [_Accumulator(s, self.stats) for s in self.specs]
        self.stats.intervals_written += 1
        self.stats.last_flush_ms = self._start
        self._start = None
        self._write_pending()

    def _write_pending(self) -> None:
        if self._transitions:
            batch = pl.concat(self._transitions)
            try:
                self.store.write_rows(ALERTS, batch)
            except Exception as exc:  # any storage failure: keep the transitions for the next try
                self.stats.write_failures += 1
                logger.warning("history: writing %d alert transitions failed (%s); will retry", batch.height, exc)
            else:
                self._transitions = []
                self._transitions_since = None
                self.stats.transitions_written += batch.height
        while self._pending:
            table, rows = self._pending[0]
            try:
                self.store.write_rows(table, rows)
            except Exception as exc:  # any storage failure: keep the rows, retry at the next flush
                self.stats.write_failures += 1
                logger.warning("history: writing %s rows failed (%s); will retry", table.name, exc)
                break
            self._pending.popleft()
            self.stats.rows_written += rows.height
        self._bound_pending()

    def _bound_pending(self) -> None:
        starts = sorted({int(rows.get_column("ts_ms")[0]) for _, rows in self._pending})
        for oldest in starts[: max(0, len(starts) - self.max_pending_intervals)]:
            self._pending = deque((t, r) for t, r in self._pending if int(r.get_column("ts_ms")[0]) != oldest)
            self.stats.intervals_dropped += 1
            logger.error("history: dropped the interval starting at %d ms after repeated write failures", oldest)


class BackgroundWriter:
    """Runs a HistoryWriter on its own thread. `offer` (event loop) never blocks: the newest
    tick replaces one the thread has not taken yet; transitions queue without limit."""

    def __init__(self, writer: HistoryWriter, on_error: Callable[[Exception], None] | None = None) -> None:
        self.writer = writer
        self._cond = threading.Condition()
        self._latest: Views | None = None
        # Ticks whose transitions are still to be written: their labels and annotations are
        # rendered here, on the writer's thread (TickResult.transitions), not on the event loop.
        self._transitions: deque[TickResult] = deque()
        self._closing = False
        self._flush_requested = False
        self.dropped = 0
        self.offered = 0
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="rpowatch-history", daemon=True)
        self._thread.start()

    def offer(self, result: TickResult) -> None:
        with self._cond:
            if self._latest is not None:
                self.dropped += 1
            self._latest = result.views
            self.offered += 1
            if not result.changes.is_empty():
                self._transitions.append(result)
            self._cond.notify()

    def request_flush(self) -> None:
        """Write pending transitions and retries soon (not the unfinished interval)."""
        with self._cond:
            self._flush_requested = True
            self._cond.notify()

    def close(self, timeout: float | None = 60.0) -> None:
        """Absorb what was offered, write everything including the unfinished interval, stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> tuple[Views | None, list[TickResult], bool, bool]:
        with self._cond:
            while self._latest is None and not self._transitions and not self._closing and not self._flush_requested:
                self._cond.wait()
            views, self._latest = self._latest, None
            transitions = list(self._transitions)
            self._transitions.clear()
            flush, self._flush_requested = self._flush_requested, False
            return views, transitions, flush, self._closing

    def _run(self) -> None:
        while True:
            views, transitions, flush, closing = self._take()
            try:
                for result in transitions:
                    self.writer.add_transitions(result.transitions)
                if views is not None:
                    self.writer.absorb(views)
                if flush or closing:
                    self.writer.flush(partial=closing)
            except Exception as exc:  # a bug here must not kill the thread silently
                logger.exception("history writer failed")
                if self._on_error is not None:
                    self._on_error(exc)
            if closing:
                return
