"""Hyper-V Replica JSON (`Measure-VMReplication` / `Get-VMReplication | ConvertTo-Json`) → events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ingest.adapters import AdapterSettings, IdentityRule, IdentitySettings, adapt_and_decode, build_adapters
from ingest.contracts import Stream
from ingest.deadletter import dead_letters
from ingest.source import Batch
from tests.fixtures.adapters.payloads import fixture, hyperv_record, ms, ps7, ps51

FORMAT = "hyperv_replica_json"
RECEIVED = datetime(2024, 11, 24, 10, 1, 40, tzinfo=timezone.utc)  # just after the fixtures' samples


def batch(*payloads: bytes, received: datetime = RECEIVED) -> Batch:
    n = len(payloads)
    return Batch("kafka", Stream.REPLICATION, list(payloads), ["hv.replication"] * n, [0] * n, list(range(100, 100 + n)),
                 ms(received), format=FORMAT)


def run(*payloads: bytes, settings: AdapterSettings = AdapterSettings(), received: datetime = RECEIVED
        ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int, Batch, Any]:
    """Valid events (as dicts, by event_id order of the decoder), (reason, detail) of every
    dead letter, the number of ignored records, the batch and the outcomes."""
    b = batch(*payloads, received=received)
    outcomes, ignored = adapt_and_decode(build_adapters(settings)[FORMAT], b)
    events: list[dict[str, Any]] = []
    rejects: list[tuple[str, str]] = []
    for outcome in outcomes:
        assert outcome.stream == Stream.REPLICATION
        events.extend(outcome.valid.to_dicts())
        rejects.extend(outcome.rejects.select("reason", "detail").iter_rows())
    return events, rejects, ignored, b, outcomes


def by_kind(events: list[dict[str, Any]], vm: str) -> dict[str, dict[str, Any]]:
    return {str(e["kind"]): e for e in events if e["vm_id"] == vm}


def utc(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)


# --- the documented shapes ------------------------------------------------------------------


def test_windows_powershell_51_measure_output_maps_cycles_states_and_tests() -> None:
    events, rejects, ignored, _, _ = run(fixture("measure_vmreplication_ps51.json"))
    assert rejects == []
    sql = by_kind(events, "sql-01")
    cycle = sql["cycle_completed"]
    assert cycle["ts"] == cycle["recovery_point_ts"] == utc(1732442370000)  # LastReplicationTime
    assert (cycle["cluster_id"], cycle["target_id"], cycle["technology"]) == ("hvrbroker-sea", "hvrbroker-ams", "hyperv_replica")
    assert cycle["frequency_s"] == 300  # no ReplicationFrequencySec in Measure-VMReplication: the default
    assert cycle["pending_bytes"] == 4096
    assert cycle["duration_ms"] == 2300  # AverageReplicationLatency {Ticks: 23000000}
    assert cycle["churn_bytes_per_s"] == pytest.approx(3145728 / 300)  # AverageReplicationSize / interval
    assert cycle["vhd_bytes"] is None and cycle["bytes"] is None  # not in the format: left empty
    assert sql["test_failover_completed"]["ts"] == utc(1731920400000)
    # Suspended → paused at the sample time (the batch's arrival: no SampledAt), with its backlog.
    web = by_kind(events, "web-02")
    assert web["paused"]["ts"] == RECEIVED
    assert web["paused"]["pending_bytes"] == 734003200
    assert web["cycle_completed"]["recovery_point_ts"] == utc(1732421100000)
    # Error → cycle_failed; the replica side's record (ReplicationMode 2) is not the primary's view.
    assert set(by_kind(events, "app-03")) == {"cycle_completed", "cycle_failed"}
    assert by_kind(events, "file-07") == {}
    assert ignored == 1


def test_powershell_7_iso_dates_with_offsets_and_enum_names() -> None:
    events, rejects, _, _, _ = run(fixture("measure_vmreplication_ps7_enums_as_strings.json"))
    assert rejects == []
    (cycle,) = events
    assert cycle["vm_id"] == "dc-01"
    # "2024-11-24T10:59:30.1234567+01:00" is 09:59:30.123 UTC (milliseconds kept).
    assert cycle["recovery_point_ts"] == datetime(2024, 11, 24, 9, 59, 30, 123000, tzinfo=timezone.utc)
    assert cycle["duration_ms"] == 1500


def test_get_vmreplication_value_wrapper_gives_frequency_and_initial_replication() -> None:
    events, rejects, _, _, _ = run(fixture("get_vmreplication_ps51_value_wrapper.json"))
    assert rejects == []
    sql = by_kind(events, "sql-01")["cycle_completed"]
    assert sql["frequency_s"] == 30
    new = by_kind(events, "new-04")
    assert set(new) == {"initial_replication_started"}
    assert new["initial_replication_started"]["frequency_s"] == 900


def test_a_single_object_an_array_and_a_bom_are_all_read() -> None:
    now = RECEIVED - timedelta(seconds=20)
    one = hyperv_record("vm-a", now, frequency_s=30)
    events, rejects, _, _, _ = run(ps51(one), ps51([hyperv_record("vm-b", now)]), b"\xef\xbb\xbf" + ps7(hyperv_record("vm-c", now)))
    assert rejects == []
    assert sorted(e["vm_id"] for e in events) == ["vm-a", "vm-b", "vm-c"]


def test_replays_and_repeated_samples_give_the_same_event_ids() -> None:
    now = RECEIVED - timedelta(seconds=20)
    payload = ps51([hyperv_record("vm-a", now, state=8)])
    first, _, _, _, _ = run(payload)
    again, _, _, _, _ = run(payload, received=RECEIVED + timedelta(minutes=1))  # a later sample, same cycle
    assert sorted(e["event_id"] for e in first) == sorted(e["event_id"] for e in again)
    assert {e["kind"] for e in first} == {"cycle_completed", "paused"}


def test_sampled_at_from_the_collector_dates_state_events() -> None:
    sampled = RECEIVED - timedelta(seconds=30)
    record = hyperv_record("vm-a", RECEIVED - timedelta(hours=3), state=10, SampledAt=sampled)
    events, rejects, _, _, _ = run(ps51([record]))
    assert rejects == []
    assert by_kind(events, "vm-a")["resync_required"]["ts"] == sampled


@pytest.mark.parametrize(
    ("state", "kind"),
    [(1, "initial_replication_started"), (5, "planned_failover"), (8, "paused"), (9, "cycle_failed"),
     (10, "resync_required"), (11, "resync_required"), (12, "paused"), (15, "failback_completed"),
     (17, "cycle_failed")],
)
def test_replication_states_map_to_kinds(state: int, kind: str) -> None:
    events, rejects, _, _, _ = run(ps51([hyperv_record("vm-a", None, state=state)]))
    assert rejects == []
    assert [e["kind"] for e in events] == [kind]


def test_a_failover_reported_by_the_replica_side_is_kept() -> None:
    events, _, _, _, _ = run(ps51([hyperv_record("vm-a", None, state=7, mode=2)]))
    assert [e["kind"] for e in events] == ["unplanned_failover"]


# --- awkward input -----------------------------------------------------------------------------


def test_health_and_state_values_outside_their_enums_are_dead_lettered() -> None:
    now = RECEIVED - timedelta(seconds=20)
    records = [
        hyperv_record("bad-health", now, health=7),
        hyperv_record("bad-name", now, ReplicationHealth="Splendid"),
        hyperv_record("bad-state", now, state=42),
        hyperv_record("bad-mode", now, mode=9),
        hyperv_record("null-health", now, ReplicationHealth=None),
    ]
    events, rejects, _, _, _ = run(ps51(records))
    assert [e["vm_id"] for e in events] == ["null-health"]  # a null health is fine: it maps to nothing
    reasons = {detail.split("'")[1] if "'" in detail else detail: reason for reason, detail in rejects}
    assert {reason for reason, _ in rejects} == {"unknown_enum"}
    assert set(reasons) == {"7", "Splendid", "42", "9"}
    assert any("ReplicationHealth '7' is not one of NotApplicable, Normal, Warning, Critical" in d for _, d in rejects)


def test_timestamps_and_timespans_in_every_spelling() -> None:
    base = RECEIVED - timedelta(minutes=1)
    records = [
        hyperv_record("offset", None, LastReplicationTime="/Date(1732442370000+0100)/"),
        hyperv_record("get-date", None, LastReplicationTime={"value": "/Date(1732442370000)/", "DisplayHint": 2}),
        hyperv_record("text-span", base, latency=None, AverageReplicationLatency="00:00:02.5000000"),
        hyperv_record("day-span", base, latency=None, AverageReplicationLatency="1.00:00:00"),
    ]
    events, rejects, _, _, _ = run(ps51(records))
    assert rejects == []
    cycles = {e["vm_id"]: e for e in events if e["kind"] == "cycle_completed"}
    assert cycles["offset"]["recovery_point_ts"] == utc(1732442370000)
    assert cycles["get-date"]["recovery_point_ts"] == utc(1732442370000)
    assert cycles["text-span"]["duration_ms"] == 2500
    assert cycles["day-span"]["duration_ms"] == 86_400_000


def test_unusable_times_and_types_are_dead_lettered_with_the_field() -> None:
    records = [
        hyperv_record("naive", None, LastReplicationTime="2024-11-24T10:00:00"),  # no offset: ambiguous
        hyperv_record("garbage", None, LastReplicationTime="yesterday"),
        hyperv_record("span", RECEIVED, latency=None, AverageReplicationLatency=2.5),
        hyperv_record("future", RECEIVED + timedelta(hours=1)),
        hyperv_record("negative", RECEIVED, pending=-1),
    ]
    _, rejects, _, _, _ = run(ps51(records))
    got = sorted((reason, detail.split(": ", 1)[1].split(" ")[0]) for reason, detail in rejects)
    assert got == [
        ("bad_timestamp", "LastReplicationTime"),
        ("bad_timestamp", "LastReplicationTime"),
        ("future_timestamp", "ts"),  # the canonical decoder's own checks apply too
        ("negative_value", "pending_bytes"),
        ("wrong_type", "AverageReplicationLatency"),
    ]


def test_a_record_missing_its_id_or_names_is_dead_lettered() -> None:
    now = RECEIVED - timedelta(seconds=20)
    records = [
        hyperv_record("no-name", now, VMName=None),
        hyperv_record("no-primary", now, PrimaryServerName=None, ComputerName=None),
        hyperv_record("no-replica", now, ReplicaServerName=None, CurrentReplicaServerName=None),
    ]
    _, rejects, _, _, _ = run(ps51(records))
    assert sorted(d.split(" (at")[0] for _, d in rejects) == [
        "missing_field: PrimaryServerName",
        "missing_field: ReplicaServerName",
        "missing_field: VMName",
    ]


def test_no_frequency_and_no_default_is_dead_lettered() -> None:
    settings = AdapterSettings(hyperv_default_frequency_s=None)
    now = RECEIVED - timedelta(seconds=20)
    events, rejects, _, _, _ = run(ps51([hyperv_record("a", now), hyperv_record("b", now, frequency_s=900)]), settings=settings)
    assert [e["vm_id"] for e in events] == ["b"]
    assert rejects[0][0] == "missing_field" and "ReplicationFrequencySec" in rejects[0][1]


def test_unreadable_messages_and_empty_arrays() -> None:
    events, rejects, ignored, _, _ = run(b"not json", b"42", b"[]", b'{"value": [], "Count": 0}', b"[1, null]")
    assert events == [] and ignored == 0
    assert sorted(r for r, _ in rejects) == ["not_json", "not_object", "not_object", "not_object"]


def test_a_long_vm_name_gets_a_short_stable_event_id() -> None:
    name = "vm-" + "x" * 200
    now = RECEIVED - timedelta(seconds=20)
    first, rejects, _, _, _ = run(ps51([hyperv_record(name, now)]))
    again, _, _, _, _ = run(ps51([hyperv_record(name, now)]))
    assert rejects == []
    assert len(first[0]["event_id"]) <= 128 and first[0]["event_id"] == again[0]["event_id"]


# --- identity ----------------------------------------------------------------------------------


def test_identity_by_vm_id_static_maps_and_defaults() -> None:
    identity = IdentitySettings(
        vm_source="id",
        cluster=IdentityRule(map={"hvrbroker-sea.contoso.com": "hci-seattle-01"}),
        target=IdentityRule(pattern=r"^hvrbroker-(?P<id>[a-z]+)\.", default="hci-dr"),
    )
    now = RECEIVED - timedelta(seconds=20)
    records = [
        hyperv_record("a", now, vm_id="5f0e4b1c-2d7a-4f63-9a51-0c8e6f3b2a11"),
        hyperv_record("b", now, replica="replica.example.org"),
    ]
    events, rejects, _, _, _ = run(ps51(records), settings=AdapterSettings(identity=identity))
    assert rejects == []
    got = {(e["vm_id"], e["cluster_id"], e["target_id"]) for e in events}
    assert got == {
        ("5f0e4b1c-2d7a-4f63-9a51-0c8e6f3b2a11", "hci-seattle-01", "ams"),
        (records[1]["VMId"], "hci-seattle-01", "hci-dr"),  # no pattern match: the default
    }


def test_a_name_no_rule_maps_is_dead_lettered_as_unmapped_identity() -> None:
    identity = IdentitySettings(cluster=IdentityRule(pattern=r"^hvrbroker-(?P<id>sea)\."))
    now = RECEIVED - timedelta(seconds=20)
    events, rejects, _, b, outcomes = run(
        ps51([hyperv_record("ok", now), hyperv_record("elsewhere", now, primary="hvrbroker-lon.contoso.com")]),
        settings=AdapterSettings(identity=identity),
    )
    assert [e["cluster_id"] for e in events] == ["sea"]
    (reason, detail), = rejects
    assert reason == "unmapped_identity"
    assert detail == ("unmapped_identity: PrimaryServerName 'hvrbroker-lon.contoso.com' matches no cluster identity rule"
                      " (at [1])")
    # The dead letter is the source record, with its message's origin.
    (outcome,) = outcomes
    (letter,) = dead_letters(outcome.dead_letters, outcome.rejects)
    assert b'"VMName":"elsewhere"' in letter.payload
    assert letter.headers["rpowatch.origin.offset"] == "100"
    assert letter.headers["rpowatch.origin.topic"] == "hv.replication"
    assert letter.headers["rpowatch.reason"] == "unmapped_identity"
    assert letter.headers["rpowatch.stream"] == "replication"


def test_a_single_object_message_is_dead_lettered_byte_for_byte() -> None:
    payload = ps51(hyperv_record("x", RECEIVED, health=9))
    _, _, _, _, outcomes = run(payload)
    (outcome,) = outcomes
    (letter,) = dead_letters(outcome.dead_letters, outcome.rejects)
    assert letter.payload == payload
