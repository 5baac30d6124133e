"""The metrics collector over a real engine: decoded events → tick → snapshot → scrape."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporters.http import bound_port, make_app, start_http
from exporters.metrics import PerVm, RpowatchCollector, make_evaluation_histogram, make_prepare_histogram
from exporters.snapshot import SelfCounters, Snapshot, SnapshotHolder
from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules.engine import Engine, TickResult
from rules.pack import compile_pack

REPO = Path(__file__).resolve().parents[2]
NOW_MS = 1_790_000_000_000
NOW_S = NOW_MS / 1000
SCRAPE_DELAY_S = 10.0  # the scrape happens 10 s after the tick


def _replication(vm: str, rp_age_s: float, frequency_s: int = 300, **extra: Any) -> bytes:
    event = {
        "event_id": f"rep-{vm}",
        "ts": NOW_MS - int(rp_age_s * 1000) + 5_000,
        "vm_id": vm,
        "cluster_id": "c1",
        "target_id": "c2",
        "technology": "hyperv_replica",
        "kind": "cycle_completed",
        "frequency_s": frequency_s,
        "recovery_point_ts": NOW_MS - int(rp_age_s * 1000),
        **extra,
    }
    return json.dumps(event).encode()


def _backup(vm: str, rp_age_s: float) -> bytes:
    event = {
        "event_id": f"bk-{vm}",
        "ts": NOW_MS - int(rp_age_s * 1000) + 60_000,
        "vm_id": vm,
        "cluster_id": "c1",
        "job_id": f"job-{vm}",
        "product": "veeam",
        "level": "host",
        "kind": "succeeded",
        "recovery_point_ts": NOW_MS - int(rp_age_s * 1000),
    }
    return json.dumps(event).encode()


def _heartbeat(node: str, age_s: float, used: int, storage: list[dict[str, object]] | None = None) -> bytes:
    event: dict[str, object] = {
        "event_id": f"hb-{node}",
        "ts": NOW_MS - int(age_s * 1000),
        "cluster_id": "c1",
        "node_id": node,
        "state": "up",
        "memory_bytes": 1000,
        "memory_used_bytes": used,
        "iops_capacity": 1000.0,
        "iops_used": 250.0,
        "net_capacity_bytes_per_s": 1000.0,
    }
    if storage is not None:
        event["storage"] = storage
    return json.dumps(event).encode()


def _engine() -> Engine:
    with open(REPO / "rules" / "packs" / "default.yaml") as f:
        pack, problems = compile_pack(yaml.safe_load(f), {"runbook_base": "docs/runbooks"})
    assert problems == []
    return Engine(pack)


def _apply(engine: Engine, stream: Stream, payloads: list[bytes]) -> None:
    decoded = decode_batch(stream, payloads, NOW_MS)
    assert decoded.rejects.is_empty(), decoded.rejects
    engine.apply(stream, decoded.valid, NOW_MS)


@pytest.fixture
def result() -> TickResult:
    engine = _engine()
    _apply(
        engine,
        Stream.REPLICATION,
        [
            _replication("vm1", 60, pending_bytes=1234, churn_bytes_per_s=100.0),  # normal
            _replication("vm2", 700),  # lag > RPO 600: critical, ReplicationRPOBreach
            _replication("vm3", 500),  # lag > 80 % of RPO: warning, ReplicationRPOAtRisk
        ],
    )
    _apply(engine, Stream.BACKUP, [_backup("vm1", 3600), _backup("vm2", 2 * 86400)])
    # n3 is the only one over the 30 s heartbeat timeout: NodeHeartbeatLost.
    csv = {"path_id": "csv1", "capacity_bytes": 1000, "free_bytes": 250, "iops_capacity": 100.0, "iops_used": 40.0,
           "online": True}
    _apply(
        engine,
        Stream.HEARTBEAT,
        [_heartbeat("n1", 5, 600, storage=[csv]), _heartbeat("n2", 5, 200), _heartbeat("n3", 60, 100)],
    )
    return engine.tick(NOW_MS)


def _scrape(
    result: TickResult,
    per_vm: PerVm = "all",
    counters: SelfCounters | None = None,
    known_alerts: tuple[tuple[str, str], ...] = (),
    max_vms: int | None = None,
) -> CollectorRegistry:
    holder = SnapshotHolder()
    stats = (counters or SelfCounters()).freeze()
    holder.set(Snapshot(result, stats))
    registry = CollectorRegistry()
    registry.register(
        RpowatchCollector(
            holder, per_vm, clock=lambda: NOW_S + SCRAPE_DELAY_S, known_alerts=known_alerts, export_max_vms=max_vms
        )
    )
    return registry


def _rep(vm: str) -> dict[str, str]:
    return {"vm": vm, "hci_cluster": "c1", "target": "c2", "technology": "hyperv_replica"}


def test_replication_gauges(result: TickResult) -> None:
    registry = _scrape(result)
    get = registry.get_sample_value
    # Lag is computed at scrape time from the recovery point, not frozen at the tick.
    assert get("rpowatch_replication_lag_seconds", _rep("vm1")) == pytest.approx(60 + SCRAPE_DELAY_S)
    assert get("rpowatch_replication_lag_seconds", _rep("vm2")) == pytest.approx(700 + SCRAPE_DELAY_S)
    assert get("rpowatch_replication_last_recovery_point_timestamp_seconds", _rep("vm1")) == pytest.approx(NOW_S - 60)
    assert get("rpowatch_replication_rpo_target_seconds", _rep("vm1")) == 600.0  # 2 × frequency
    assert get("rpowatch_replication_pending_bytes", _rep("vm1")) == 1234.0
    assert get("rpowatch_replication_pending_bytes", _rep("vm2")) is None  # unknown: absent, not 0
    assert get("rpowatch_replication_time_to_breach_seconds", _rep("vm1")) == math.inf
    assert get("rpowatch_replication_time_to_breach_seconds", _rep("vm2")) == 0.0
    # vm3: lag 500 > 1.5 × 300, so 100 s left at the tick, 90 s at the scrape.
    assert get("rpowatch_replication_time_to_breach_seconds", _rep("vm3")) == pytest.approx(90.0)
    for vm, current in (("vm1", "normal"), ("vm2", "critical"), ("vm3", "warning")):
        for state in ("normal", "warning", "critical"):
            expected = 1.0 if state == current else 0.0
            assert get("rpowatch_replication_health", {**_rep(vm), "state": state}) == expected, (vm, state)
    # No failover test reported: no series.
    assert get("rpowatch_failover_test_last_success_timestamp_seconds", {"vm": "vm1", "hci_cluster": "c1"}) is None


def test_lag_without_recovery_point_advances_from_the_view(result: TickResult) -> None:
    replication = result.views.vm_replication.with_columns(
        pl.when(pl.col("vm") == "vm1")
        .then(None)
        .otherwise(pl.col("last_recovery_point_seconds"))
        .alias("last_recovery_point_seconds")
    )
    changed = dataclasses.replace(result, views=result.views.replace(vm_replication=replication))
    get = _scrape(changed).get_sample_value
    assert get("rpowatch_replication_last_recovery_point_timestamp_seconds", _rep("vm1")) is None
    assert get("rpowatch_replication_lag_seconds", _rep("vm1")) == pytest.approx(60 + SCRAPE_DELAY_S)


def test_backup_node_cluster_and_alert_gauges(result: TickResult) -> None:
    get = _scrape(result).get_sample_value
    vm1 = {"vm": "vm1", "hci_cluster": "c1"}
    assert get("rpowatch_backup_last_success_timestamp_seconds", vm1) == pytest.approx(NOW_S - 3600)
    assert get("rpowatch_backup_rpo_target_seconds", vm1) == 86400.0
    assert get("rpowatch_restore_test_last_success_timestamp_seconds", vm1) is None
    assert get("rpowatch_node_up", {"hci_cluster": "c1", "node": "n1"}) == 1.0
    assert get("rpowatch_node_up", {"hci_cluster": "c1", "node": "n3"}) == 0.0
    assert get("rpowatch_node_last_heartbeat_timestamp_seconds", {"hci_cluster": "c1", "node": "n3"}) == pytest.approx(
        NOW_S - 60
    )
    # Up nodes n1, n2: 500 of 2000 IOPS used; free memory of n2 (800) / what n1 runs (600).
    assert get("rpowatch_cluster_iops_headroom_ratio", {"hci_cluster": "c1"}) == pytest.approx(0.75)
    assert get("rpowatch_cluster_failover_capacity_ratio", {"hci_cluster": "c1"}) == pytest.approx(800 / 600)
    assert get("rpowatch_link_bandwidth_saturation_ratio", {"hci_cluster": "c1", "target": "c2"}) == pytest.approx(
        100 / 2000
    )
    csv1 = {"hci_cluster": "c1", "storage_path": "csv1"}
    assert get("rpowatch_storage_path_free_ratio", csv1) == pytest.approx(0.25)
    assert get("rpowatch_storage_path_iops_headroom_ratio", csv1) == pytest.approx(0.6)
    assert get("rpowatch_storage_path_online", csv1) == 1.0
    assert get("rpowatch_storage_path_vms", csv1) == 0.0  # no replicated VM names it
    alerts = {
        "ReplicationRPOBreach": "critical",
        "ReplicationRPOAtRisk": "warning",
        "BackupRPOBreach": "critical",
        "NodeHeartbeatLost": "critical",
    }
    for name, severity in alerts.items():
        assert get("rpowatch_alerts", {"alertname": name, "severity": severity}) == 1.0, name


def test_alert_count_drops_to_zero_and_known_alerts_are_preinitialised(result: TickResult) -> None:
    resolved = result.alerts.with_columns(pl.lit("resolved").alias("state"))
    holder = SnapshotHolder(Snapshot(dataclasses.replace(result, alerts=resolved)))
    registry = CollectorRegistry()
    registry.register(RpowatchCollector(holder, known_alerts=[("FailoverTestOverdue", "warning")]))
    assert registry.get_sample_value("rpowatch_alerts", {"alertname": "NodeHeartbeatLost", "severity": "critical"}) == 0
    overdue = {"alertname": "FailoverTestOverdue", "severity": "warning"}
    assert registry.get_sample_value("rpowatch_alerts", overdue) == 0


def test_removed_entity_disappears_from_next_scrape(result: TickResult) -> None:
    holder = SnapshotHolder(Snapshot(result))
    registry = CollectorRegistry()
    registry.register(RpowatchCollector(holder, clock=lambda: NOW_S))
    assert registry.get_sample_value("rpowatch_replication_lag_seconds", _rep("vm3")) is not None
    assert registry.get_sample_value("rpowatch_node_up", {"hci_cluster": "c1", "node": "n3"}) == 0.0
    views = result.views
    holder.set(
        Snapshot(
            dataclasses.replace(
                result,
                views=views.replace(
                    vm_replication=views.vm_replication.filter(pl.col("vm") != "vm3"),
                    node=views.node.filter(pl.col("node") != "n3"),
                ),
            )
        )
    )
    for state in ("normal", "warning", "critical"):
        assert registry.get_sample_value("rpowatch_replication_health", {**_rep("vm3"), "state": state}) is None
    assert registry.get_sample_value("rpowatch_replication_lag_seconds", _rep("vm3")) is None
    assert registry.get_sample_value("rpowatch_node_up", {"hci_cluster": "c1", "node": "n3"}) is None
    assert registry.get_sample_value("rpowatch_replication_lag_seconds", _rep("vm1")) is not None


def test_per_vm_violating_keeps_only_unhealthy_vms(result: TickResult) -> None:
    get = _scrape(result, "violating").get_sample_value
    assert get("rpowatch_replication_lag_seconds", _rep("vm1")) is None
    assert get("rpowatch_replication_lag_seconds", _rep("vm2")) is not None
    assert get("rpowatch_replication_health", {**_rep("vm3"), "state": "warning"}) == 1.0
    assert get("rpowatch_backup_rpo_target_seconds", {"vm": "vm1", "hci_cluster": "c1"}) is None
    assert get("rpowatch_backup_rpo_target_seconds", {"vm": "vm2", "hci_cluster": "c1"}) == 86400.0
    assert get("rpowatch_node_up", {"hci_cluster": "c1", "node": "n1"}) == 1.0


def test_per_vm_none_keeps_only_aggregates(result: TickResult) -> None:
    registry = _scrape(result, "none")
    names = {sample.name for family in registry.collect() for sample in family.samples}
    per_vm = ("rpowatch_replication_", "rpowatch_backup_", "rpowatch_restore_", "rpowatch_failover_")
    assert not any(n.startswith(per_vm) for n in names), names
    aggregates = {"rpowatch_node_up", "rpowatch_cluster_iops_headroom_ratio", "rpowatch_alerts", "rpowatch_build_info"}
    assert aggregates <= names


def _counts(registry: CollectorRegistry, name: str, label: str, values: tuple[str, ...]) -> dict[str, float | None]:
    return {v: registry.get_sample_value(name, {"hci_cluster": "c1", label: v}) for v in values}


@pytest.mark.parametrize("per_vm", ["all", "violating", "none"])
def test_vm_counts_per_instance_whatever_per_vm_exports(result: TickResult, per_vm: PerVm) -> None:
    # Fleet compliance must not depend on which per-VM series are exported.
    registry = _scrape(result, per_vm)
    rpo = ("within", "over", "unknown")
    # At the scrape (10 s after the tick): vm1 70 s and vm3 510 s within the 600 s RPO, vm2 710 s.
    assert _counts(registry, "rpowatch_cluster_replication_vms", "rpo", rpo) == {"within": 2, "over": 1, "unknown": 0}
    health = ("normal", "warning", "critical")
    assert _counts(registry, "rpowatch_cluster_replication_health_vms", "state", health) == {
        "normal": 1, "warning": 1, "critical": 1
    }
    # Backups: vm1 an hour old, vm2 two days against a one-day RPO.
    assert _counts(registry, "rpowatch_cluster_backup_vms", "rpo", rpo) == {"within": 1, "over": 1, "unknown": 0}
    get = registry.get_sample_value
    assert get("rpowatch_cluster_failover_test_overdue_vms", {"hci_cluster": "c1"}) == 0.0
    assert get("rpowatch_cluster_restore_test_overdue_vms", {"hci_cluster": "c1"}) == 0.0


def test_vm_counts_are_taken_at_scrape_time(result: TickResult) -> None:
    holder = SnapshotHolder(Snapshot(result))
    registry = CollectorRegistry()
    # 120 s after the tick vm3's lag (500 s at the tick) is past its 600 s RPO; its health is the
    # tick's until the next one.
    registry.register(RpowatchCollector(holder, "none", clock=lambda: NOW_S + 120))
    counts = _counts(registry, "rpowatch_cluster_replication_vms", "rpo", ("within", "over", "unknown"))
    assert counts == {"within": 1, "over": 2, "unknown": 0}


def test_vm_counts_of_unknown_policies_and_overdue_tests(result: TickResult) -> None:
    views = result.views
    day = 86_400.0
    replication = views.vm_replication.with_columns(
        pl.when(pl.col("vm") == "vm1").then(None).otherwise(pl.col("rpo_target_seconds")).alias("rpo_target_seconds"),
        pl.when(pl.col("vm") == "vm2").then(40 * day).otherwise(pl.col("failover_test_age_seconds"))
        .alias("failover_test_age_seconds"),
    )
    backup = views.vm_backup.with_columns(
        pl.when(pl.col("vm") == "vm1").then(100 * day).otherwise(pl.col("restore_test_age_seconds"))
        .alias("restore_test_age_seconds"),
    )
    changed = dataclasses.replace(result, views=views.replace(vm_replication=replication, vm_backup=backup))
    registry = _scrape(changed, "violating")
    counts = _counts(registry, "rpowatch_cluster_replication_vms", "rpo", ("within", "over", "unknown"))
    assert counts == {"within": 1, "over": 1, "unknown": 1}
    get = registry.get_sample_value
    assert get("rpowatch_cluster_failover_test_overdue_vms", {"hci_cluster": "c1"}) == 1.0
    assert get("rpowatch_cluster_restore_test_overdue_vms", {"hci_cluster": "c1"}) == 1.0


@pytest.mark.parametrize(("per_vm", "max_vms"), [("all", 1), ("all", 2), ("violating", 1)])
def test_max_vms_keeps_the_vms_furthest_past_their_rpo(result: TickResult, per_vm: PerVm, max_vms: int) -> None:
    registry = _scrape(result, per_vm, max_vms=max_vms)
    get = registry.get_sample_value
    # Lag ÷ RPO at the scrape: vm2 710/600, vm3 510/600, vm1 70/600. Backup age ÷ RPO: vm2 two
    # days of one, vm1 an hour.
    exported = [vm for vm in ("vm1", "vm2", "vm3") if get("rpowatch_replication_lag_seconds", _rep(vm)) is not None]
    assert exported == sorted(["vm2", "vm3"][:max_vms])
    for vm in exported:
        assert get("rpowatch_replication_health", {**_rep(vm), "state": "normal"}) is not None
    candidates = 3 if per_vm == "all" else 2  # violating: vm1 is in normal health
    assert get("rpowatch_export_omitted_vms", {"view": "replication"}) == candidates - len(exported)
    backups = [vm for vm in ("vm1", "vm2") if get("rpowatch_backup_rpo_target_seconds", {"vm": vm, "hci_cluster": "c1"})]
    late_only = per_vm == "violating" or max_vms == 1  # vm2 is the one past its backup RPO
    assert backups == (["vm2"] if late_only else ["vm1", "vm2"])
    assert get("rpowatch_export_omitted_vms", {"view": "backup"}) == (1 if per_vm == "all" and max_vms == 1 else 0)
    # The per-instance counts still count every VM.
    counts = _counts(registry, "rpowatch_cluster_replication_vms", "rpo", ("within", "over", "unknown"))
    assert counts == {"within": 2, "over": 1, "unknown": 0}


def test_leaving_vms_out_is_logged_once_an_hour_not_at_every_scrape(
    result: TickResult, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    import exporters.metrics

    clock = [1000.0]
    monkeypatch.setattr(exporters.metrics.time, "monotonic", lambda: clock[0])
    holder = SnapshotHolder(Snapshot(result))
    collector = RpowatchCollector(holder, clock=lambda: NOW_S, export_max_vms=1)
    with caplog.at_level(logging.WARNING, logger="exporters.metrics"):
        for _ in range(3):
            list(collector.collect())
        clock[0] += 3600
        list(collector.collect())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "2 replicated and 1 backed-up VMs left out" in warnings[0] and "export.max_vms=1" in warnings[0]


def test_omitted_vms_read_zero_without_a_cap(result: TickResult) -> None:
    get = _scrape(result).get_sample_value
    assert get("rpowatch_export_omitted_vms", {"view": "replication"}) == 0
    assert get("rpowatch_export_omitted_vms", {"view": "backup"}) == 0


def test_invalid_per_vm_option_is_rejected() -> None:
    with pytest.raises(ValueError):
        RpowatchCollector(SnapshotHolder(), "some")  # type: ignore[arg-type]


def test_self_metrics_and_histogram(result: TickResult) -> None:
    counters = SelfCounters()
    counters.count_events("replication", "kafka", 5)
    counters.count_events("replication", "kafka", 2)
    counters.count_invalid("backup", "not_json", 3)
    counters.set_source_up("kafka", True)
    counters.set_source_up("mqtt", False)
    counters.mark_source_event("kafka", 100.0)
    counters.mark_source_event("kafka", 90.0)  # older: progress does not go back
    counters.count_notification("http://am1", ok=True, n=4)
    counters.count_notification("http://am1", ok=False)
    registry = _scrape(result, counters=counters)
    histogram = make_evaluation_histogram(registry)
    histogram.observe(result.duration_s)
    get = registry.get_sample_value
    assert get("rpowatch_events_total", {"stream": "replication", "source": "kafka"}) == 7
    assert get("rpowatch_events_invalid_total", {"stream": "backup", "reason": "not_json"}) == 3
    assert get("rpowatch_source_up", {"source": "kafka"}) == 1
    assert get("rpowatch_source_up", {"source": "mqtt"}) == 0
    assert get("rpowatch_source_last_event_timestamp_seconds", {"source": "kafka"}) == 100.0
    assert get("rpowatch_alertmanager_notifications_total", {"url": "http://am1"}) == 5
    assert get("rpowatch_alertmanager_notifications_failed_total", {"url": "http://am1"}) == 1
    assert get("rpowatch_build_info", {"version": "0.1.0"}) == 1
    assert get("rpowatch_evaluation_duration_seconds_count") == 1
    assert get("rpowatch_evaluation_duration_seconds_bucket", {"le": "0.001"}) is not None


def test_exposition_parses_and_passes_promtool(result: TickResult) -> None:
    counters = SelfCounters()
    counters.count_events("heartbeat", "mqtt", 1)
    counters.count_notification("http://am1", ok=True)
    registry = _scrape(result, counters=counters)
    make_evaluation_histogram(registry).observe(0.004)
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["rpowatch_events"].type == "counter"
    assert families["rpowatch_replication_health"].type == "gauge"
    assert families["rpowatch_evaluation_duration_seconds"].type == "histogram"
    assert b"# EOF" in generate_openmetrics(registry)

    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(promtool).exists(), "promtool is missing: run scripts/install-test-deps"
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


# --- contracts.md §3: every family, its type and its labels --------------------------------------

REPLICATION = ("hci_cluster", "target", "technology", "vm")
PER_VM = ("hci_cluster", "vm")
def _histogram(name: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The samples of a histogram without labels of its own."""
    return {f"{name}_bucket": ("histogram", ("le",)), f"{name}_count": ("histogram", ()), f"{name}_sum": ("histogram", ())}


