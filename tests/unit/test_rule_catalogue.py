"""Every rule of the default catalogue: fires, does not fire, resolves (injected clock)."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from ingest.contracts import Stream
from rules.engine import Engine, EngineSettings, TickResult
from rules.views import SOURCES_SCHEMA
from tests.unit.test_rules import S, T0, bk, default_pack, feed, rep, states

DAY = 86_400 * S


def hb(event_id: str, ts: int, node: str = "n1", cluster: str = "c1", **extra: Any) -> bytes:
    return json.dumps({"event_id": event_id, "ts": ts, "cluster_id": cluster, "node_id": node, "state": "up", **extra}).encode()


def engine(**settings: Any) -> Engine:
    return Engine(default_pack(), EngineSettings(**settings))


def firing(result: TickResult, alertname: str) -> set[str]:
    return {k.split("\x1f")[0] for k, s in states_rows(result, alertname) if s == "firing"}


def states_rows(result: TickResult, alertname: str) -> list[tuple[str, str]]:
    return result.alerts.filter(pl.col("alertname") == alertname).select("alert_key", "state").rows()


def test_missed_cycles_fire_at_20_percent_of_the_window_and_resolve() -> None:
    e = engine(monitoring_window_s=600)
    # At 30 s, 20 cycles are expected in 10 minutes; vm1 misses 3 in every 10 (30 %), vm2 none.
    def cycle(i: int, skip: bool) -> list[tuple[str, str]]:
        ts = T0 + i * 30 * S
        batch = [rep(f"b{i}", ts, ts, vm="vm2")] + ([] if skip else [rep(f"a{i}", ts, ts, vm="vm1")])
        feed(e, Stream.REPLICATION, batch, ts)
        changes = e.tick(ts).transitions.filter(pl.col("alertname") == "ReplicationMissedCycles")
        return changes.select("alert_key", "transition").rows()

    for i in range(26):
        cycle(i, skip=i % 10 in (3, 5, 7))
    result = e.tick(T0 + 25 * 30 * S)
    assert firing(result, "ReplicationMissedCycles") == {"vm1"}  # `for: 1m` has passed
    ratio = dict(result.views.vm_replication.select("vm", "missed_cycles_ratio").rows())
    assert 0.2 <= ratio["vm1"] < 0.45 and ratio["vm2"] < 0.1
    changes = [c for i in range(26, 60) for c in cycle(i, skip=False)]  # vm1 recovers
    assert [(key.split("\x1f")[0], t) for key, t in changes] == [("vm1", "resolved")]


def test_resync_required_by_backlog_or_event_and_resolved() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, vm="vm1", pending_bytes=600, vhd_bytes=1000),
                                 rep("b", T0, T0, vm="vm2", pending_bytes=400, vhd_bytes=1000),
                                 rep("c", T0, None, vm="vm3", kind="resync_required")], T0)
    assert firing(e.tick(T0 + S), "ReplicationResyncRequired") == {"vm1", "vm3"}
    feed(e, Stream.REPLICATION, [rep("d", T0 + 2 * S, T0 + 2 * S, vm="vm1", pending_bytes=10, vhd_bytes=1000),
                                 rep("e", T0 + 2 * S, None, vm="vm3", kind="resync_completed")], T0 + 2 * S)
    assert states(e.tick(T0 + 3 * S), "ReplicationResyncRequired") == {"vm1": "resolved", "vm3": "resolved"}


def test_not_replicating_once_paused_longer_than_the_rpo() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, freq=300), rep("p", T0 + S, None, kind="paused", freq=300)], T0 + S)
    assert firing(e.tick(T0 + 600 * S), "ReplicationNotReplicating") == set()
    assert firing(e.tick(T0 + 602 * S), "ReplicationNotReplicating") == {"vm1"}
    feed(e, Stream.REPLICATION, [rep("r", T0 + 603 * S, None, kind="resumed", freq=300)], T0 + 603 * S)
    assert states(e.tick(T0 + 604 * S), "ReplicationNotReplicating") == {"vm1": "resolved"}


def test_failover_test_overdue_after_31_days_and_resolved_by_a_test() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0)], T0)
    later = T0 + 31 * DAY + S
    feed(e, Stream.REPLICATION, [rep("b", later - S, later - S)], later)
    assert firing(e.tick(later - 2 * S), "FailoverTestOverdue") == set()
    assert firing(e.tick(later), "FailoverTestOverdue") == {"vm1"}
    feed(e, Stream.REPLICATION, [rep("t", later + S, None, kind="test_failover_completed")], later + S)
    assert states(e.tick(later + 2 * S), "FailoverTestOverdue") == {"vm1": "resolved"}


def test_backup_jobs_failing_after_three_consecutive_failures() -> None:
    e = engine()
    feed(e, Stream.BACKUP, [bk("s", T0, "succeeded", rp=T0), bk("f1", T0 + S, "failed"), bk("f2", T0 + 2 * S, "failed")], T0 + 2 * S)
    assert firing(e.tick(T0 + 3 * S), "BackupJobsFailing") == set()
    feed(e, Stream.BACKUP, [bk("f3", T0 + 4 * S, "failed"), bk("f3", T0 + 4 * S, "failed")], T0 + 4 * S)  # duplicate
    result = e.tick(T0 + 5 * S)
    assert firing(result, "BackupJobsFailing") == {"vm1"}
    assert result.views.vm_backup.get_column("consecutive_failures").to_list() == [3]
    feed(e, Stream.BACKUP, [bk("s2", T0 + 6 * S, "succeeded", rp=T0 + 6 * S)], T0 + 6 * S)
    assert states(e.tick(T0 + 7 * S), "BackupJobsFailing") == {"vm1": "resolved"}


def test_restore_test_overdue_after_90_days() -> None:
    e = engine()
    feed(e, Stream.BACKUP, [bk("s", T0, "succeeded", rp=T0)], T0)
    later = T0 + 90 * DAY + S
    feed(e, Stream.BACKUP, [bk("s2", later, "succeeded", rp=later)], later)
    assert firing(e.tick(later), "RestoreTestOverdue") == {"vm1"}
    feed(e, Stream.BACKUP, [bk("r", later + S, "restore_test_succeeded")], later + S)
    assert states(e.tick(later + S), "RestoreTestOverdue") == {"vm1": "resolved"}


def test_retention_compliance_against_the_tiers_it_can_hold() -> None:
    e = engine()
    start = T0 - 20 * DAY
    daily = [json.dumps({"event_id": f"d{i}", "ts": start + i * DAY, "vm_id": "vm1", "cluster_id": "c1", "job_id": f"j{i}",
                         "product": "mabs", "level": "host", "kind": "succeeded", "recovery_point_ts": start + i * DAY,
                         "retention_tier": "daily"}).encode() for i in range(21)]
    # vm2 reports no tiers: its product does not say, so nothing can be judged.
    feed(e, Stream.BACKUP, daily + [bk("x", start, "succeeded", rp=T0, vm="vm2")], T0)
    result = e.tick(T0 + S)
    assert firing(result, "RetentionNonCompliant") == set()  # 21 daily points >= 14
    expired = [json.dumps({"event_id": f"e{i}", "ts": T0 + (i + 1) * S, "vm_id": "vm1", "cluster_id": "c1", "job_id": f"k{i}",
                           "product": "mabs", "level": "host", "kind": "recovery_point_expired",
                           "recovery_point_ts": start + i * DAY, "retention_tier": "daily"}).encode() for i in range(10)]
    feed(e, Stream.BACKUP, expired, T0 + 20 * S)
    result = e.tick(T0 + 20 * S)
    assert firing(result, "RetentionNonCompliant") == {"vm1"}  # 11 daily points < 14
    assert result.views.vm_backup.filter(pl.col("vm") == "vm1").get_column("daily_points").to_list() == [11]


def test_vm_unprotected_only_when_neither_replica_nor_backup_is_within_policy() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, vm="vm1"), rep("b", T0, T0, vm="vm2")], T0)
    feed(e, Stream.BACKUP, [bk("s", T0, "succeeded", rp=T0, vm="vm2")], T0)
    assert firing(e.tick(T0 + 61 * S), "VMUnprotected") == {"vm1"}  # vm2's backup still counts


def heartbeats_every_10s(e: Engine, start: int, end: int, nodes: dict[tuple[str, str], dict[str, Any]]) -> None:
    for ts in range(start, end, 10 * S):
        payloads = [hb(f"{c}-{n}-{ts}", ts, n, cluster=c, **fields) for (c, n), fields in nodes.items()]
        feed(e, Stream.HEARTBEAT, payloads, ts)
        e.tick(ts)


def test_replica_iops_headroom_low_on_an_instance_that_holds_replicas() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0)], T0)  # c1 → c2
    busy = {"iops_capacity": 1000, "iops_used": 900}
    heartbeats_every_10s(e, T0, T0 + 70 * S, {("c2", "n1"): busy, ("c1", "n1"): busy})
    result = e.tick(T0 + 65 * S)
    assert firing(result, "ReplicaIOPSHeadroomLow") == {"c2"}  # c1 holds no replicas
    # Load drops: the 5-minute average follows within minutes, not at the first sample.
    idle = {"iops_capacity": 1000, "iops_used": 0}
    heartbeats_every_10s(e, T0 + 70 * S, T0 + 90 * S, {("c2", "n1"): idle})
    assert firing(e.tick(T0 + 85 * S), "ReplicaIOPSHeadroomLow") == {"c2"}
    heartbeats_every_10s(e, T0 + 90 * S, T0 + 900 * S, {("c2", "n1"): idle})
    assert states(e.tick(T0 + 895 * S), "ReplicaIOPSHeadroomLow") == {"c2": "resolved"}


def test_n_plus_one_memory_capacity() -> None:
    e = engine()
    gib = 2**30
    nodes = {
        ("c1", "n1"): {"memory_bytes": 100 * gib, "memory_used_bytes": 80 * gib},
        ("c1", "n2"): {"memory_bytes": 100 * gib, "memory_used_bytes": 10 * gib},
        ("c2", "m1"): {"memory_bytes": 100 * gib, "memory_used_bytes": 40 * gib},
        ("c2", "m2"): {"memory_bytes": 100 * gib, "memory_used_bytes": 40 * gib},
    }
    heartbeats_every_10s(e, T0, T0 + 320 * S, nodes)
    result = e.tick(T0 + 315 * S)
    ratios = dict(result.views.cluster.select("hci_cluster", "failover_capacity_ratio").rows())
    assert ratios == {"c1": 90 / 80, "c2": 60 / 40}
    assert firing(result, "ClusterFailoverCapacityInsufficient") == set()
    nodes[("c1", "n2")] = {"memory_bytes": 100 * gib, "memory_used_bytes": 50 * gib}  # 50 free for 80 used
    heartbeats_every_10s(e, T0 + 320 * S, T0 + 640 * S, nodes)
    result = e.tick(T0 + 635 * S)  # `for: 5m`
    assert firing(result, "ClusterFailoverCapacityInsufficient") == {"c1"}
    assert dict(result.views.cluster.select("hci_cluster", "failover_capacity_ratio").rows())["c1"] == 50 / 80


def test_storage_path_concentration_of_a_service_group() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, vm="sql1", service_group="sql", storage_path_id="csv1"),
                                 rep("b", T0, T0, vm="sql2", service_group="sql", storage_path_id="csv1"),
                                 rep("c", T0, T0, vm="web1", service_group="web", storage_path_id="csv1"),
                                 rep("d", T0, T0, vm="web2", service_group="web", storage_path_id="csv2")], T0)
    assert firing(e.tick(T0 + S), "StoragePathConcentration") == {"sql"}
    feed(e, Stream.REPLICATION, [rep("e", T0 + 2 * S, T0 + 2 * S, vm="sql2", service_group="sql", storage_path_id="csv2")], T0 + 2 * S)
    # Service-group sums follow the state at most `aggregate_refresh_s` (10 s) late.
    assert states(e.tick(T0 + 3 * S), "StoragePathConcentration") == {"sql": "firing"}
    assert states(e.tick(T0 + 11 * S), "StoragePathConcentration") == {"sql": "resolved"}


def test_aggregates_follow_every_change_when_refresh_is_zero() -> None:
    e = engine(aggregate_refresh_s=0)
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, vm="sql1", service_group="sql", storage_path_id="csv1"),
                                 rep("b", T0, T0, vm="sql2", service_group="sql", storage_path_id="csv1")], T0)
    assert firing(e.tick(T0 + S), "StoragePathConcentration") == {"sql"}
    feed(e, Stream.REPLICATION, [rep("e", T0 + 2 * S, T0 + 2 * S, vm="sql2", service_group="sql", storage_path_id="csv2")], T0 + 2 * S)
    assert states(e.tick(T0 + 3 * S), "StoragePathConcentration") == {"sql": "resolved"}
    assert e.tick(T0 + 4 * S).views.service_group.filter(pl.col("service_group") == "sql")["single_storage_path"].to_list() == [False]


def test_source_clock_skew_from_heartbeat_time_versus_arrival() -> None:
    e = engine()
    for i in range(5):
        now = T0 + i * 10 * S
        feed(e, Stream.HEARTBEAT, [hb(f"a{i}", now - 120 * S, "n1"), hb(f"b{i}", now, "m1", cluster="c2")], now)
    e.tick(T0 + 50 * S)
    result = e.tick(T0 + 171 * S)  # `for: 2m`
    skew = dict(result.views.cluster.select("hci_cluster", "clock_skew_seconds").rows())
    assert skew["c1"] == -120.0 and skew["c2"] == 0.0
    assert firing(result, "SourceClockSkew") == {"c1"}


def sources(last_event_ms: int | None, accepted: int = 100, rejected: int = 0, partition: int | None = None) -> pl.DataFrame:
    return pl.DataFrame([{"source": "kafka", "stream": "heartbeat", "partition": partition, "up": True,
                          "last_event_ms": last_event_ms, "accepted_recent": accepted, "rejected_recent": rejected}],
                        schema=SOURCES_SCHEMA)


def test_ingest_stalled_holds_back_heartbeat_loss_of_that_source() -> None:
    e = engine(heartbeat_timeout_s=30, ingest_stall_s=60)
    decoded = [hb("a", T0, "n1"), hb("b", T0, "m1", cluster="c2")]
    from ingest.decode import decode_batch
    batch = decode_batch(Stream.HEARTBEAT, decoded, T0).valid
    e.apply(Stream.HEARTBEAT, batch.filter(pl.col("node_id") == "n1"), T0, source="kafka")
    e.apply(Stream.HEARTBEAT, batch.filter(pl.col("node_id") == "m1"), T0, source="mqtt")
    result = e.tick(T0 + 40 * S, sources=sources(T0))
    assert firing(result, "NodeHeartbeatLost") == {"c1", "c2"}  # the source is fine: nodes are lost
    result = e.tick(T0 + 70 * S, sources=sources(T0))  # Kafka silent for 70 s
    assert firing(result, "IngestStalled") == {"kafka"}
    assert firing(result, "NodeHeartbeatLost") == {"c2"}  # n1 came through Kafka: held back
    result = e.tick(T0 + 71 * S, sources=sources(T0 + 71 * S))
    assert states(result, "IngestStalled") == {"kafka": "resolved"}


def test_ingest_mostly_rejected() -> None:
    e = engine()
    assert firing(e.tick(T0, sources=sources(T0, accepted=100, rejected=20)), "IngestMostlyRejected") == set()
    assert firing(e.tick(T0 + S, sources=sources(T0, accepted=5, rejected=50)), "IngestMostlyRejected") == {"kafka"}
    assert states(e.tick(T0 + 2 * S, sources=sources(T0, accepted=50, rejected=5)), "IngestMostlyRejected") == {"kafka": "resolved"}


def test_ingest_mostly_rejected_in_one_partition_while_the_topic_as_a_whole_is_fine() -> None:
    e = engine()
    healthy = [sources(T0, accepted=1000, rejected=10, partition=p) for p in (0, 1)]
    broken = sources(T0, accepted=3, rejected=60, partition=2)  # one edge site's feed
    feed = pl.concat([*healthy, broken])
    result = e.tick(T0, sources=feed)
    stream = result.views.source_stream.row(0, named=True)
    assert stream["rejected_ratio"] < 0.05  # diluted below any threshold over the whole topic
    assert {k: s for k, s in states_rows(result, "IngestMostlyRejected")} == {"kafka\x1fheartbeat\x1f2": "firing"}
    (alert,) = result.with_details(result.firing()).iter_rows(named=True)
    assert '"partition":"2"' in alert["labels"]
    assert "kafka heartbeat partition 2: 60 of the last 5 minutes" in alert["annotations"]


def test_a_feed_without_partitions_is_named_without_one() -> None:
    result = engine().tick(T0, sources=sources(T0, accepted=5, rejected=50))
    (alert,) = result.with_details(result.firing()).iter_rows(named=True)
    assert "kafka heartbeat: 50 of the last 5 minutes" in alert["annotations"]


def test_the_default_pack_is_the_whole_catalogue() -> None:
    names = {r.name for r in default_pack().rules}
    assert names == {
        "ReplicationRPOBreach", "ReplicationRPOAtRisk", "ReplicationMissedCycles", "ReplicationResyncRequired",
        "ReplicationNotReplicating", "BackupRPOBreach", "VMUnprotected", "BackupJobsFailing", "RestoreTestOverdue",
        "FailoverTestOverdue", "RetentionNonCompliant", "ReplicaIOPSHeadroomLow", "ReplicationLinkSaturated",
        "NodeHeartbeatLost", "ClusterFailoverCapacityInsufficient", "StoragePathConcentration", "SourceClockSkew",
        "IngestStalled", "IngestMostlyRejected",
    }


def test_a_new_vm_is_summed_into_links_and_service_groups_at_once() -> None:
    e = engine()  # default refresh: 10 s for changes of known VMs
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, vm="sql1", service_group="sql", storage_path_id="csv1")], T0)
    first = e.tick(T0 + S)
    assert first.views.link.select("hci_cluster", "target", "vms").rows() == [("c1", "c2", 1)]
    feed(e, Stream.REPLICATION, [rep("b", T0 + S, T0 + S, vm="sql2", service_group="sql", storage_path_id="csv1")], T0 + S)
    result = e.tick(T0 + 2 * S)  # one second later, well inside the refresh period
    assert result.views.link.select("vms").item() == 2
    assert firing(result, "StoragePathConcentration") == {"sql"}


def test_a_backup_arriving_for_an_unprotected_vm_resolves_it() -> None:
    e = engine()
    feed(e, Stream.REPLICATION, [rep("a", T0, T0, vm="vm1"), rep("b", T0, T0, vm="vm2")], T0)
    feed(e, Stream.BACKUP, [bk("s", T0, "succeeded", rp=T0, vm="vm2")], T0)
    assert firing(e.tick(T0 + 61 * S), "VMUnprotected") == {"vm1"}
    # Only the backup table grows: the VM's backup is a row the pairing made with the
    # aggregates does not cover, so it is looked up.
    feed(e, Stream.BACKUP, [bk("b", T0 + 62 * S, "succeeded", rp=T0 + 62 * S, vm="vm1")], T0 + 62 * S)
    assert states(e.tick(T0 + 63 * S), "VMUnprotected") == {"vm1": "resolved"}


def storage(path: str, free: int, online: bool = True, capacity: int = 1000) -> dict[str, Any]:
    return {"path_id": path, "capacity_bytes": capacity, "free_bytes": free, "iops_capacity": 100.0,
            "iops_used": 25.0, "online": online}


def test_storage_paths_keep_the_newest_report_of_any_node_whatever_the_order() -> None:
    newer = hb("a", T0 + 10 * S, "n2", storage=[storage("csv1", free=100), storage("csv2", free=900, online=False)])
    older = hb("b", T0, "n1", storage=[storage("csv1", free=800)])
    views = []
    for order in ([older, newer], [newer, older]):
        e = engine()
        for payload in order:  # one batch each: a late report must not win
            feed(e, Stream.HEARTBEAT, [payload], T0 + 20 * S)
        feed(e, Stream.REPLICATION, [rep(f"r{i}", T0, T0, vm=f"vm{i}", storage_path_id="csv1") for i in range(3)], T0 + 20 * S)
        views.append(e.tick(T0 + 20 * S).views.storage_path.sort("storage_path"))
    assert views[0].equals(views[1])
    rows = {r["storage_path"]: r for r in views[0].iter_rows(named=True)}
    assert rows["csv1"]["free_bytes"] == 100 and rows["csv1"]["reported_by"] == "n2"
    assert rows["csv1"]["free_ratio"] == 0.1 and rows["csv1"]["iops_headroom_ratio"] == 0.75
    assert rows["csv1"]["vms"] == 3 and rows["csv2"]["vms"] == 0
    assert rows["csv2"]["online"] is False and rows["csv1"]["report_age_seconds"] == 10.0


def test_an_operator_rule_on_storage_paths_fires_and_resolves() -> None:
    from rules.pack import compile_pack

    doc = {"rules": [{"alert": "StoragePathLowOnSpace", "entity": "storage_path", "condition": "free_ratio < 0.2",
                      "severity": "warning", "annotations": {"summary": "Low.", "description": "{storage_path}: {free_ratio}"}}]}
    pack, problems = compile_pack(doc)
    assert problems == []
    e = Engine(pack)
    feed(e, Stream.HEARTBEAT, [hb("a", T0, "n1", storage=[storage("csv1", free=100), storage("csv2", free=500)])], T0)
    assert firing(e.tick(T0 + S), "StoragePathLowOnSpace") == {"c1"}
    assert {k.split("\x1f")[1] for k, s in states_rows(e.tick(T0 + 2 * S), "StoragePathLowOnSpace")} == {"csv1"}
    feed(e, Stream.HEARTBEAT, [hb("b", T0 + 3 * S, "n1", storage=[storage("csv1", free=600)])], T0 + 3 * S)
    assert states(e.tick(T0 + 4 * S), "StoragePathLowOnSpace") == {"c1": "resolved"}
    e.drop_clusters(["c1"])
    assert e.fleet.storage_paths.is_empty()
