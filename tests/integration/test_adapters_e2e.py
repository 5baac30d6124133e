"""Real telemetry formats end to end: published to real Kafka and Mosquitto, read by the
in-process `Service` through their adapters, and seen as state, alerts and dead letters.

- Kafka: Windows PowerShell 5.1 `Measure-VMReplication | ConvertTo-Json` on one topic, Azure
  Monitor diagnostics of a Recovery Services vault (Site Recovery and Backup, `{"records": [...]}`
  as Event Hubs delivers them) on another;
- MQTT: what deploy/collectors/Publish-RpowatchTelemetry.ps1 publishes from a node — the
  cmdlet's JSON on `<prefix>/<cluster>/<node>/hyperv-replica` and a canonical heartbeat.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import aiomqtt
import polars as pl
import pytest
from aiokafka import AIOKafkaConsumer

from ingest.kafka import start_producer
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.wiring import build_dead_letter_sink, build_sources
from tests.fixtures.adapters.payloads import asr_stats, backup_item, backup_job, event_hub, hyperv_record, ps51
from tests.harness import KafkaBroker, Mosquitto
from tests.harness.wait import until

pytestmark = pytest.mark.integration



def firing(service: Service, alertname: str) -> set[str]:
    """The VMs (or nodes) for which `alertname` is firing at the latest tick."""
    result = service.holder.get().result
    alerts = result.with_details(result.firing().filter(pl.col("alertname") == alertname))
    return {json.loads(labels).get("vm") or json.loads(labels).get("node") for labels in alerts.get_column("labels")}


def view(service: Service, entity: str) -> dict[str, dict[str, Any]]:
    return {row.get("vm") or row["node"]: row for row in service.holder.get().result.views.of(entity).to_dicts()}


@pytest.fixture
async def service(kafka: KafkaBroker, mosquitto: Mosquitto, unique_name: str) -> AsyncIterator[Service]:
    names = {k: f"{unique_name}.{k}" for k in ("replication", "backup", "heartbeat", "dlq", "hv", "eh")}
    for name in names.values():
        await kafka.acreate_topic(name, partitions=2)
    settings = Settings(**{
        "sources": {
            "kafka": {"enabled": True, "bootstrap_servers": kafka.bootstrap, "group_id": unique_name,
                      "topics": {k: names[k] for k in ("replication", "backup", "heartbeat")},
                      "dead_letter_topic": names["dlq"], "poll_timeout_ms": 100,
                      "extra_topics": [{"topic": names["hv"], "format": "hyperv_replica_json"},
                                       {"topic": names["eh"], "format": "azure_diagnostics"}]},
            "mqtt": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port, "topic_prefix": unique_name,
                     "client_id": unique_name,
                     "extra_filters": [{"filter": f"{unique_name}/+/+/hyperv-replica", "format": "hyperv_replica_json"}]},
        },
        "http": {"port": 0},
        "evaluation": {"interval": "500ms"},
        "adapters": {"identity": {"cluster": {"map": {"hvrbroker-sea.contoso.com": "hci-sea-01"}}}},
    })
    sink, producer = await build_dead_letter_sink(settings)
    svc = Service(settings, load_rule_packs(settings), build_sources(settings), sink)
    await svc.start()
    svc.names = names  # type: ignore[attr-defined]
    svc.prefix = unique_name  # type: ignore[attr-defined]
    try:
        # MQTT keeps what a subscription missed only once it exists (persistent session).
        await until(lambda: all(source.up for source in svc.sources), 30, "sources connected")
        yield svc
    finally:
        await svc.stop()
        if producer is not None:
            await producer.stop()


def headers_of(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


async def read_dead_letters(kafka: KafkaBroker, topic: str, group: str, reasons: set[str]) -> dict[str, Any]:
    """The first dead letter of each reason, once all `reasons` are there. Delivery is at least
    once: a batch applied again after a consumer-group rebalance dead-letters its rejects again."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", group_id=group)
    await consumer.start()
    by_reason: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while not reasons <= set(by_reason) and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=1000, max_records=100)
            for record in (r for rs in polled.values() for r in rs):
                by_reason.setdefault(headers_of(record)["rpowatch.reason"], record)
    finally:
        await consumer.stop()
    assert set(by_reason) == reasons
    return by_reason