# metric (sample) name -> (family type in the text format, label names)
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "rpowatch_replication_last_recovery_point_timestamp_seconds": ("gauge", REPLICATION),
    "rpowatch_replication_lag_seconds": ("gauge", REPLICATION),
    "rpowatch_replication_rpo_target_seconds": ("gauge", REPLICATION),
    "rpowatch_replication_pending_bytes": ("gauge", REPLICATION),
    "rpowatch_replication_missed_cycles_ratio": ("gauge", REPLICATION),
    "rpowatch_replication_time_to_breach_seconds": ("gauge", REPLICATION),
    "rpowatch_replication_health": ("gauge", (*REPLICATION, "state")),
    "rpowatch_backup_last_success_timestamp_seconds": ("gauge", PER_VM),
    "rpowatch_backup_rpo_target_seconds": ("gauge", PER_VM),
    "rpowatch_restore_test_last_success_timestamp_seconds": ("gauge", PER_VM),
    "rpowatch_failover_test_last_success_timestamp_seconds": ("gauge", PER_VM),
    "rpowatch_cluster_iops_headroom_ratio": ("gauge", ("hci_cluster",)),
    "rpowatch_link_bandwidth_saturation_ratio": ("gauge", ("hci_cluster", "target")),
    "rpowatch_node_up": ("gauge", ("hci_cluster", "node")),
    "rpowatch_node_last_heartbeat_timestamp_seconds": ("gauge", ("hci_cluster", "node")),
    "rpowatch_cluster_failover_capacity_ratio": ("gauge", ("hci_cluster",)),
    "rpowatch_alerts": ("gauge", ("alertname", "severity")),
    "rpowatch_events_total": ("counter", ("source", "stream")),
    "rpowatch_events_invalid_total": ("counter", ("reason", "stream")),
    "rpowatch_source_up": ("gauge", ("source",)),
    "rpowatch_source_last_event_timestamp_seconds": ("gauge", ("source",)),
    **_histogram("rpowatch_evaluation_duration_seconds"),
    "rpowatch_alertmanager_notifications_total": ("counter", ("url",)),
    "rpowatch_alertmanager_notifications_failed_total": ("counter", ("url",)),
    "rpowatch_build_info": ("gauge", ("version",)),
}
# Beyond contracts.md §3 (README "Metrics"): per-instance counts of VMs, what export.max_vms left out,
# and how long preparing each tick took.
BEYOND_CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "rpowatch_cluster_replication_vms": ("gauge", ("hci_cluster", "rpo")),
    "rpowatch_cluster_replication_health_vms": ("gauge", ("hci_cluster", "state")),
    "rpowatch_cluster_backup_vms": ("gauge", ("hci_cluster", "rpo")),
    "rpowatch_cluster_failover_test_overdue_vms": ("gauge", ("hci_cluster",)),
    "rpowatch_cluster_restore_test_overdue_vms": ("gauge", ("hci_cluster",)),
    "rpowatch_export_omitted_vms": ("gauge", ("view",)),
    **_histogram("rpowatch_evaluation_prepare_duration_seconds"),
}


