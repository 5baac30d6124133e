"""Keeping the store small and fast: compaction, sealing with rollups, retention.

- *Merge*: once a day has `min_files` small `part` files (the writer adds one per interval and
  table), they are rewritten as one `merged` file sorted by key.
- *Seal*: `seal_after` past the end of a day, all its files are rewritten as one `day` file
  sorted by key, merged by key (duplicates from replays disappear here), with row groups small
  enough that one VM's rows are found from the footer statistics; for the VM table a rollup
  (compliance.summarize of the day) is written with the same uid.
- *Retention*: days older than `retention` are removed from every table.

Every step writes its output atomically before it deletes its inputs, so a crash at any point
leaves a store that reads correctly: between the rename and the deletes a key may be in two
files, and readers merge overlapping files by key. The next run finishes the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from exporters.history.compliance import summarize
from exporters.history.store import FileRef, HistoryStore, LocalStorage, day_of, day_start_ms, new_uid
from exporters.history.tables import ALL, DAY_MS, VM, VM_DAILY, Table

logger = logging.getLogger(__name__)

FIRST_PASS_S = 60.0


@dataclass(frozen=True)
class Policy:
    min_files: int = 60
    seal_after_ms: int = 10 * 60_000
    retention_ms: int = 400 * DAY_MS
    # Above this many rows a rewrite streams instead of sorting (bounded memory at fleet scale).
    max_sort_rows: int = 50_000_000


@dataclass
class Report:
    merged: list[str] = field(default_factory=list)  # "table/day"
    sealed: list[str] = field(default_factory=list)
    rollups: list[str] = field(default_factory=list)
    removed_days: list[str] = field(default_factory=list)
    skipped: str | None = None

    def __str__(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        return (
            f"merged {len(self.merged)}, sealed {len(self.sealed)}, rollups {len(self.rollups)}, "
            f"removed {len(self.removed_days)} day partition(s)"
        )


def _bounds(files: list[FileRef]) -> tuple[int, int]:
    return min(f.min_ms for f in files), max(f.max_ms for f in files)


def _rewrite(store: HistoryStore, table: Table, day: str, files: list[FileRef], kind: str, max_sort_rows: int) -> FileRef:
    """Write `files` as one file of `kind`, sorted by key unless that would hold more than
    `max_sort_rows` rows in memory (then streamed as they are: sorting only speeds up reads),
    then delete them."""
    low, high = _bounds(files)
    ref = FileRef(table.name, day, kind, low, high, new_uid())
    rows = store.scan_files(table, files)
    total = pl.scan_parquet([store.storage.path(f.table, f.day, f.name) for f in files]).select(pl.len()).collect().item()
    if total <= max_sort_rows:
        rows = rows.sort(*table.key)
    else:
        logger.info("history: %s/%s has %d rows; rewriting without sorting", table.name, day, total)
    store.storage.write(table.name, day, ref.name, rows)
    for f in files:
        store.storage.delete(table.name, day, f.name)
    return ref


def write_rollup(store: HistoryStore, day_file: FileRef, rows: pl.DataFrame | None = None) -> None:
    """The rollup of a sealed `day` file (read back, or `rows` when the caller has them)."""
    source = rows.lazy() if rows is not None else store.scan_files(VM, [day_file])
    rollup = summarize(source).collect(engine="streaming")
    store.storage.write(VM_DAILY.name, day_file.day, f"rollup-{day_file.uid}.parquet", rollup)
    for name in store.storage.names(VM_DAILY.name, day_file.day):
        if name != f"rollup-{day_file.uid}.parquet":
            store.storage.delete(VM_DAILY.name, day_file.day, name)


def run(store: HistoryStore, now_ms: int, policy: Policy = Policy()) -> Report:
    """One maintenance pass over every table and day."""
    report = Report()
    if not store.storage.can_list:
        report.skipped = "an object store cannot be compacted by rpowatch (use lifecycle rules for retention)"
        return report
    if isinstance(store.storage, LocalStorage):
        store.storage.clean_staging()
    oldest_kept = day_of(now_ms - policy.retention_ms)
    for table in (*ALL, VM_DAILY):
        for day in store.storage.days(table.name):
            if day < oldest_kept:
                store.storage.remove_day(table.name, day)
                report.removed_days.append(f"{table.name}/{day}")
                continue
            if table is VM_DAILY:
                continue
            files = store.files(table, day)
            if not files:
                continue
            if now_ms >= day_start_ms(day) + DAY_MS + policy.seal_after_ms:
                if len(files) > 1 or files[0].kind != "day":
                    files = [_rewrite(store, table, day, files, "day", policy.max_sort_rows)]
                    report.sealed.append(f"{table.name}/{day}")
                if table is VM and store.sealed_rollup(day) is None:
                    write_rollup(store, files[0])
                    report.rollups.append(day)
            else:
                parts = [f for f in files if f.kind == "part"]
                if len(parts) >= policy.min_files:
                    _rewrite(store, table, day, parts, "merged", policy.max_sort_rows)
                    report.merged.append(f"{table.name}/{day}")
    return report


class BackgroundMaintenance:
    """Runs `run` every `every_s` seconds on its own thread (never on the writer's)."""

    def __init__(
        self,
        store: HistoryStore,
        policy: Policy,
        every_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy
        self.every_s = every_s
        self.clock = clock
        self.last: Report | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpowatch-history-maintenance", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The first pass comes soon after a start, so a service restarted often still compacts.
        delay = min(self.every_s, FIRST_PASS_S)
        while not self._stop.wait(delay):
            delay = self.every_s
            try:
                started = time.perf_counter()
                self.last = run(self.store, int(self.clock() * 1000), self.policy)
                logger.info("history maintenance: %s in %.1f s", self.last, time.perf_counter() - started)
            except Exception:  # keep the thread alive; the next pass retries
                logger.exception("history maintenance failed")

    def close(self, timeout: float | None = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def seal_frame(store: HistoryStore, day: str, rows: pl.DataFrame, presorted: bool = False) -> FileRef:
    """Write one whole day of VM rows (one per key) as a sealed `day` file plus its rollup, as
    sealing would; for tools and benchmarks that generate history directly. `presorted`: the
    rows are sorted by (vm, ts_ms) already."""
    rows = rows.select(VM.schema.names())
    if not presorted:
        rows = rows.sort(*VM.key)
    times = rows.get_column("ts_ms")
    ref = FileRef(VM.name, day, "day", int(times.min()), int(times.max()), new_uid())  # type: ignore[arg-type]
    store.storage.write(VM.name, day, ref.name, rows)
    write_rollup(store, ref, rows)
    return ref
