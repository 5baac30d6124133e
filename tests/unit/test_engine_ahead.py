"""Per-VM conditions evaluated ahead of a tick (Engine.prepare): the tick then evaluates only
the rows written since. Whatever happens in between, a tick must find exactly the alerts a
full evaluation finds; these tests run two engines side by side on the same inputs, one
preparing each tick, one never, and compare every tick."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import rules.engine
from bench.tick import NOW0_MS, build_state, load_engine, replication_batch
from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules.ahead import Matched, found_ahead
from rules.engine import Engine, TickResult

TICK_MS = 1_000
VMS = 2_000


@pytest.fixture(autouse=True)
def ahead_on_small_fleets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules.engine, "AHEAD_FROM_VMS", 0)


@pytest.fixture
def restricted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """The queries restricted to the rows written since prepare, tick by tick: their entity,
    how many rules they evaluated and on how many rows."""
    sizes: list[tuple[str, int, int]] = []
    real = Engine._query

    def spied(self: Engine, query: Any, views: Any, held: list[str], rows: pl.Series | None = None) -> pl.LazyFrame:
        if rows is not None:
            sizes.append((query.entity, len(query.rules), rows.len()))
        return real(self, query, views, held, rows)

    monkeypatch.setattr(Engine, "_query", spied)
    return sizes


def pair() -> tuple[Engine, Engine]:
    """An engine that prepares its ticks and one that does not, on the same fleet."""
    engines = []
    for _ in range(2):
        engine = load_engine()
        engine.fleet = build_state(VMS, 100)
        engine.tick(NOW0_MS)
        engines.append(engine)
    return engines[0], engines[1]


def backup_batch(engine: Engine, now_ms: int, second: int) -> pl.DataFrame:
    """Backup jobs for a few VMs of the fleet: successes (a VM whose backups were late is
    protected again) and failures."""
    vms = engine.fleet.backup.select("vm_id", "cluster_id").gather_every(97, offset=second % 97).rows()
    payloads = []
    for k, (vm, cluster) in enumerate(vms):
        ok = (k + second) % 3 != 0
        record: dict[str, Any] = {
            "event_id": f"bk-{second}-{vm}", "ts": now_ms - 500, "vm_id": vm, "cluster_id": cluster,
            "job_id": f"j-{second}-{vm}", "product": "mabs", "level": "host",
            "kind": "succeeded" if ok else "failed",
        }
        if ok:
            record["recovery_point_ts"] = now_ms - 600
        payloads.append(json.dumps(record).encode())
    decoded = decode_batch(Stream.BACKUP, payloads, now_ms)
    assert decoded.rejects.is_empty(), decoded.rejects.to_dicts()
    return decoded.valid


def traffic(engine: Engine, now_ms: int, second: int) -> None:
    """A second's ingest: replication events of every kind for random VMs (completed cycles
    clear breaches, failures and misses raise others) and backup jobs."""
    engine.apply(Stream.REPLICATION, replication_batch(engine.fleet, 150, now_ms, seed=second), now_ms)
    engine.apply(Stream.BACKUP, backup_batch(engine, now_ms, second), now_ms)


def assert_same(got: TickResult, want: TickResult) -> None:
    assert_frame_equal(got.alerts.sort("alert_id"), want.alerts.sort("alert_id"))
    assert_frame_equal(got.changes.sort("alert_id"), want.changes.sort("alert_id"))
    # The VMs out of policy, found from those prepare found: the same view, row for row.
    assert_frame_equal(got.views.vm, want.views.vm)


Between = Callable[[Engine, int], None]


def run(between: Between | None = None, seconds: int = 6, at: Callable[[int], int] = lambda now: now) -> list[TickResult]:
    """Tick both engines `seconds` times a second apart, with traffic before each tick; the
    first prepares each tick (for the instant a second later) and then `between` happens to
    both. `at` gives the instant each tick actually evaluates. Returns the preparing
    engine's results, each checked against the other's."""
    ahead, full = pair()
    results = []
    now = NOW0_MS
    for second in range(1, seconds + 1):
        ahead.prepare(now, TICK_MS)
        now += TICK_MS
        for engine in (ahead, full):
            traffic(engine, now, second)
            if between is not None:
                between(engine, second)
        got, want = ahead.tick(at(now)), full.tick(at(now))
        assert_same(got, want)
        results.append(got)
    return results


def test_only_the_rows_written_since_are_evaluated_and_the_alerts_are_those_of_a_full_evaluation(
    restricted: list[tuple[str, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    matched: list[int] = []
    real = Matched.resolve

    def counted(self: Matched) -> tuple[pl.Series, pl.DataFrame]:
        matched.append(self.fresh.height)
        return real(self)

    monkeypatch.setattr(Matched, "resolve", counted)
    since: list[int] = []
    real_since = rules.engine.late_rows_since

    def counted_since(*args: Any) -> Any:
        since.append(1)
        return real_since(*args)

    monkeypatch.setattr(rules.engine, "late_rows_since", counted_since)
    results = run()
    # Each tick matched its true rows with its alerts, and found the VMs out of policy, from
    # what prepare found.
    assert len(matched) == len(since) == len(results)
    assert min(r.views.vm.height for r in results) > 20
    # Each tick evaluated the rows its second's traffic wrote, per per-VM table (all of its
    # rules in one query): a few hundred of 2,000 rows each.
    assert [entity for entity, _, _ in restricted] == ["vm_replication", "vm_backup"] * len(results)
    assert 0 < max(rows for _, _, rows in restricted) < VMS / 4
    changed = sum(r.changes.height for r in results)
    assert changed > 10, "the traffic fired or resolved too few alerts to test anything"
    assert min(r.alerts.height for r in results) > 100


def test_a_tick_at_another_instant_evaluates_everything(restricted: list[tuple[str, int, int]]) -> None:
    run(at=lambda now: now + 250)
    assert restricted == []


def test_instances_held_after_prepare(restricted: list[tuple[str, int, int]]) -> None:
    def hold(engine: Engine, second: int) -> None:
        clusters = engine.fleet.replication.get_column("cluster_id").unique().sort().to_list()
        if second % 2:
            engine.hold(clusters[second : second + 3])
        else:
            engine.release(clusters)

    run(hold)
    assert restricted == []  # the held instances changed at every tick


def test_instances_dropped_after_prepare(restricted: list[tuple[str, int, int]]) -> None:
    def drop(engine: Engine, second: int) -> None:
        if second in (2, 4):
            engine.drop_clusters([engine.fleet.replication.get_column("cluster_id").sort()[0]])

    run(drop)
    assert len(restricted) == 2 * 4  # all but the two ticks after a drop


def test_a_state_replaced_outside_apply_is_evaluated_whole(restricted: list[tuple[str, int, int]]) -> None:
    def rewrite(engine: Engine, second: int) -> None:
        if second == 3:
            replication = engine.fleet.replication.with_columns(pl.col("status").fill_null("normal"))
            engine.fleet = replace(engine.fleet, replication=replication.with_columns(
                pl.when(pl.int_range(pl.len()) % 5 == 0).then(pl.lit("paused")).otherwise(pl.col("status")).alias("status"),
                pl.lit(NOW0_MS - 3_600_000).alias("status_since_ms"),
            ))

    results = run(rewrite)
    assert len(restricted) == 2 * 6 - 1  # the replication queries of that tick ran whole
    assert results[2].changes.height > 0


def test_new_vms_appended_after_prepare_are_evaluated() -> None:
    def new_vms(engine: Engine, second: int) -> None:
        payloads = [
            json.dumps({"event_id": f"new-{second}-{k}", "ts": NOW0_MS, "vm_id": f"vm-new-{second}-{k}",
                        "cluster_id": "hci-new", "target_id": "hci-dr", "technology": "hyperv_replica",
                        "kind": "resync_required", "frequency_s": 30}).encode()
            for k in range(5)
        ]
        now = NOW0_MS + second * TICK_MS
        decoded = decode_batch(Stream.REPLICATION, payloads, now)
        engine.apply(Stream.REPLICATION, decoded.valid, now)

    results = run(new_vms)
    new = results[-1].alerts.filter(pl.col("alert_key").str.contains("vm-new-"))
    assert new.get_column("alertname").unique().to_list() == ["ReplicationResyncRequired"]
    assert new.height == 5 * 6


def test_link_figures_that_changed_after_prepare_reevaluate_the_linked_rules(
    restricted: list[tuple[str, int, int]],
) -> None:
    """The at-risk prediction reads each VM's link: when a heartbeat changes a link's capacity
    between prepare and the tick, every VM on it may change."""

    def squeeze(engine: Engine, second: int) -> None:
        if second == 3:
            nodes = engine.fleet.nodes.with_columns(pl.col("net_capacity_bytes_per_s") / 50)
            engine.fleet = replace(engine.fleet, nodes=nodes)

    results = run(squeeze)
    rules = [n for entity, n, _ in restricted if entity == "vm_replication"]
    # That tick's linked rule (at-risk) ran on every row, the others on the rows written.
    assert len(rules) == 6 and rules[2] == rules[0] - 1 and len(set(rules)) == 2, rules
    at_risk = [r.alerts.filter(pl.col("alertname") == "ReplicationRPOAtRisk").height for r in results]
    assert at_risk[2] > at_risk[1], "a squeezed link should put more VMs at risk"


def test_alerts_are_not_matched_ahead_when_two_rows_found_the_same_id() -> None:
    """A hash collision between two true rows: the tick falls back to membership tests."""
    alerts = pl.DataFrame({"alert_id": [1, 2, 3]}, schema={"alert_id": pl.UInt64})
    part = pl.DataFrame({"alert_id": [2, 9], "rule": [0, 0], "row": [5, 6]},
                        schema={"alert_id": pl.UInt64, "rule": pl.UInt16, "row": pl.UInt32})
    found = found_ahead(alerts, {0: part})
    assert found is not None and found.to_list() == [False, True, False]
    assert found_ahead(alerts, {0: part, 1: part.head(1)}) is None


# What can happen between a prepare and its tick, drawn at random: each second, some of these
# to both engines, then both tick (at the prepared instant unless "late").
STEPS = ("replication", "backup", "new_vms", "hold", "release", "drop", "squeeze", "no_prepare", "late")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sets(st.sampled_from(STEPS), max_size=3), min_size=3, max_size=7), st.integers(0, 1_000))
def test_any_sequence_of_events_gives_the_alerts_of_a_full_evaluation(seconds: list[set[str]], seed: int) -> None:
    ahead, full = pair()
    now = NOW0_MS
    for second, steps in enumerate(seconds, start=1):
        if "no_prepare" not in steps:
            ahead.prepare(now, TICK_MS)
        now += TICK_MS
        for engine in (ahead, full):
            apply_steps(engine, steps, now, seed + second)
        at = now + 300 if "late" in steps else now
        assert_same(ahead.tick(at), full.tick(at))


def apply_steps(engine: Engine, steps: set[str], now_ms: int, seed: int) -> None:
    clusters = engine.fleet.replication.get_column("cluster_id").unique().sort().to_list()
    if "replication" in steps:
        engine.apply(Stream.REPLICATION, replication_batch(engine.fleet, 200, now_ms, seed=seed), now_ms)
    if "backup" in steps:
        engine.apply(Stream.BACKUP, backup_batch(engine, now_ms, seed), now_ms)
    if "new_vms" in steps:
        payloads = [
            json.dumps({"event_id": f"n-{seed}-{k}", "ts": now_ms - 90_000, "vm_id": f"vm-n-{seed}-{k}",
                        "cluster_id": clusters[k % len(clusters)], "target_id": "hci-dr",
                        "technology": "hyperv_replica", "kind": "cycle_completed", "frequency_s": 30,
                        "recovery_point_ts": now_ms - 90_000}).encode()
            for k in range(3)
        ]
        engine.apply(Stream.REPLICATION, decode_batch(Stream.REPLICATION, payloads, now_ms).valid, now_ms)
    if "hold" in steps:
        engine.hold(clusters[seed % len(clusters) :][:2])
    if "release" in steps:
        engine.release(clusters)
    if "drop" in steps and len(clusters) > 4:
        engine.drop_clusters([clusters[seed % len(clusters)]])
    if "squeeze" in steps:
        nodes = engine.fleet.nodes.with_columns(pl.col("net_capacity_bytes_per_s") * (0.02 if seed % 2 else 50.0))
        engine.fleet = replace(engine.fleet, nodes=nodes)