@pytest.fixture
def full_result() -> TickResult:
    """Every kind of entity with every optional value reported, including the tests; the
    missed-cycles column is set to a known value (and added if the views lack it)."""
    engine = _engine()
    failover_test = json.dumps({
        "event_id": "tf-vm1", "ts": NOW_MS - 86_400_000, "vm_id": "vm1", "cluster_id": "c1", "target_id": "c2",
        "technology": "hyperv_replica", "kind": "test_failover_completed", "frequency_s": 300,
    }).encode()
    _apply(engine, Stream.REPLICATION, [_replication("vm1", 60, pending_bytes=10, churn_bytes_per_s=5.0), failover_test])
    restore_test = json.dumps({
        "event_id": "rt-vm1", "ts": NOW_MS - 7 * 86_400_000, "vm_id": "vm1", "cluster_id": "c1", "job_id": "r1",
        "product": "mabs", "level": "host", "kind": "restore_test_succeeded",
    }).encode()
    _apply(engine, Stream.BACKUP, [_backup("vm1", 3600), restore_test])
    _apply(engine, Stream.HEARTBEAT, [_heartbeat("n1", 5, 600), _heartbeat("n2", 5, 200)])
    result = engine.tick(NOW_MS)
    replication = result.views.vm_replication.with_columns(pl.lit(0.25).alias("missed_cycles_ratio"))
    return dataclasses.replace(result, views=result.views.replace(vm_replication=replication))


