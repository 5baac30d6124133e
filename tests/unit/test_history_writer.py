"""The history writer: ticks folded into intervals exactly as a brute-force fold says, replays
and restarts that do not duplicate, a background thread that never blocks and never drops an
alert transition, and writes retried after a failure."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from unittest import mock
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporters.history import queries
from exporters.history.queries import Window
from exporters.history.store import HistoryStore
from exporters.history.tables import ALERTS, DAY_MS, LINK, NODE, VM, Table
from exporters.history.writer import BackgroundWriter, HistoryWriter, _Accumulator
from rules import lifecycle
from rules.engine import TickResult
from rules.views import Views, empty_views

T0 = 20_400 * DAY_MS
BASE = empty_views()
INTERVAL = 10_000


def vm_frame(vms: list[str], lags: list[float], group: str = "sg") -> pl.DataFrame:
    n = len(vms)
    return pl.DataFrame(
        {
            "vm": vms, "hci_cluster": ["c1"] * n, "target": ["azure:we"] * n, "technology": ["asr"] * n,
            "service_group": [group] * n, "lag_seconds": lags, "rpo_target_seconds": [600.0] * n,
            "pending_bytes": [int(x) for x in lags],
        },
        schema={"vm": pl.String, "hci_cluster": pl.String, "target": pl.String, "technology": pl.String,
                "service_group": pl.String, "lag_seconds": pl.Float64, "rpo_target_seconds": pl.Float64,
                "pending_bytes": pl.Int64},
    )


def views_at(now_ms: int, vms: pl.DataFrame, links: pl.DataFrame | None = None, nodes: pl.DataFrame | None = None) -> Views:
    extra: dict[str, Any] = {}
    if links is not None:
        extra["link"] = links
    if nodes is not None:
        extra["node"] = nodes
    return BASE.replace(now_ms=now_ms, vm_replication=vms, **extra)


def transitions(at_ms: int, vm: str, what: str) -> pl.DataFrame:
    labels = json.dumps({"alertname": "ReplicationRPOBreach", "severity": "critical", "vm": vm, "hci_cluster": "c1"})
    return pl.DataFrame(
        [{"alertname": "ReplicationRPOBreach", "alert_key": vm, "hci_cluster": "c1", "severity": "critical",
          "labels": labels, "annotations": '{"summary": "s"}', "transition": what, "at_ms": at_ms}],
        schema={**lifecycle.TRANSITION_SCHEMA, "labels": pl.String(), "annotations": pl.String()},
    )


def read_all(store: HistoryStore, table: Table) -> pl.DataFrame:
    return store.scan(table, 0, 2**62).collect()


# --- folding ticks into intervals ------------------------------------------------------------

ticks = st.lists(
    st.tuples(
        st.integers(1, 4_000),  # ms since the previous tick
        st.lists(st.sampled_from(["vm-a", "vm-b", "vm-c", "vm-d"]), unique=True, max_size=4),
        st.lists(st.floats(0, 2000, allow_nan=False), min_size=4, max_size=4),
        st.booleans(),  # shuffle the row order (forces the join path)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ticks=ticks, collide=st.booleans())
def test_rows_are_the_brute_force_fold_of_the_ticks(
    tmp_path_factory: pytest.TempPathFactory, ticks: list[Any], collide: bool
) -> None:
    real = _Accumulator.__init__

    def colliding(acc: _Accumulator, *args: Any) -> None:
        real(acc, *args)
        acc.collided = collide  # as after two entities shared a hash: every tick joins on labels

    with mock.patch.object(_Accumulator, "__init__", colliding):
        fold_and_check(tmp_path_factory.mktemp("h"), ticks)


def fold_and_check(root: Path, ticks: list[Any]) -> None:
    store = HistoryStore(root)
    writer = HistoryWriter(store, interval_ms=INTERVAL)
    expected: dict[tuple[str, int], dict[str, Any]] = {}
    now = T0
    order = ["vm-a", "vm-b", "vm-c", "vm-d"]
    for gap, present, lags, shuffle in ticks:
        now += gap
        vms = [v for v in order if v in present]
        if shuffle:
            random.Random(now).shuffle(vms)
        values = [lags[order.index(v)] for v in vms]
        writer.absorb(views_at(now, vm_frame(vms, values)))
        start = now - now % INTERVAL
        for vm, lag in zip(vms, values, strict=True):
            row = expected.setdefault((vm, start), {"lag_max_seconds": lag, "samples": 0})
            row["lag_max_seconds"] = max(row["lag_max_seconds"], lag)
            row.update(lag_last_seconds=lag, pending_bytes=int(lag), last_at_ms=now)
            row["samples"] += 1
    writer.flush(partial=True)
    got = {(r["vm"], r["ts_ms"]): r for r in read_all(store, VM).to_dicts()}
    assert set(got) == set(expected)
    for key, want in expected.items():
        for column, value in want.items():
            assert got[key][column] == value, (key, column)
        assert got[key]["interval_ms"] == INTERVAL


def test_two_entities_on_one_hash_switch_the_table_to_joining_on_labels(tmp_path: Path) -> None:
    writer = HistoryWriter(HistoryStore(tmp_path), interval_ms=INTERVAL)
    with mock.patch.object(_Accumulator, "_hash", lambda acc, sample: pl.Series("__hash", [7] * sample.height, pl.UInt64)):
        writer.absorb(views_at(T0, vm_frame(["vm-a", "vm-b"], [1.0, 5.0])))
        writer.absorb(views_at(T0 + 1000, vm_frame(["vm-b", "vm-a"], [2.0, 3.0])))
    assert writer._acc[0].collided
    writer.flush(partial=True)
    rows = {r["vm"]: r for r in read_all(writer.store, VM).to_dicts()}
    assert (rows["vm-a"]["lag_max_seconds"], rows["vm-a"]["lag_last_seconds"]) == (3.0, 3.0)
    assert (rows["vm-b"]["lag_max_seconds"], rows["vm-b"]["lag_last_seconds"]) == (5.0, 2.0)


def test_links_and_nodes_are_written_with_their_own_aggregates(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    writer = HistoryWriter(store, interval_ms=INTERVAL)
    link_schema = {"hci_cluster": pl.String, "target": pl.String, "saturation_ratio": pl.Float64}
    node_schema = {"hci_cluster": pl.String, "node": pl.String, "up": pl.Int8}
    for i, (sat, up) in enumerate([(0.5, 1), (1.4, 0), (0.7, 1)]):
        links = pl.DataFrame({"hci_cluster": ["c1"], "target": ["t"], "saturation_ratio": [sat]}, schema=link_schema)
        nodes = pl.DataFrame({"hci_cluster": ["c1"], "node": ["n1"], "up": [up]}, schema=node_schema)
        writer.absorb(views_at(T0 + i * 1000, vm_frame([], []), links=links, nodes=nodes))
    writer.flush(partial=True)
    link = read_all(store, LINK).to_dicts()[0]
    assert (link["saturation_max_ratio"], link["saturation_last_ratio"]) == (1.4, 0.7)
    node = read_all(store, NODE).to_dicts()[0]
    assert (node["up_min"], node["up_last"], node["samples"]) == (0, 1, 3)


def test_a_restart_mid_interval_and_a_replay_do_not_duplicate(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    feed = [(T0 + s * 1000, [float(s * 10), float(100 - s)]) for s in range(0, 35)]

    def run(part: list[tuple[int, list[float]]]) -> None:
        writer = HistoryWriter(store, interval_ms=INTERVAL)
        for now, lags in part:
            writer.absorb(views_at(now, vm_frame(["vm-a", "vm-b"], lags)))
        writer.flush(partial=True)  # a clean shutdown writes the unfinished interval

    run(feed[:17])  # stops 7 s into the second interval
    run(feed[17:])  # the restart continues that interval
    run(feed)  # and an at-least-once replay writes everything again
    rows = queries.lag(store, ["vm-a"], Window(T0, T0 + 60_000))
    assert rows.get_column("ts_ms").to_list() == [T0, T0 + 10_000, T0 + 20_000, T0 + 30_000]
    assert rows.get_column("lag_max_seconds").to_list() == [90.0, 190.0, 290.0, 340.0]
    assert rows.get_column("lag_last_seconds").to_list() == [90.0, 190.0, 290.0, 340.0]
    assert rows.get_column("samples").to_list() == [10, 10, 10, 5]


# --- the background thread --------------------------------------------------------------------


class SlowStore(HistoryStore):
    """Blocks every write until released; fails the first `failures` writes."""

    def __init__(self, root: Path, failures: int = 0) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.failures = failures
        self.calls = 0

    def write_rows(self, table: Table, frame: pl.DataFrame, kind: str = "part") -> Any:
        self.release.wait(10)
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("disk full")
        return super().write_rows(table, frame, kind)


def test_offer_never_blocks_drops_samples_not_transitions(tmp_path: Path) -> None:
    store = SlowStore(tmp_path)
    background = BackgroundWriter(HistoryWriter(store, interval_ms=1000, transitions_delay_ms=0))
    n = 300
    started = time.perf_counter()
    for i in range(n):
        views = views_at(T0 + i * 1000, vm_frame(["vm-a"], [float(i)]))
        background.offer(TickResult(views, lifecycle.empty_alerts(), transitions(T0 + i * 1000, "vm-a", "fired")))
    offered_in = time.perf_counter() - started
    assert offered_in < 1.0, "offer must not wait for the writer"
    store.release.set()
    background.close()
    assert background.dropped > 0  # the writer was blocked: ticks were skipped ...
    log = read_all(store, ALERTS)
    assert log.height == n  # ... but every transition is in the log
    assert sorted(log.get_column("at_ms").to_list()) == [T0 + i * 1000 for i in range(n)]
    assert log.get_column("vm").unique().to_list() == ["vm-a"]


def test_failed_writes_are_retried(tmp_path: Path) -> None:
    store = SlowStore(tmp_path, failures=2)
    store.release.set()
    writer = HistoryWriter(store, interval_ms=1000)
    writer.add_transitions(transitions(T0, "vm-a", "fired"))
    for i in range(5):
        writer.absorb(views_at(T0 + i * 1000, vm_frame(["vm-a"], [float(i)])))
    writer.flush(partial=True)
    assert writer.stats.write_failures == 2
    assert read_all(store, VM).height == 5
    assert read_all(store, ALERTS).height == 1


def test_pending_intervals_are_bounded_while_writes_fail(tmp_path: Path) -> None:
    class Broken(HistoryStore):
        def write_rows(self, table: Table, frame: pl.DataFrame, kind: str = "part") -> Any:
            raise OSError("store unreachable")

    writer = HistoryWriter(Broken(tmp_path), interval_ms=1000, max_pending_intervals=3)
    for i in range(10):
        writer.absorb(views_at(T0 + i * 1000, vm_frame(["vm-a"], [1.0])))
    assert writer.stats.intervals_dropped == 9 - 3
    per_interval: dict[int, int] = defaultdict(int)
    for _, rows in writer._pending:
        per_interval[int(rows.get_column("ts_ms")[0])] += 1
    assert sorted(per_interval) == [T0 + 6000, T0 + 7000, T0 + 8000]
