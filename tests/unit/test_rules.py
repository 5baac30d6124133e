"""The rule engine with an injected clock: state updates, the four first rules, the lifecycle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules.engine import Engine, EngineSettings, TickResult
from rules.pack import RulePack, compile_pack
from rules.policy import Policy, PolicyMatch
from rules.views import identity

T0 = 1_795_600_000_000
S = 1000
DEFAULT_PACK = Path(__file__).resolve().parents[2] / "rules" / "packs" / "default.yaml"


def default_pack() -> RulePack:
    pack, problems = compile_pack(yaml.safe_load(DEFAULT_PACK.read_text()), {"runbook_base": "rb"})
    assert problems == []
    return pack


def rep(event_id: str, ts: int, rp: int | None, vm: str = "vm1", kind: str = "cycle_completed", freq: int = 30, **extra: Any) -> bytes:
    record = {"event_id": event_id, "ts": ts, "vm_id": vm, "cluster_id": "c1", "target_id": "c2",
              "technology": "hyperv_replica", "kind": kind, "frequency_s": freq, **extra}
    if rp is not None:
        record["recovery_point_ts"] = rp
    return json.dumps(record).encode()


def hb(event_id: str, ts: int, node: str = "n1", state: str = "up") -> bytes:
    return json.dumps({"event_id": event_id, "ts": ts, "cluster_id": "c1", "node_id": node, "state": state}).encode()


def bk(event_id: str, ts: int, kind: str, rp: int | None = None, vm: str = "vm1") -> bytes:
    record: dict[str, Any] = {"event_id": event_id, "ts": ts, "vm_id": vm, "cluster_id": "c1", "job_id": event_id,
                              "product": "mabs", "level": "host", "kind": kind}
    if rp is not None:
        record["recovery_point_ts"] = rp
    return json.dumps(record).encode()


def feed(engine: Engine, stream: Stream, payloads: list[bytes], now: int) -> int:
    decoded = decode_batch(stream, payloads, now)
    assert decoded.rejects.is_empty(), decoded.rejects.to_dicts()
    return engine.apply(stream, decoded.valid, now)


def states(result: TickResult, alertname: str) -> dict[str, str]:
    rows = result.alerts.filter(pl.col("alertname") == alertname).select("alert_key", "state").rows()
    return {key.split("\x1f")[0]: state for key, state in rows}


def transitions(result: TickResult, alertname: str) -> list[str]:
    return result.transitions.filter(pl.col("alertname") == alertname).get_column("transition").to_list()


def test_replication_rpo_breach_fires_at_the_rpo_and_resolves_on_a_new_cycle() -> None:
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0)  # 30 s interval → RPO 60 s
    assert states(engine.tick(T0 + 60 * S), "ReplicationRPOBreach") == {}
    result = engine.tick(T0 + 61 * S)
    assert states(result, "ReplicationRPOBreach") == {"vm1": "firing"}
    fired = result.transitions.filter(pl.col("alertname") == "ReplicationRPOBreach").row(0, named=True)
    assert fired["transition"] == "fired"
    labels = json.loads(fired["labels"])
    assert labels == {"alertname": "ReplicationRPOBreach", "severity": "critical", "service": "rpowatch",
                      "vm": "vm1", "hci_cluster": "c1", "target": "c2", "technology": "hyperv_replica"}
    annotations = json.loads(fired["annotations"])
    assert "61.0 s old" in annotations["description"] and annotations["runbook_url"] == "rb/ReplicationRPOBreach.md"

    feed(engine, Stream.REPLICATION, [rep("b", T0 + 62 * S, T0 + 61 * S)], T0 + 62 * S)
    result = engine.tick(T0 + 62 * S)
    assert states(result, "ReplicationRPOBreach") == {"vm1": "resolved"}
    assert transitions(result, "ReplicationRPOBreach") == ["resolved"]
    assert transitions(result, "VMUnprotected") == ["resolved"]  # no backup, replica back in RPO


def test_at_risk_fires_on_an_overdue_cycle_or_above_80_percent_and_stops_at_the_breach() -> None:
    engine = Engine(default_pack(), EngineSettings(lookahead_s=60))
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0, freq=300)], T0)  # RPO 600 s
    assert states(engine.tick(T0 + 479 * S), "ReplicationRPOAtRisk") == {}
    result = engine.tick(T0 + 481 * S)  # above 80 % of the RPO
    assert states(result, "ReplicationRPOAtRisk") == {"vm1": "firing"}
    assert result.views.vm_replication.get_column("time_to_breach_seconds").to_list() == [119.0]
    result = engine.tick(T0 + 601 * S)
    assert states(result, "ReplicationRPOAtRisk") == {"vm1": "resolved"}
    assert states(result, "ReplicationRPOBreach") == {"vm1": "firing"}

    # With the default 5-minute look-ahead, an overdue cycle (lag > 1.5 x interval) is enough.
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0, freq=300)], T0)
    assert states(engine.tick(T0 + 449 * S), "ReplicationRPOAtRisk") == {}
    assert states(engine.tick(T0 + 451 * S), "ReplicationRPOAtRisk") == {"vm1": "firing"}


def test_a_saturated_link_raises_at_risk_before_the_lag_is_high() -> None:
    # 10 MB/s of churn over a 4 MB/s link: the next 5-minute cycle cannot finish within the RPO.
    settings = EngineSettings(link_capacity_bytes_per_s=(("c1", "c2", 4e6),))
    engine = Engine(default_pack(), settings)
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0, freq=300, churn_bytes_per_s=10e6, pending_bytes=0)], T0)
    result = engine.tick(T0 + 10 * S)
    view = result.views.vm_replication.row(0, named=True)
    assert view["link_saturation_ratio"] == 2.5
    assert view["lag_seconds"] == 10.0
    assert view["time_to_breach_seconds"] == 590.0
    assert states(result, "ReplicationRPOAtRisk") == {}  # 590 s away: beyond the look-ahead
    result = engine.tick(T0 + 301 * S)  # lag 301 s (50 %), no cycle overdue yet: the link says so
    assert states(result, "ReplicationRPOAtRisk") == {"vm1": "firing"}
    assert states(result, "ReplicationLinkSaturated") == {"c1": "pending"} or states(result, "ReplicationLinkSaturated") == {"c1": "firing"}

    unsaturated = Engine(default_pack(), EngineSettings(link_capacity_bytes_per_s=(("c1", "c2", 40e6),)))
    feed(unsaturated, Stream.REPLICATION, [rep("a", T0, T0, freq=300, churn_bytes_per_s=10e6, pending_bytes=0)], T0)
    assert states(unsaturated.tick(T0 + 301 * S), "ReplicationRPOAtRisk") == {}


def test_policy_rpo_overrides_twice_the_interval() -> None:
    policies = (Policy(name="tier0", match=PolicyMatch(vm="sql-*"), replication_rpo_seconds=45), Policy(name="default"))
    engine = Engine(default_pack(), EngineSettings(policies=policies))
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0, vm="sql-1"), rep("b", T0, T0, vm="web-1")], T0)
    result = engine.tick(T0 + 50 * S)
    assert states(result, "ReplicationRPOBreach") == {"sql-1": "firing"}
    assert dict(result.views.vm_replication.select("vm", "rpo_target_seconds").rows()) == {"sql-1": 45.0, "web-1": 60.0}


def test_node_heartbeat_lost_after_timeout_or_when_down() -> None:
    engine = Engine(default_pack(), EngineSettings(heartbeat_timeout_s=15))
    feed(engine, Stream.HEARTBEAT, [hb("h1", T0, "n1"), hb("h2", T0, "n2", state="down")], T0)
    assert states(engine.tick(T0 + 10 * S), "NodeHeartbeatLost") == {"c1": "firing"}  # n2 is down
    result = engine.tick(T0 + 16 * S)
    assert sorted(json.loads(labels)["node"] for labels in result.with_details(result.firing())["labels"]) == ["n1", "n2"]
    feed(engine, Stream.HEARTBEAT, [hb("h3", T0 + 17 * S, "n1"), hb("h4", T0 + 17 * S, "n2")], T0 + 17 * S)
    result = engine.tick(T0 + 17 * S)
    assert result.firing().is_empty()
    assert sorted(result.transitions.get_column("transition").to_list()) == ["resolved", "resolved"]


def test_backup_rpo_breach_counts_consecutive_failures_and_resolves_on_success() -> None:
    day = 86_400 * S
    engine = Engine(default_pack())
    feed(engine, Stream.BACKUP, [bk("b1", T0, "succeeded", rp=T0 - day + 10 * S)], T0)
    assert states(engine.tick(T0 + 5 * S), "BackupRPOBreach") == {}
    feed(engine, Stream.BACKUP, [bk("b2", T0 + 6 * S, "failed"), bk("b3", T0 + 8 * S, "failed")], T0 + 8 * S)
    result = engine.tick(T0 + 11 * S)
    assert states(result, "BackupRPOBreach") == {"vm1": "firing"}
    assert result.views.vm_backup.get_column("consecutive_failures").to_list() == [2]
    assert "2 consecutive" in json.loads(result.with_details(result.firing()).filter(pl.col("alertname") == "BackupRPOBreach").get_column("annotations")[0])["description"]
    feed(engine, Stream.BACKUP, [bk("b4", T0 + 12 * S, "succeeded", rp=T0 + 12 * S)], T0 + 12 * S)
    result = engine.tick(T0 + 13 * S)
    assert states(result, "BackupRPOBreach") == {"vm1": "resolved"}
    assert result.views.vm_backup.get_column("consecutive_failures").to_list() == [0]


def test_recovery_point_never_moves_backwards_and_duplicates_change_nothing() -> None:
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("new", T0 + 10 * S, T0 + 10 * S)], T0 + 10 * S)
    # A late event with an older recovery point and a replay of the same event id.
    assert feed(engine, Stream.REPLICATION, [rep("old", T0, T0), rep("new", T0 + 10 * S, T0 + 10 * S)], T0 + 11 * S) == 1
    table = engine.fleet.replication
    assert table.get_column("last_recovery_point_ms").to_list() == [T0 + 10 * S]
    assert table.get_column("last_event_ms").to_list() == [T0 + 10 * S]


def test_late_status_event_does_not_override_a_newer_one() -> None:
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("r", T0 + 5 * S, T0 + 5 * S)], T0 + 5 * S)
    feed(engine, Stream.REPLICATION, [rep("p", T0, None, kind="paused")], T0 + 6 * S)
    assert engine.fleet.replication.get_column("status").to_list() == ["replicating"]


def test_for_keeps_an_alert_pending_and_a_short_blip_is_forgotten() -> None:
    doc = {"rules": [{"alert": "Lagging", "entity": "vm_replication", "condition": "lag_seconds > 10",
                      "for": "5s", "severity": "warning",
                      "annotations": {"summary": "Lagging.", "description": "{vm} lags {lag_seconds} s"}}]}
    pack, problems = compile_pack(doc)
    assert problems == []
    engine = Engine(pack)
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0)
    assert states(engine.tick(T0 + 11 * S), "Lagging") == {"vm1": "pending"}
    assert states(engine.tick(T0 + 15 * S), "Lagging") == {"vm1": "pending"}
    assert states(engine.tick(T0 + 16 * S), "Lagging") == {"vm1": "firing"}
    # Recovered, then lagging again only briefly: pending, then gone without firing.
    feed(engine, Stream.REPLICATION, [rep("b", T0 + 17 * S, T0 + 17 * S)], T0 + 17 * S)
    assert states(engine.tick(T0 + 17 * S), "Lagging") == {"vm1": "resolved"}
    assert states(engine.tick(T0 + 28 * S), "Lagging") == {"vm1": "pending"}
    feed(engine, Stream.REPLICATION, [rep("c", T0 + 29 * S, T0 + 29 * S)], T0 + 29 * S)
    result = engine.tick(T0 + 29 * S)
    # As in Prometheus: the new pending occurrence replaced the resolved one and is dropped
    # without ever firing, so nothing is sent.
    assert states(result, "Lagging") == {}
    assert result.transitions.is_empty()


def test_resolved_alerts_are_forgotten_after_the_retention() -> None:
    engine = Engine(default_pack(), EngineSettings(resolved_retention_s=60, heartbeat_timeout_s=1000))
    feed(engine, Stream.HEARTBEAT, [hb("h1", T0, state="down")], T0)
    engine.tick(T0)
    feed(engine, Stream.HEARTBEAT, [hb("h2", T0 + S)], T0 + S)
    assert states(engine.tick(T0 + S), "NodeHeartbeatLost") == {"c1": "resolved"}
    assert states(engine.tick(T0 + 60 * S), "NodeHeartbeatLost") == {"c1": "resolved"}
    assert states(engine.tick(T0 + 62 * S), "NodeHeartbeatLost") == {}


@pytest.mark.parametrize(
    ("rule", "field", "needle"),
    [
        ({"condition": "lag_secs > 1"}, "condition", "lag_secs"),
        ({"condition": "lag_seconds >>> 1"}, "condition", "unable to parse"),
        ({"condition": "lag_seconds + 1"}, "condition", "not a true/false test"),
        ({"entity": "planet"}, "entity", "vm_replication"),
        ({"severity": "page"}, "severity", "critical"),
        ({"for": "soon"}, "for", "not a duration"),
        ({"annotations": {"summary": "No period", "description": "x"}}, "annotations", "period"),
        ({"annotations": {"summary": "Ok.", "description": "{nope}"}}, "description", "unknown placeholder"),
        ({"labels": {"severity": "x"}}, "labels", "cannot be overridden"),
        ({"alert": "lower_case"}, "alert", "CamelCase"),
    ],
)
def test_pack_problems_name_the_rule_and_field(rule: dict[str, Any], field: str, needle: str) -> None:
    base = {"alert": "Good", "entity": "vm_replication", "condition": "lag_seconds > 1", "severity": "warning",
            "annotations": {"summary": "Fine.", "description": "{vm}"}}
    pack, problems = compile_pack({"rules": [{**base, **rule}]})
    assert pack.rules == ()
    assert len(problems) == 1
    assert problems[0].path[:2] == ("rules", 0)
    assert field in problems[0].path
    assert needle in problems[0].message


def test_an_unknown_column_is_named_with_the_views_columns_listed_once() -> None:
    base = {"alert": "Good", "entity": "vm_backup", "severity": "warning", "annotations": {"summary": "Fine.", "description": "{vm}"}}
    _, problems = compile_pack({"rules": [{**base, "condition": "backup_age > 1"}]})
    message = problems[0].message
    assert message.startswith('unable to find column "backup_age"')
    listed = message.split("(columns of vm_backup: ")[1].rstrip(")").split(", ")
    assert listed == sorted(listed) and "backup_age_seconds" in listed
    assert message.count("backup_age_seconds") == 1


_events = st.lists(
    st.tuples(st.sampled_from(["vm1", "vm2", "vm3"]), st.integers(0, 120), st.integers(0, 120),
              st.sampled_from(["cycle_completed", "paused", "cycle_failed", "resumed"])),
    min_size=1, max_size=25,
)


@settings(max_examples=80, deadline=None)
@given(events=_events, data=st.data())
def test_permuting_or_splitting_a_batch_gives_the_same_state_and_alerts(events: list[tuple[str, int, int, str]], data: st.DataObject) -> None:
    payloads = [rep(f"e{i}", T0 + ts * S, T0 + min(rp, ts) * S, vm=vm, kind=kind) for i, (vm, ts, rp, kind) in enumerate(events)]
    by_time = [p for _, p in sorted(zip(events, payloads), key=lambda pair: pair[0][1])]
    now = T0 + 130 * S
    exact = ["vm_id", "last_recovery_point_ms", "last_event_ms", "first_seen_ms", "status_event_ms",
             "completed_cur", "completed_prev", "missed_cur", "missed_prev"]

    def run(batches: list[list[bytes]]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        engine = Engine(default_pack())
        for batch in batches:
            decoded = decode_batch(Stream.REPLICATION, batch, now)
            engine.apply(Stream.REPLICATION, decoded.valid, now)
        result = engine.tick(now + 30 * S)
        table = engine.fleet.replication.sort("vm_id")
        alerts = result.alerts.select("alertname", "alert_key", "state").sort("alertname", "alert_key")
        return table.select(exact), table.select("vm_id", "status", "status_since_ms"), alerts

    reference = run([payloads])
    shuffled = data.draw(st.permutations(payloads))
    cut = data.draw(st.integers(0, len(payloads)))
    # A time-ordered stream is cut between two instants: events of one VM at the very same
    # millisecond split over two batches can start its status run one instant apart (the state
    # keeps the current run, not the one before it that a graver status at that instant
    # would extend). Everything else is exact at any cut.
    times = sorted(ts for _, ts, _, _ in events)
    instant_cut = cut if cut in (0, len(times)) or times[cut - 1] != times[cut] else 0
    # One batch in any order, or a time-ordered stream split between instants: identical.
    for variant in (run([list(shuffled)]), run([by_time[:instant_cut], by_time[instant_cut:]])):
        assert variant[0].equals(reference[0])
        assert variant[1].equals(reference[1])
        assert variant[2].equals(reference[2])
    # Out of order across batches: recovery points, counters and the newest status are still
    # exact; only the start of a status run can differ, when a late event of another status
    # lands inside it (state keeps the run's start, not every event of it).
    split = run([list(shuffled[:cut]), list(shuffled[cut:])])
    assert split[0].equals(reference[0])
    assert run([by_time[:cut], by_time[cut:]])[0].equals(reference[0])
    assert split[1].select("vm_id", "status").equals(reference[1].select("vm_id", "status"))


def test_dropped_clusters_vanish_and_held_clusters_keep_their_alerts_frozen() -> None:
    engine = Engine(default_pack(), EngineSettings(heartbeat_timeout_s=10))
    feed(engine, Stream.HEARTBEAT, [hb("h1", T0, "n1"), json.dumps({"event_id": "h2", "ts": T0, "cluster_id": "c9",
         "node_id": "x1", "state": "up"}).encode()], T0)
    result = engine.tick(T0 + 11 * S)
    assert sorted(result.firing().get_column("hci_cluster").to_list()) == ["c1", "c9"]

    engine.hold(["c1"])
    feed(engine, Stream.HEARTBEAT, [hb("h3", T0 + 12 * S, "n1")], T0 + 12 * S)
    result = engine.tick(T0 + 12 * S)
    assert result.transitions.is_empty()  # c1 is held: its alert neither resolves nor changes
    assert sorted(result.firing().get_column("hci_cluster").to_list()) == ["c1", "c9"]
    engine.release(["c1"])
    result = engine.tick(T0 + 13 * S)
    assert result.transitions.select("hci_cluster", "transition").rows() == [("c1", "resolved")]

    engine.drop_clusters(["c9"])
    result = engine.tick(T0 + 14 * S)
    assert result.views.node.get_column("hci_cluster").to_list() == ["c1"]
    assert result.firing().is_empty() and result.transitions.is_empty()  # dropped, not resolved


def test_an_instance_dropped_and_given_back_is_rebuilt_from_replayed_events() -> None:
    engine = Engine(default_pack())
    assert feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0) == 1
    engine.drop_clusters(["c1"])
    assert engine.fleet.replication.is_empty()
    # The same records replayed after the partition comes back apply again.
    assert feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0 + S) == 1
    assert engine.fleet.replication.get_column("vm_id").to_list() == ["vm1"]


def _annotations(result: TickResult, alertname: str) -> dict[str, Any]:
    rows = result.with_details(result.alerts.filter(pl.col("alertname") == alertname))
    assert rows.height == 1
    return dict(json.loads(rows.get_column("annotations")[0]))


def test_annotations_of_a_standing_alert_follow_the_latest_evaluation() -> None:
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0)
    assert "61.0 s old" in _annotations(engine.tick(T0 + 61 * S), "ReplicationRPOBreach")["description"]
    later = engine.tick(T0 + 95 * S)
    assert "95.0 s old" in _annotations(later, "ReplicationRPOBreach")["description"]


@pytest.mark.parametrize("prepared", [False, True], ids=["read-before-prepare", "stored-by-prepare"])
def test_a_resolved_alert_keeps_the_annotations_of_its_last_true_tick(prepared: bool) -> None:
    # The tick that ends an alert leaves its annotations to be rendered on read, or stored by
    # the prepare after it (or by the next tick, without one).
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0)
    engine.tick(T0 + 61 * S)
    engine.tick(T0 + 70 * S)  # last tick it is true: 70 s behind
    feed(engine, Stream.REPLICATION, [rep("b", T0 + 75 * S, T0 + 74 * S)], T0 + 75 * S)
    result = engine.tick(T0 + 80 * S)
    if prepared:
        engine.prepare(T0 + 80 * S, 10 * S)
        assert engine._ended is None  # stored
    assert states(result, "ReplicationRPOBreach") == {"vm1": "resolved"}
    resolved = result.transitions.filter(pl.col("alertname") == "ReplicationRPOBreach").row(0, named=True)
    assert resolved["transition"] == "resolved"
    assert "70.0 s old" in json.loads(resolved["annotations"])["description"]
    assert "70.0 s old" in _annotations(engine.tick(T0 + 90 * S), "ReplicationRPOBreach")["description"]


def test_alert_ids_are_stable_and_distinct_per_rule() -> None:
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0, vm="vm1"), rep("b", T0, T0, vm="vm2")], T0)
    first = engine.tick(T0 + 61 * S).alerts.select("alertname", "alert_key", "alert_id")
    second = engine.tick(T0 + 62 * S).alerts.select("alertname", "alert_key", "alert_id")
    assert first.sort("alert_id").equals(second.sort("alert_id"))
    breaches = first.filter(pl.col("alertname") == "ReplicationRPOBreach")
    assert breaches.height == 2 and first.height == first.get_column("alert_id").n_unique() > 2


def test_a_fleet_wide_transition_logs_twenty_lines_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from rpowatch.service import LOGGED_TRANSITIONS, _log_transitions

    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep(f"e{i}", T0, T0, vm=f"vm{i:02d}") for i in range(30)], T0)
    result = engine.tick(T0 + 61 * S)
    fired = result.transitions.filter(pl.col("transition") == "fired")
    assert fired.height == 60  # 30 VMs: ReplicationRPOBreach and VMUnprotected each
    with caplog.at_level(logging.INFO, logger="rpowatch.service"):
        _log_transitions(result)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == LOGGED_TRANSITIONS + 1
    assert all(line.startswith("alert ") and "'vm': 'vm" in line for line in lines[:-1])
    assert lines[-1].startswith("and 40 more alert transitions: ") and "fired" in lines[-1]


def test_alert_ids_from_the_stored_identity_hash_match_the_labels_of_a_materialised_view() -> None:
    """Per-VM views carry the identity hash kept in the state; a view given as a frame (tests,
    tools) hashes its label columns instead. Both must give every alert the same id, or its
    labels and annotations would not be found."""
    engine = Engine(default_pack())
    feed(engine, Stream.REPLICATION, [rep("r1", T0, T0 - 600_000), rep("r2", T0, T0 - 600_000, vm="vm2")], T0)
    feed(engine, Stream.BACKUP, [bk("b1", T0, "failed"), bk("b2", T0, "failed", vm="vm2")], T0)
    result = engine.tick(T0 + 1000)
    assert result.alerts.height >= 2  # replication RPO breaches of both VMs
    live = result.views
    given = live.replace(vm_replication=live.vm_replication, vm_backup=live.vm_backup)
    for entity in ("vm_replication", "vm_backup"):
        stored = live.lazy(entity).select("vm", identity(entity)).collect().sort("vm")
        hashed = given.lazy(entity).select("vm", identity(entity)).collect().sort("vm")
        assert stored.height == 2
        assert stored.equals(hashed)
    described = result.with_details(result.alerts)
    assert described.get_column("labels").null_count() == 0
    assert described.get_column("annotations").null_count() == 0


def test_a_constant_condition_switches_a_rule_off_without_building_the_per_vm_view() -> None:
    """An operator turns a shipped rule off by replacing it with `condition: "FALSE"`: nothing
    fires, and the tick reads no column of the view for it (it once built the whole per-VM
    view at every tick, tens of milliseconds at a million VMs)."""
    override, problems = compile_pack(
        {"rules": [{"alert": "ReplicationRPOBreach", "entity": "vm_replication", "condition": "FALSE",
                    "severity": "critical", "annotations": {"summary": "Switched off.", "description": "Switched off."}}]}
    )
    assert problems == []
    engine = Engine(default_pack().merged_with(override))
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0)], T0)
    result = engine.tick(T0 + 600 * S)  # ten times the RPO
    assert states(result, "ReplicationRPOBreach") == {}
    assert states(result, "VMUnprotected") == {"vm1": "firing"}  # the other rules as before
    assert "vm_replication" not in result.views._frames


def test_labels_stay_exact_when_a_value_holds_the_key_separator() -> None:
    """alert_key joins the identity labels' values with \\x1f; a value containing it makes the
    key ambiguous, so that alert's labels are stored at birth instead of rebuilt from the key."""
    engine = Engine(default_pack())
    odd, plain = "vm\x1fodd", "vm2"
    feed(engine, Stream.REPLICATION, [rep("a", T0, T0, vm=odd), rep("b", T0, T0, vm=plain)], T0)
    assert engine._labels.is_empty()
    result = engine.tick(T0 + 61 * S)
    fired = result.transitions.filter((pl.col("alertname") == "ReplicationRPOBreach") & (pl.col("transition") == "fired"))
    labels = {json.loads(row)["vm"]: json.loads(row) for row in fired.get_column("labels").to_list()}
    assert set(labels) == {odd, plain}
    assert labels[odd]["hci_cluster"] == "c1" and labels[odd]["target"] == "c2"
    assert labels[odd]["technology"] == "hyperv_replica"
    # Only the ambiguous alerts' labels are stored (this VM's ReplicationRPOBreach and its
    # VMUnprotected): every other alert's are rebuilt when read.
    assert engine._labels.height == 2
    later = engine.tick(T0 + 62 * S)
    described = later.with_details(later.alerts)
    vms = {json.loads(row)["vm"] for row in described.get_column("labels").to_list()}
    assert vms == {odd, plain}
