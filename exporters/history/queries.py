"""The history queries behind `/api/v1/history/...` and `rpowatch history ...`.

Each takes a `HistoryStore`, a half-open window [start_ms, end_ms) and already-validated
arguments (see `params` for parsing what users type), and returns a polars DataFrame. Times are
epoch milliseconds (`ts_ms`, `at_ms`); `output.py` turns them into RFC 3339 for people.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl

from exporters.history import compliance as _compliance
from exporters.history.store import FileRef, HistoryStore, day_start_ms, with_retries
from exporters.history.tables import ALERTS, CLUSTER, DAY_MS, LINK, NODE, VM, VM_DAILY, Table

# Series a query may return, by the name used in URLs and on the command line.
SERIES_TABLES: dict[str, Table] = {"lag": VM, "link": LINK, "cluster": CLUSTER, "node": NODE}
# The label columns each series can be filtered on.
SERIES_FILTERS: dict[str, tuple[str, ...]] = {
    "lag": ("vm", "hci_cluster", "target", "service_group"),
    "link": ("hci_cluster", "target"),
    "cluster": ("hci_cluster",),
    "node": ("hci_cluster", "node"),
}
ALERT_FILTERS = ("alertname", "vm", "hci_cluster", "node", "severity", "transition")
COMPLIANCE_FILTERS = ("vm", "hci_cluster", "service_group")


@dataclass(frozen=True)
class Window:
    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.end_ms <= self.start_ms:
            raise ValueError("the window's end must be after its start")


Filters = Mapping[str, Sequence[str]]


def _filter(frame: pl.LazyFrame, filters: Filters) -> pl.LazyFrame:
    for column, values in filters.items():
        values = list(values)
        frame = frame.filter(pl.col(column) == values[0] if len(values) == 1 else pl.col(column).is_in(values))
    return frame


def downsample(table: Table, frame: pl.LazyFrame, step_ms: int) -> pl.LazyFrame:
    """Rows re-aggregated to `step_ms` buckets aligned to the epoch (per entity): max of the
    `*_max` columns, min of the `*_min`, the newest value of the rest."""
    entity = [c for c in table.key if c != table.time]
    skip = set(table.key) | set(table.max_cols) | set(table.min_cols) | {"interval_ms"}
    last = [c for c in table.schema.names() if c not in skip]
    return (
        frame.sort(*entity, table.time)
        .group_by_dynamic(table.time, every=f"{step_ms}i", group_by=entity, closed="left", label="left")
        .agg(
            *[pl.col(c).max() for c in table.max_cols if c != "samples"],
            *[pl.col(c).min() for c in table.min_cols],
            pl.col("samples").sum(),
            *[pl.col(c).last() for c in last if c != "samples"],
            # How much data the bucket holds: a 1 h bucket of 60 one-minute rows is all there.
            pl.col("interval_ms").sum().alias("observed_ms"),
            # A step finer than the stored resolution leaves rows as they are.
            pl.max_horizontal(pl.col("interval_ms").max(), pl.lit(step_ms, dtype=pl.Int64)).alias("interval_ms"),
        )
    )


def series(
    store: HistoryStore,
    name: str,
    window: Window,
    filters: Filters,
    step_ms: int | None = None,
) -> pl.DataFrame:
    """One entity kind's downsampled series (`lag`, `link`, `cluster`, `node`), filtered by
    label, at the stored resolution or re-aggregated to `step_ms`."""
    table = SERIES_TABLES[name]
    entity = [c for c in table.key if c != table.time]

    def read() -> pl.DataFrame:
        frame = _filter(store.scan(table, window.start_ms, window.end_ms), filters)
        if step_ms is not None:
            frame = downsample(table, frame, step_ms)
        else:
            frame = frame.with_columns(pl.col("interval_ms").alias("observed_ms"))
        frame = frame.select(*table.schema.names(), "observed_ms")
        if table is VM:
            frame = frame.with_columns(
                (pl.col("lag_max_seconds") <= pl.col("rpo_target_seconds")).alias("within_rpo")
            )
        return frame.sort(*entity, table.time).collect()

    return with_retries(read)


def lag(store: HistoryStore, vms: Sequence[str], window: Window, step_ms: int | None = None) -> pl.DataFrame:
    """The lag series of the given VMs."""
    return series(store, "lag", window, {"vm": vms}, step_ms)


def alerts(store: HistoryStore, window: Window, filters: Filters) -> pl.DataFrame:
    """Alert transitions (fired, resolved) in the window, oldest first."""

    def read() -> pl.DataFrame:
        frame = _filter(store.scan(ALERTS, window.start_ms, window.end_ms), filters)
        return frame.sort("at_ms", "alertname", "alert_key", "transition").collect()

    return with_retries(read)


@dataclass(frozen=True)
class CompliancePlan:
    """Which days a compliance query reads from rollups and which from raw rows."""

    rollup_days: list[str] = field(default_factory=list)
    raw_days: list[str] = field(default_factory=list)


def compliance_plan(
    store: HistoryStore, window: Window, use_rollups: bool = True
) -> tuple[CompliancePlan, list[FileRef]]:
    """Whole sealed days come from their rollups; the rest (edge days, today) from raw rows."""
    days = store.days_between(VM, window.start_ms, window.end_ms) if store.storage.can_list else []
    plan = CompliancePlan()
    refs: list[FileRef] = []
    for day in days:
        start = day_start_ms(day)
        whole = window.start_ms <= start and start + DAY_MS <= window.end_ms
        ref = store.sealed_rollup(day) if (whole and use_rollups and store.storage.can_list) else None
        if ref is not None:
            plan.rollup_days.append(day)
            refs.append(ref)
        else:
            plan.raw_days.append(day)
    return plan, refs


def _raw_runs(plan: CompliancePlan) -> list[list[str]]:
    """Raw days in runs not interrupted by a rollup day. A chunk must cover one stretch of
    time: inside it, a breach followed by no interval is a gap, not a recovery elsewhere."""
    rollups = set(plan.rollup_days)
    runs: list[list[str]] = []
    current: list[str] = []
    for day in sorted([*plan.raw_days, *plan.rollup_days]):
        if day in rollups:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(day)
    if current:
        runs.append(current)
    return runs


def compliance(
    store: HistoryStore,
    window: Window,
    group_by: str,
    filters: Filters | None = None,
    use_rollups: bool = True,
) -> pl.DataFrame:
    """Per group: VMs, observed and breached time, share within RPO, breaches, longest breach
    and mean time to recover (definitions in `compliance.py`)."""
    wanted = {k: list(v) for k, v in (filters or {}).items()}

    in_window = (pl.col("ts_ms") >= window.start_ms) & (pl.col("ts_ms") < window.end_ms)

    def read() -> pl.DataFrame:
        plan, refs = compliance_plan(store, window, use_rollups)
        chunks = [store.scan_rollups(refs)] if refs else []
        if not store.storage.can_list:
            chunks.append(_compliance.summarize(store.scan(VM, window.start_ms, window.end_ms)))
        for days in _raw_runs(plan):
            files = store.files_between(VM, window.start_ms, window.end_ms, days)
            chunks.append(_compliance.summarize(store.scan_files(VM, files).filter(in_window)))
        frame = pl.concat(chunks) if chunks else VM_DAILY.empty().lazy()
        return _compliance.combine(frame, group_by, wanted)

    return with_retries(read)