def _self_counters() -> SelfCounters:
    counters = SelfCounters()
    counters.count_events("replication", "kafka", 3)
    counters.count_invalid("replication", "not_json")
    counters.set_source_up("kafka", True)
    counters.mark_source_event("kafka", NOW_S)
    counters.count_notification("http://am1:9093", ok=True)
    return counters


def test_every_contract_family_is_exported_with_its_type_and_labels(full_result: TickResult) -> None:
    registry = _scrape(full_result, counters=_self_counters(), known_alerts=(("ReplicationRPOBreach", "critical"),))
    make_evaluation_histogram(registry).observe(0.003)
    make_prepare_histogram(registry).observe(0.03)
    text = generate_latest(registry).decode()
    seen: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            _, label_sets = seen.setdefault(sample.name, (family.type, set()))
            label_sets.add(frozenset(sample.labels))
    missing = sorted(set(CONTRACT) - set(seen))
    assert not missing, f"contract families not exported: {missing}"
    for name, (kind, labels) in {**CONTRACT, **BEYOND_CONTRACT}.items():
        exported_kind, label_sets = seen[name]
        assert exported_kind == kind, (name, exported_kind)
        assert label_sets == {frozenset(labels)}, (name, label_sets)
    assert registry.get_sample_value("rpowatch_replication_missed_cycles_ratio", _rep("vm1")) == 0.25
    vm1 = {"vm": "vm1", "hci_cluster": "c1"}
    assert registry.get_sample_value("rpowatch_failover_test_last_success_timestamp_seconds", vm1) == pytest.approx(
        NOW_S - 86_400
    )
    assert registry.get_sample_value("rpowatch_restore_test_last_success_timestamp_seconds", vm1) == pytest.approx(
        NOW_S - 7 * 86_400
    )
    # Nothing outside the contract, the documented additions and the histogram's _created.
    extra = {n for n in seen if n not in CONTRACT and n not in BEYOND_CONTRACT and not n.endswith("_created")}
    assert not extra, extra


