"""What the engine keeps in shape between and over ticks: the sums prepared before a tick
needs them (Engine.prepare), and tables that do not grow chunks tick after tick."""

from __future__ import annotations

from typing import Any

import pytest
from polars.testing import assert_frame_equal

import rules.engine
from bench.tick import NOW0_MS, build_state, due_cycles, load_engine
from ingest.contracts import Stream
from rules.engine import Engine

REFRESH_MS = 10_000  # EngineSettings.aggregate_refresh_s
TICK_MS = 1_000


@pytest.fixture
def summaries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The instants the engine computed its sums at, in order."""
    calls: list[int] = []
    real = rules.engine.summarise

    def counted(state: Any, now_ms: int, previous: Any = None) -> Any:
        calls.append(now_ms)
        return real(state, now_ms, previous)

    monkeypatch.setattr(rules.engine, "summarise", counted)
    return calls


def engine_with_traffic() -> Engine:
    engine = load_engine()
    engine.fleet = build_state(1_000, 100)
    engine.tick(NOW0_MS)
    return engine


def advance(engine: Engine, now_ms: int) -> None:
    engine.apply(Stream.REPLICATION, due_cycles(engine.fleet, now_ms), now_ms)


def test_a_refresh_due_at_the_next_tick_is_done_before_it(summaries: list[int]) -> None:
    engine, reference = engine_with_traffic(), engine_with_traffic()
    summaries.clear()
    now = NOW0_MS + REFRESH_MS - 500  # the next tick, 1 s later, is past the refresh interval
    for e in (engine, reference):
        advance(e, now)
    assert engine.prepare(now, TICK_MS)
    assert summaries == [now]
    got = engine.tick(now + TICK_MS)
    assert summaries == [now], "the tick computed the sums again"
    want = reference.tick(now + TICK_MS)  # computes them itself, from the same state
    assert summaries == [now, now + TICK_MS]
    assert_frame_equal(got.alerts.sort("alert_id"), want.alerts.sort("alert_id"))
    assert_frame_equal(got.views.link, want.views.link)


def test_nothing_is_done_when_the_next_tick_would_not_refresh(summaries: list[int]) -> None:
    engine = engine_with_traffic()
    summaries.clear()
    advance(engine, NOW0_MS + 2_000)
    assert not engine.prepare(NOW0_MS + 2_000, TICK_MS)  # the sums are 3 s old at the next tick
    engine.tick(NOW0_MS + 3_000)
    assert summaries == []
    assert not engine.prepare(NOW0_MS + 3_000, TICK_MS)  # nothing changed since: nothing to do


def test_sums_of_a_state_that_lost_instances_meanwhile_are_not_kept(
    summaries: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kafka rebalance dropping instances while prepare computes: its sums index rows that
    are gone, so the next tick computes its own."""
    engine = engine_with_traffic()
    now = NOW0_MS + REFRESH_MS
    advance(engine, now)
    first, *dropped = engine.fleet.replication.get_column("cluster_id").unique().sort().head(3).to_list()
    engine.drop_clusters([first])  # no sums now: prepare computes them from scratch
    real = rules.engine.summarise

    def dropping_meanwhile(state: Any, now_ms: int, previous: Any = None) -> Any:
        result = real(state, now_ms, previous)
        engine.drop_clusters(dropped)  # as another thread would, between snapshot and install
        return result

    monkeypatch.setattr(rules.engine, "summarise", dropping_meanwhile)
    assert not engine.prepare(now, TICK_MS)
    monkeypatch.setattr(rules.engine, "summarise", real)
    result = engine.tick(now + TICK_MS)
    assert not result.views.link.get_column("hci_cluster").is_in([first, *dropped]).any()
    assert result.views.link.get_column("vms").sum() == engine.fleet.replication.height


def test_the_alert_table_and_label_store_stay_in_few_chunks_over_many_ticks() -> None:
    """Each tick appends its new alerts (a chunk per column); unbounded, at 100,000 VMs 500
    chunks after 15 minutes tripled the tick. Whatever the number of ticks, few remain."""
    from rules.lifecycle import MAX_CHUNKS

    engine = load_engine()
    engine.fleet = build_state(5_000, 100)  # and nothing reports: lags cross thresholds every second
    ticks_with_new_alerts = 0
    now = NOW0_MS
    for _ in range(5 * MAX_CHUNKS):
        now += TICK_MS
        known = set(engine.alerts.get_column("alert_id").to_list())
        engine.tick(now)
        ticks_with_new_alerts += not known.issuperset(engine.alerts.get_column("alert_id").to_list())
        assert max(engine.alerts.n_chunks("all")) <= MAX_CHUNKS
        assert max(engine._labels.n_chunks("all")) <= MAX_CHUNKS
    assert ticks_with_new_alerts > 2 * MAX_CHUNKS, "too few ticks appended alerts to test anything"


def test_both_polars_engines_find_the_same_alerts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small fleets evaluate on the in-memory engine, large ones on the streaming engine
    # (STREAMING_FROM_VMS): the same fleet must give the same alerts on either.
    streaming, in_memory = engine_with_traffic(), engine_with_traffic()
    engines = {"streaming": (streaming, 0), "in-memory": (in_memory, 10**9)}
    used: list[str] = []
    real = rules.engine.pl.collect_all

    def recorded(queries: Any, **kwargs: Any) -> Any:
        used.append(kwargs.get("engine", "auto"))
        return real(queries, **kwargs)

    monkeypatch.setattr(rules.engine.pl, "collect_all", recorded)
    for second in range(1, 4):
        now = NOW0_MS + second * TICK_MS
        results = {}
        for name, (engine, threshold) in engines.items():
            monkeypatch.setattr(rules.engine, "STREAMING_FROM_VMS", threshold)
            advance(engine, now)
            used.clear()
            results[name] = engine.tick(now)
            assert name in used, used
        got, want = results["streaming"], results["in-memory"]
        assert got.alerts.height > 100  # the fleet of bench.tick has standing alerts
        assert_frame_equal(got.alerts.sort("alert_id"), want.alerts.sort("alert_id"))