async def test_hyperv_and_azure_diagnostics_from_kafka(service: Service, kafka: KafkaBroker) -> None:
    names: dict[str, str] = service.names  # type: ignore[attr-defined]
    now = datetime.now(timezone.utc)
    hyperv = ps51([
        hyperv_record("hv-fresh", now - timedelta(seconds=5), frequency_s=30),
        hyperv_record("hv-stale", now - timedelta(minutes=30), pending=5 << 20),  # 300 s interval: RPO 600 s
        hyperv_record("hv-paused", now - timedelta(minutes=2), state=8),
        hyperv_record("hv-odd", now, health=7),  # ReplicationHealth outside its enum
    ])
    vault = event_hub([
        asr_stats("erp-fresh", now - timedelta(minutes=1), 45),
        asr_stats("erp-behind", now - timedelta(minutes=1), 7200),  # 2 h behind; RPO 30 min (900 s × 2)
        asr_stats(None, now - timedelta(minutes=1), 45),  # a record missing its VM's name
        *[backup_job("bk-failing", f"job-{i}", now - timedelta(hours=3 - i), "Failed", JobFailureCode="UserErrorVmNotFound")
          for i in range(3)],
        backup_item("bk-old", now - timedelta(hours=30)),  # newest recovery point older than 24 h
        backup_item("bk-ok", now - timedelta(hours=2)),
        {"time": now.isoformat(), "category": "AddonAzureBackupProtectedInstance", "properties": {"ProtectedInstanceCount": "1"}},
    ])
    producer = await start_producer(kafka.bootstrap, "adapters-e2e")
    try:
        hv_meta = await producer.send_and_wait(names["hv"], hyperv, key=b"hci-sea-01")
        eh_meta = await producer.send_and_wait(names["eh"], vault)
    finally:
        await producer.stop()

    breaches = await until(lambda: firing(service, "ReplicationRPOBreach") >= {"hv-stale", "erp-behind"}, 30,
                           "replication RPO breaches")
    assert breaches
    assert firing(service, "ReplicationRPOBreach") == {"hv-stale", "erp-behind"}
    replication = view(service, "vm_replication")
    assert set(replication) == {"hv-fresh", "hv-stale", "hv-paused", "erp-fresh", "erp-behind"}
    assert replication["hv-paused"]["status"] == "paused"
    assert replication["hv-stale"]["pending_bytes"] == 5 << 20
    assert (replication["hv-fresh"]["hci_cluster"], replication["hv-fresh"]["target"]) == ("hci-sea-01", "hvrbroker-ams")
    assert replication["hv-fresh"]["rpo_target_seconds"] == 60  # 2 × ReplicationFrequencySec
    assert (replication["erp-fresh"]["technology"], replication["erp-fresh"]["target"]) == ("asr", "azure:westeurope")
    await until(lambda: {"bk-old"} <= firing(service, "BackupRPOBreach"), 30, "backup RPO breach")
    await until(lambda: {"bk-failing"} <= firing(service, "BackupJobsFailing"), 30, "backup jobs failing")
    assert view(service, "vm_backup")["bk-failing"]["consecutive_failures"] == 3
    assert "bk-ok" not in firing(service, "BackupRPOBreach")
    stats = service.holder.get().self_stats
    assert stats.events_invalid_total[("replication", "unknown_enum")] >= 1
    assert stats.events_invalid_total[("replication", "missing_field")] >= 1

    # The unmappable records are dead letters: the source record, its message's origin, why.
    prefix: str = service.prefix  # type: ignore[attr-defined]
    by_reason = await read_dead_letters(kafka, names["dlq"], f"{prefix}-dlq", {"unknown_enum", "missing_field"})
    odd = by_reason["unknown_enum"]
    odd_headers = headers_of(odd)
    assert json.loads(odd.value)["VMName"] == "hv-odd"
    assert (odd_headers["rpowatch.origin.topic"], int(odd_headers["rpowatch.origin.offset"])) == (names["hv"], hv_meta.offset)
    assert odd_headers["rpowatch.detail"].startswith("unknown_enum: ReplicationHealth '7'")
    nameless = by_reason["missing_field"]
    nameless_headers = headers_of(nameless)
    assert "name" not in json.loads(nameless.value)["properties"]
    assert nameless_headers["rpowatch.origin.topic"] == names["eh"]
    assert int(nameless_headers["rpowatch.origin.offset"]) == eh_meta.offset
    assert nameless_headers["rpowatch.detail"] == "missing_field: ReplicatedItemFriendlyName (at records[2])"