def test_a_view_column_that_does_not_exist_is_not_exported(full_result: TickResult) -> None:
    views = full_result.views
    thinner = dataclasses.replace(
        full_result,
        views=views.replace(
            vm_replication=views.vm_replication.drop("missed_cycles_ratio", "time_to_breach_seconds", "health_state"),
            vm_backup=views.vm_backup.drop("last_restore_test_seconds", "backup_age_seconds"),
            cluster=views.cluster.drop("iops_headroom_ratio"),
            link=views.link.drop("saturation_ratio"),
        ),
    )
    for per_vm in ("all", "violating"):
        registry = _scrape(thinner, per_vm)
        names = {sample.name for family in registry.collect() for sample in family.samples}
        for gone in (
            "rpowatch_replication_missed_cycles_ratio",
            "rpowatch_replication_time_to_breach_seconds",
            "rpowatch_replication_health",
            "rpowatch_restore_test_last_success_timestamp_seconds",
            "rpowatch_cluster_iops_headroom_ratio",
            "rpowatch_link_bandwidth_saturation_ratio",
        ):
            assert gone not in names, (per_vm, gone)
        assert registry.get_sample_value("rpowatch_cluster_failover_capacity_ratio", {"hci_cluster": "c1"}) is not None
        if per_vm == "all":
            assert registry.get_sample_value("rpowatch_replication_lag_seconds", _rep("vm1")) == pytest.approx(
                60 + SCRAPE_DELAY_S
            )
            assert registry.get_sample_value("rpowatch_backup_rpo_target_seconds", {"vm": "vm1", "hci_cluster": "c1"}) == 86400
        # The text exposition of what remains is still valid.
        assert list(text_string_to_metric_families(generate_latest(registry).decode()))


