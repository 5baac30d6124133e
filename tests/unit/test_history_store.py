"""The store's files: atomic writes, compaction and sealing that change no answer, crashes
between a compaction's rename and its deletes, retention, and object-store URLs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import polars as pl
import pytest

from exporters.history import maintenance, queries
from exporters.history.queries import Window
from exporters.history.store import FileRef, HistoryStore, overlap_groups, with_retries
from exporters.history.tables import ALERTS, DAY_MS, VM, VM_DAILY

T0 = 20_400 * DAY_MS  # 2025-11-08
MIN = 60_000


def vm_rows(start_ms: int, minutes: int, vms: int = 3, lag: float = 100.0) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "ts_ms": start_ms + m * MIN, "interval_ms": MIN, "vm": f"vm-{v}", "hci_cluster": "c1",
                "target": "t", "technology": "asr", "service_group": "sg",
                "lag_max_seconds": lag + (700.0 if (m + v) % 7 == 0 else 0.0), "lag_last_seconds": lag,
                "rpo_target_seconds": 600.0, "pending_bytes": m, "samples": 60,
                "last_at_ms": start_ms + m * MIN + 59_000,
            }
            for m in range(minutes)
            for v in range(vms)
        ],
        schema=VM.schema,
    )


def write_minutes(store: HistoryStore, start_ms: int, minutes: int) -> None:
    """One file per minute, as the writer does."""
    for m in range(minutes):
        store.write_rows(VM, vm_rows(start_ms + m * MIN, 1))


def answers(store: HistoryStore, start: int, end: int) -> tuple[list[dict[str, object]], ...]:
    w = Window(start, end)
    return (
        queries.lag(store, ["vm-1"], w).drop("samples").to_dicts(),
        queries.compliance(store, w, "vm").to_dicts(),
        queries.compliance(store, w, "service_group").to_dicts(),
    )


def table_files(root: Path, table: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / table).rglob("*.parquet"))


def test_overlap_groups() -> None:
    def ref(lo: int, hi: int) -> FileRef:
        return FileRef("vm", "d", "part", lo, hi, f"u{lo}{hi}")

    groups = overlap_groups([ref(0, 10), ref(20, 30), ref(5, 12), ref(12, 15), ref(31, 40)])
    assert [[(f.min_ms, f.max_ms) for f in g] for g in groups] == [[(0, 10), (5, 12), (12, 15)], [(20, 30)], [(31, 40)]]


def test_writes_are_atomic_and_named_by_time_range(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    (ref,) = store.write_rows(VM, vm_rows(T0 + 5 * MIN, 3))
    assert ref.name.startswith(f"part-{T0 + 5 * MIN}-{T0 + 7 * MIN}-")
    assert table_files(tmp_path, "vm") == [f"vm/date=2025-11-08/{ref.name}"]
    assert os.listdir(tmp_path / ".staging") == []
    # Something a killed writer left half-written in staging is never read, and cleaned later.
    (tmp_path / ".staging" / "dead.part-1-2-x.parquet").write_bytes(b"PAR1 half a file")
    assert queries.lag(store, ["vm-1"], Window(T0, T0 + DAY_MS)).height == 3
    assert store.storage.clean_staging(older_than_s=0) == 1  # type: ignore[union-attr]


def test_rows_spanning_midnight_go_to_two_days(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    refs = store.write_rows(VM, vm_rows(T0 + DAY_MS - 2 * MIN, 4))
    assert [r.day for r in refs] == ["2025-11-08", "2025-11-09"]


def test_merging_and_sealing_change_no_answer(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    write_minutes(store, T0 + DAY_MS - 90 * MIN, 120)  # 90 minutes of day 1, 30 of day 2
    before = answers(store, T0, T0 + 2 * DAY_MS)
    policy = maintenance.Policy(min_files=50, seal_after_ms=10 * MIN)
    # Day 2 is still "today": its 30 small files stay; day 1 is not over + 10 min yet: merged.
    report = maintenance.run(store, T0 + DAY_MS + 5 * MIN, policy)
    assert report.merged == ["vm/2025-11-08"] and report.sealed == []
    assert [f.kind for f in store.files(VM, "2025-11-08")] == ["merged"]
    assert len(store.files(VM, "2025-11-09")) == 30
    assert answers(store, T0, T0 + 2 * DAY_MS) == before
    # Later, day 1 is sealed into one file with a rollup.
    report = maintenance.run(store, T0 + DAY_MS + 10 * MIN, policy)
    assert report.sealed == ["vm/2025-11-08"] and report.rollups == ["2025-11-08"]
    (day,) = store.files(VM, "2025-11-08")
    assert day.kind == "day" and store.sealed_rollup("2025-11-08") == day
    assert answers(store, T0, T0 + 2 * DAY_MS) == before
    plan, _ = queries.compliance_plan(store, Window(T0, T0 + 2 * DAY_MS))
    assert plan.rollup_days == ["2025-11-08"] and plan.raw_days == ["2025-11-09"]
    # A late write to a sealed day: the rollup no longer describes it, so raw rows are read.
    store.write_rows(VM, vm_rows(T0 + 10 * MIN, 1, lag=5000.0))
    assert store.sealed_rollup("2025-11-08") is None
    late = answers(store, T0, T0 + 2 * DAY_MS)
    assert late != before
    report = maintenance.run(store, T0 + DAY_MS + 20 * MIN, policy)
    assert report.sealed == ["vm/2025-11-08"]
    assert answers(store, T0, T0 + 2 * DAY_MS) == late
    assert len(os.listdir(tmp_path / "vm_daily" / "date=2025-11-08")) == 1


def test_a_crash_between_rename_and_deletes_double_counts_nothing(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    write_minutes(store, T0, 30)
    before = answers(store, T0, T0 + DAY_MS)
    saved = tmp_path.parent / "saved"
    shutil.copytree(tmp_path / "vm", saved)
    maintenance.run(store, T0 + 2 * DAY_MS, maintenance.Policy(seal_after_ms=0))
    # Put the inputs back: the state a kill -9 after the rename and before the deletes leaves.
    shutil.copytree(saved, tmp_path / "vm", dirs_exist_ok=True)
    assert len(store.files(VM, "2025-11-08")) == 31
    assert store.sealed_rollup("2025-11-08") is None
    assert answers(store, T0, T0 + DAY_MS) == before
    maintenance.run(store, T0 + 2 * DAY_MS, maintenance.Policy(seal_after_ms=0))
    assert len(store.files(VM, "2025-11-08")) == 1
    assert answers(store, T0, T0 + DAY_MS) == before


def test_a_missing_rollup_is_rebuilt(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    write_minutes(store, T0, 10)
    maintenance.run(store, T0 + 2 * DAY_MS, maintenance.Policy(seal_after_ms=0))
    shutil.rmtree(tmp_path / "vm_daily")
    report = maintenance.run(store, T0 + 2 * DAY_MS, maintenance.Policy(seal_after_ms=0))
    assert report.sealed == [] and report.rollups == ["2025-11-08"]


def test_retention_removes_old_days_from_every_table(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    for day in range(5):
        store.write_rows(VM, vm_rows(T0 + day * DAY_MS, 2))
        store.write_rows(ALERTS, pl.DataFrame(
            [{"at_ms": T0 + day * DAY_MS, "alertname": "A", "alert_key": "k", "transition": "fired"}]
        ).with_columns(*[pl.lit(None, dtype=pl.String).alias(c) for c in ALERTS.schema.names()[4:]]))
    maintenance.run(store, T0 + 5 * DAY_MS, maintenance.Policy(seal_after_ms=0, retention_ms=2 * DAY_MS))
    for table in ("vm", "alerts"):
        assert store.storage.days(table) == ["2025-11-11", "2025-11-12"]
    assert store.storage.days(VM_DAILY.name) == ["2025-11-11", "2025-11-12"]


def test_a_file_vanishing_during_a_read_is_retried() -> None:
    calls = []

    def read() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("No such file or directory (os error 2): part-1-2-x.parquet")
        return 42

    assert with_retries(read) == 42 and len(calls) == 2
    with pytest.raises(ValueError):
        with_retries(lambda: (_ for _ in ()).throw(ValueError("a bug, not a race")))


def test_an_object_store_url_is_written_and_read_by_polars(tmp_path: Path) -> None:
    store = HistoryStore(f"file://{tmp_path}")
    assert not store.storage.can_list
    write_minutes(store, T0, 20)
    write_minutes(store, T0 + 3 * MIN, 2)  # a replayed write: merged by key on read
    local = HistoryStore(tmp_path)
    assert answers(store, T0, T0 + DAY_MS) == answers(local, T0, T0 + DAY_MS)
    assert queries.lag(store, ["vm-0"], Window(T0, T0 + DAY_MS)).height == 20
    assert maintenance.run(store, T0 + 2 * DAY_MS).skipped


def test_time_ranges_far_from_the_data_are_cheap(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    write_minutes(store, T0, 2)
    started = time.perf_counter()
    assert queries.lag(store, ["vm-0"], Window(0, 253_402_300_799_999)).height == 2
    assert queries.compliance(store, Window(0, 253_402_300_799_999), "vm").height == 3
    assert time.perf_counter() - started < 5


def test_a_day_too_big_to_sort_is_streamed_unsorted_with_the_same_answers(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    write_minutes(store, T0, 30)
    before = answers(store, T0, T0 + DAY_MS)
    maintenance.run(store, T0 + 2 * DAY_MS, maintenance.Policy(seal_after_ms=0, max_sort_rows=10))
    assert len(store.files(VM, "2025-11-08")) == 1 and store.sealed_rollup("2025-11-08") is not None
    assert answers(store, T0, T0 + DAY_MS) == before