async def test_collector_output_over_mqtt(service: Service, kafka: KafkaBroker, mosquitto: Mosquitto) -> None:
    names: dict[str, str] = service.names  # type: ignore[attr-defined]
    prefix: str = service.prefix  # type: ignore[attr-defined]
    now = datetime.now(timezone.utc)
    # As the collector sends it: compressed JSON of selected properties, ReplicationFrequencySec
    # merged in from Get-VMReplication, SampledAt added; the node's capacity as a heartbeat.
    sampled = now - timedelta(seconds=1)
    hyperv = ps51([
        hyperv_record("edge-ok", now - timedelta(seconds=10), frequency_s=30, SampledAt=sampled),
        hyperv_record("edge-resync", now - timedelta(hours=1), state=10, frequency_s=300, SampledAt=sampled),
        hyperv_record("edge-stale", now - timedelta(minutes=5), frequency_s=30, SampledAt=sampled),
        hyperv_record("edge-nameless", now, VMName=None, SampledAt=sampled),
    ]).replace(b"\r\n", b"").replace(b"    ", b"")
    now_ms = int(now.timestamp() * 1000)
    heartbeat = json.dumps({"event_id": f"node1:{now_ms}", "ts": now_ms, "cluster_id": "hci-sea-01", "node_id": "node1",
                            "state": "up", "memory_bytes": 2**39, "memory_used_bytes": 2**38, "cpu_cores": 64}).encode()
    async with aiomqtt.Client(mosquitto.host, port=mosquitto.port, identifier=f"{prefix}-collector") as client:
        await client.publish(f"{prefix}/hci-sea-01/node1/hyperv-replica", hyperv, qos=1)
        await client.publish(f"{prefix}/hci-sea-01/node1/heartbeat", heartbeat, qos=1)

    await until(lambda: "edge-stale" in firing(service, "ReplicationRPOBreach"), 30, "breach of the stale edge VM")
    replication = view(service, "vm_replication")
    assert {"edge-ok", "edge-resync", "edge-stale"} <= set(replication)
    assert replication["edge-resync"]["status"] == "resync_required"
    assert replication["edge-ok"]["lag_seconds"] < replication["edge-ok"]["rpo_target_seconds"]
    assert firing(service, "ReplicationRPOBreach") == {"edge-stale", "edge-resync"}
    # The heartbeat may arrive in a later batch than the replication records.
    await until(lambda: "node1" in view(service, "node"), 30, "node1's heartbeat applied")
    assert view(service, "node")["node1"]["up"] == 1

    letter = (await read_dead_letters(kafka, names["dlq"], f"{prefix}-dlq", {"missing_field"}))["missing_field"]
    headers = headers_of(letter)
    assert headers["rpowatch.source"] == "mqtt"
    assert headers["rpowatch.origin.topic"] == f"{prefix}/hci-sea-01/node1/hyperv-replica"
    assert headers["rpowatch.detail"] == "missing_field: VMName (at [3])"