# --- content negotiation over the real HTTP endpoint ------------------------------------------------

# What Prometheus 2.x sends when it scrapes (scrape/scrape.go, acceptHeader).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def test_metrics_endpoint_negotiates_openmetrics(full_result: TickResult) -> None:
    holder = SnapshotHolder(Snapshot(full_result, _self_counters().freeze()))
    registry = CollectorRegistry()
    registry.register(RpowatchCollector(holder, clock=lambda: NOW_S + SCRAPE_DELAY_S))
    make_evaluation_histogram(registry).observe(0.002)
    runner = await start_http(make_app(holder, registry, lambda: (True, "ready")), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}/metrics"
    try:
        async with aiohttp.ClientSession() as session:

            async def scrape(accept: str | None) -> tuple[str, str]:
                headers = {"Accept": accept} if accept is not None else {}
                async with session.get(url, headers=headers) as resp:
                    assert resp.status == 200
                    return resp.headers["Content-Type"], await resp.text()

            openmetrics = (PROMETHEUS_ACCEPT, "application/openmetrics-text", "application/openmetrics-text; version=1.0.0")
            for accept in openmetrics:
                content_type, body = await scrape(accept)
                assert content_type.startswith("application/openmetrics-text; version=1.0.0"), (accept, content_type)
                assert body.endswith("# EOF\n")
                om = {f.name: f for f in parse_openmetrics(body)}
                assert om["rpowatch_build_info"].type == "gauge"
                assert om["rpowatch_events"].type == "counter"
                assert om["rpowatch_evaluation_duration_seconds"].type == "histogram"
                lag = [s for s in om["rpowatch_replication_lag_seconds"].samples if s.labels["vm"] == "vm1"]
                assert [s.value for s in lag] == [pytest.approx(60 + SCRAPE_DELAY_S)]
            for plain in (None, "text/plain;version=0.0.4", "text/html,application/xhtml+xml,*/*;q=0.8"):
                content_type, body = await scrape(plain)
                assert content_type.startswith("text/plain; version=0.0.4"), (plain, content_type)
                assert "# EOF" not in body
                text = {f.name: f for f in text_string_to_metric_families(body)}
                assert text["rpowatch_build_info"].type == "gauge"
                assert text["rpowatch_events"].type == "counter"
    finally:
        await runner.cleanup()


def test_notification_counters_are_preinitialised_per_alertmanager_url(result: TickResult) -> None:
    counters = SelfCounters()
    counters.count_notification("http://am-1:9093", ok=False, n=2)
    holder = SnapshotHolder(Snapshot(result, counters.freeze()))
    registry = CollectorRegistry()
    registry.register(RpowatchCollector(holder, alertmanager_urls=["http://am-1:9093", "http://am-2:9093"]))
    get = registry.get_sample_value
    assert get("rpowatch_alertmanager_notifications_total", {"url": "http://am-1:9093"}) == 2
    assert get("rpowatch_alertmanager_notifications_failed_total", {"url": "http://am-1:9093"}) == 2
    assert get("rpowatch_alertmanager_notifications_total", {"url": "http://am-2:9093"}) == 0
    assert get("rpowatch_alertmanager_notifications_failed_total", {"url": "http://am-2:9093"}) == 0
