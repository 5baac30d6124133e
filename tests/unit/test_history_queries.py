"""History queries against a brute-force computation in plain Python on generated data.

The generated store has everything that makes the real one hard: rows written twice (replays
and intervals split by a restart), several files per day, missing intervals, labels that change,
days sealed with rollups next to days still in small files, and windows that cut days.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporters.history import maintenance, queries
from exporters.history.queries import Window
from exporters.history.store import HistoryStore
from exporters.history.tables import ALERTS, DAY_MS, VM

T0 = 20_400 * DAY_MS  # 2025-11-08T00:00Z
HOUR = 3_600_000
DAYS = 3
SLOTS = DAYS * 24

Row = dict[str, Any]


# --- generated data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    lag: float
    group: str | None
    cluster: str
    rewrite: str  # "", "replay" (identical twice) or "split" (two partial writes)


cells = st.one_of(
    st.none(),
    st.builds(
        Cell,
        lag=st.sampled_from([10.0, 300.0, 599.0, 600.0, 601.0, 900.0, 5000.0]),
        group=st.sampled_from(["sg-a", "sg-b", None]),
        cluster=st.sampled_from(["c1", "c2"]),
        rewrite=st.sampled_from(["", "", "", "replay", "split"]),
    ),
)
vm_series = st.lists(cells, min_size=SLOTS, max_size=SLOTS)


def rows_of(series: list[list[Cell | None]], rpo: list[float | None]) -> list[Row]:
    """The rows the writer would have written, including duplicate writes."""
    out: list[Row] = []
    for v, slots in enumerate(series):
        for i, cell in enumerate(slots):
            if cell is None:
                continue
            ts = T0 + i * HOUR
            row: Row = {
                "ts_ms": ts, "interval_ms": HOUR, "vm": f"vm-{v}", "hci_cluster": cell.cluster,
                "target": "azure:westeurope", "technology": "asr", "service_group": cell.group,
                "lag_max_seconds": cell.lag, "lag_last_seconds": cell.lag / 2, "rpo_target_seconds": rpo[v],
                "pending_bytes": int(cell.lag) * 1000 + v, "samples": 60, "last_at_ms": ts + HOUR - 1000,
            }
            if cell.rewrite == "split":
                # Flushed at a shutdown mid-interval, then the rest after the restart.
                first = {**row, "lag_max_seconds": cell.lag / 3, "lag_last_seconds": 1.0,
                         "pending_bytes": 7, "samples": 20, "last_at_ms": ts + 1000, "service_group": "old"}
                out += [first, row]
            elif cell.rewrite == "replay":
                out += [row, dict(row)]
            else:
                out.append(row)
    return out


def write_store(root: str, rows: list[Row], files_per_day: int, seed: int) -> HistoryStore:
    """Rows spread over several files per day. A file never holds one key twice (the writer's
    invariant): a second write of a key goes to a later file, as it does in the service."""
    store = HistoryStore(root)
    by_file: dict[tuple[int, int, int], list[Row]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for n, row in enumerate(rows):
        key = (row["vm"], row["ts_ms"])
        copy = 1 if key in seen else 0
        seen.add(key)
        by_file[(row["ts_ms"] // DAY_MS, copy, (n * 7 + seed) % files_per_day)].append(row)
    for chunk in by_file.values():
        store.write_rows(VM, pl.DataFrame(chunk, schema=VM.schema))
    return store


# --- brute force ------------------------------------------------------------------------------


def merged(rows: list[Row]) -> dict[tuple[str, int], Row]:
    out: dict[tuple[str, int], Row] = {}
    for row in rows:
        key = (row["vm"], row["ts_ms"])
        if key not in out:
            out[key] = dict(row)
            continue
        old = out[key]
        newest = row if row["last_at_ms"] >= old["last_at_ms"] else old
        out[key] = {**newest, "lag_max_seconds": max(old["lag_max_seconds"], row["lag_max_seconds"]),
                    "samples": max(old["samples"], row["samples"])}
    return out


def breached(row: Row) -> bool:
    return row["rpo_target_seconds"] is not None and row["lag_max_seconds"] > row["rpo_target_seconds"]


def brute_compliance(rows: list[Row], start: int, end: int, group_by: str) -> dict[Any, dict[str, Any]]:
    per_vm: dict[str, list[Row]] = defaultdict(list)
    for (vm, ts), row in merged(rows).items():
        if start <= ts < end:
            per_vm[vm].append(row)
    groups: dict[Any, dict[str, Any]] = {}
    for vm, series in per_vm.items():
        series.sort(key=lambda r: r["ts_ms"])
        key = series[-1][group_by]
        g = groups.setdefault(key, {"vms": 0, "observed": 0, "breached": 0, "durations": [], "recovered": []})
        g["vms"] += 1
        i = 0
        while i < len(series):
            row = series[i]
            g["observed"] += row["interval_ms"]
            if not breached(row):
                i += 1
                continue
            run_start, j = row["ts_ms"], i
            g["breached"] += row["interval_ms"]
            while (j + 1 < len(series) and breached(series[j + 1])
                   and series[j + 1]["ts_ms"] == series[j]["ts_ms"] + series[j]["interval_ms"]):
                j += 1
                g["observed"] += series[j]["interval_ms"]
                g["breached"] += series[j]["interval_ms"]
            run_end = series[j]["ts_ms"] + series[j]["interval_ms"]
            g["durations"].append((run_end - run_start) / 1000)
            g["recovered"].append(j + 1 < len(series) and series[j + 1]["ts_ms"] == run_end)
            i = j + 1
    out = {}
    for key, g in groups.items():
        recovered = [d for d, r in zip(g["durations"], g["recovered"], strict=True) if r]
        out[key] = {
            "vms": g["vms"],
            "observed_seconds": g["observed"] / 1000,
            "breached_seconds": g["breached"] / 1000,
            "within_rpo_ratio": 1 - g["breached"] / g["observed"],
            "breaches": len(g["durations"]),
            "recovered_breaches": len(recovered),
            "longest_breach_seconds": max(g["durations"]) if g["durations"] else None,
            "mean_time_to_recover_seconds": sum(recovered) / len(recovered) if recovered else None,
        }
    return out


def brute_lag(rows: list[Row], vm: str, start: int, end: int, step: int | None) -> list[dict[str, Any]]:
    series = sorted(
        (r for (v, ts), r in merged(rows).items() if v == vm and start <= ts < end), key=lambda r: r["ts_ms"]
    )
    if step is None:
        return [{**r, "observed_ms": r["interval_ms"]} for r in series]
    buckets: dict[int, list[Row]] = defaultdict(list)
    for r in series:
        buckets[r["ts_ms"] // step * step].append(r)
    out = []
    for ts, rs in sorted(buckets.items()):
        out.append({**rs[-1], "ts_ms": ts, "interval_ms": step, "lag_max_seconds": max(r["lag_max_seconds"] for r in rs),
                    "samples": sum(r["samples"] for r in rs), "observed_ms": sum(r["interval_ms"] for r in rs)})
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def assert_compliance(got: pl.DataFrame, want: dict[Any, dict[str, Any]], group_by: str) -> None:
    rows = {r[group_by]: r for r in got.to_dicts()}
    assert set(rows) == set(want)
    for key, expected in want.items():
        for column, value in expected.items():
            assert same(rows[key][column], value), (key, column, rows[key][column], value)


# --- the properties ---------------------------------------------------------------------------

windows = st.tuples(st.integers(0, SLOTS + 2), st.integers(1, SLOTS + 4)).filter(lambda w: w[0] < w[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    series=st.lists(vm_series, min_size=1, max_size=4),
    rpo=st.lists(st.sampled_from([600.0, 600.0, None]), min_size=4, max_size=4),
    files_per_day=st.integers(1, 3),
    sealed_days=st.integers(0, DAYS),
    window=windows,
    aligned=st.booleans(),
)
def test_compliance_and_lag_match_brute_force(
    series: list[list[Cell | None]], rpo: list[float | None], files_per_day: int, sealed_days: int,
    window: tuple[int, int], aligned: bool,
) -> None:
    rows = rows_of(series, rpo)
    start_slot, end_slot = window
    if aligned:  # whole days, so sealed days are read from their rollups
        start_slot, end_slot = start_slot // 24 * 24, max(start_slot // 24 * 24 + 24, end_slot // 24 * 24)
    start, end = T0 + start_slot * HOUR, T0 + end_slot * HOUR
    with tempfile.TemporaryDirectory() as root:
        store = write_store(root, rows, files_per_day, seed=len(rows))
        if sealed_days:
            maintenance.run(store, T0 + sealed_days * DAY_MS, maintenance.Policy(seal_after_ms=0))
        plan, _ = queries.compliance_plan(store, Window(start, end))
        with_data = {r["ts_ms"] // DAY_MS - T0 // DAY_MS for r in rows}
        whole = [d for d in range(DAYS) if start <= T0 + d * DAY_MS and T0 + (d + 1) * DAY_MS <= end]
        assert len(plan.rollup_days) == len([d for d in whole if d < sealed_days and d in with_data])
        for group_by in ("vm", "hci_cluster", "service_group"):
            want = brute_compliance(rows, start, end, group_by)
            assert_compliance(queries.compliance(store, Window(start, end), group_by), want, group_by)
        assert_compliance(
            queries.compliance(store, Window(start, end), "vm", use_rollups=False), brute_compliance(rows, start, end, "vm"), "vm"
        )
        for step in (None, 2 * HOUR, 5 * HOUR):
            lagged = queries.lag(store, ["vm-0"], Window(start, end), step).to_dicts()
            expected = brute_lag(rows, "vm-0", start, end, step)
            assert [r["ts_ms"] for r in lagged] == [r["ts_ms"] for r in expected]
            for g, w in zip(lagged, expected, strict=True):
                for column in ("lag_max_seconds", "lag_last_seconds", "rpo_target_seconds", "pending_bytes",
                               "service_group", "hci_cluster", "interval_ms", "observed_ms", "samples"):
                    assert same(g[column], w[column]), (column, g, w)
                assert g["within_rpo"] == (None if w["rpo_target_seconds"] is None else w["lag_max_seconds"] <= w["rpo_target_seconds"])


def test_a_breach_across_midnight_is_one_breach_with_rollups_on_both_sides(tmp_path: Any) -> None:
    # vm-0 breaches from 22:00 on day 0 to 02:00 on day 1, then recovers.
    slots: list[Cell | None] = [Cell(10.0, "sg", "c1", "") for _ in range(SLOTS)]
    for i in range(22, 26):
        slots[i] = Cell(900.0, "sg", "c1", "")
    rows = rows_of([slots], [600.0])
    store = write_store(str(tmp_path), rows, 2, seed=0)
    maintenance.run(store, T0 + 3 * DAY_MS, maintenance.Policy(seal_after_ms=0))
    assert store.sealed_rollup("2025-11-08") is not None and store.sealed_rollup("2025-11-09") is not None
    got = queries.compliance(store, Window(T0, T0 + 2 * DAY_MS), "vm").to_dicts()[0]
    assert got["breaches"] == 1 and got["recovered_breaches"] == 1
    assert got["longest_breach_seconds"] == got["mean_time_to_recover_seconds"] == 4 * 3600
    assert got["within_rpo_ratio"] == pytest.approx(1 - 4 / 48)
    # A window ending inside the breach: it is open, so not in the mean time to recover.
    cut = queries.compliance(store, Window(T0, T0 + DAY_MS), "vm").to_dicts()[0]
    assert cut["breaches"] == 1 and cut["recovered_breaches"] == 0 and cut["mean_time_to_recover_seconds"] is None
    assert cut["longest_breach_seconds"] == 2 * 3600


def test_a_gap_ends_a_breach_and_is_not_a_recovery(tmp_path: Any) -> None:
    slots: list[Cell | None] = [Cell(10.0, "sg", "c1", "") for _ in range(24)] + [None] * (SLOTS - 24)
    slots[5], slots[6], slots[7] = Cell(900.0, "sg", "c1", ""), None, Cell(900.0, "sg", "c1", "")
    store = write_store(str(tmp_path), rows_of([slots], [600.0]), 1, seed=0)
    got = queries.compliance(store, Window(T0, T0 + DAY_MS), "vm").to_dicts()[0]
    assert (got["breaches"], got["recovered_breaches"], got["observed_seconds"]) == (2, 1, 23 * 3600)


def test_alert_log_filters_and_dedupes_replays(tmp_path: Any) -> None:
    store = HistoryStore(tmp_path)
    def transition(at: int, name: str, vm: str | None, node: str | None, what: str) -> Row:
        return {"at_ms": at, "alertname": name, "alert_key": vm or node, "transition": what, "severity": "critical",
                "hci_cluster": "c1", "vm": vm, "node": node, "labels": "{}", "annotations": '{"summary": "x"}'}
    log = [
        transition(T0 + 1000, "ReplicationRPOBreach", "vm-1", None, "fired"),
        transition(T0 + 9000, "ReplicationRPOBreach", "vm-1", None, "resolved"),
        transition(T0 + 5000, "NodeHeartbeatLost", None, "n1", "fired"),
        transition(T0 + DAY_MS + 5, "ReplicationRPOBreach", "vm-2", None, "fired"),
    ]
    store.write_rows(ALERTS, pl.DataFrame(log, schema=ALERTS.schema))
    store.write_rows(ALERTS, pl.DataFrame(log[:2], schema=ALERTS.schema))  # replayed after a crash
    everything = queries.alerts(store, Window(T0, T0 + 2 * DAY_MS), {})
    assert everything.get_column("at_ms").to_list() == [T0 + 1000, T0 + 5000, T0 + 9000, T0 + DAY_MS + 5]
    by_vm = queries.alerts(store, Window(T0, T0 + 2 * DAY_MS), {"vm": ["vm-1"], "transition": ["resolved"]})
    assert by_vm.get_column("at_ms").to_list() == [T0 + 9000]
    by_name = queries.alerts(store, Window(T0, T0 + DAY_MS), {"alertname": ["ReplicationRPOBreach", "NodeHeartbeatLost"]})
    assert by_name.height == 3
