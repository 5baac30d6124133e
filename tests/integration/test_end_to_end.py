"""End to end against the real programs: Kafka and Mosquitto in, Prometheus and Alertmanager out.

rpowatch runs in-process (the same `Service` that `rpowatch run` starts) so the test can read
its port; everything it talks to is a real server started by tests/harness.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest
from aiokafka import AIOKafkaConsumer

from ingest.kafka import start_producer
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.wiring import build_dead_letter_sink, build_sources
from tests.harness import Alertmanager, KafkaBroker, Mosquitto, Prometheus
from tests.harness.wait import until as _until

pytestmark = pytest.mark.integration

STALLED_VM = "e2e-stall-1"
RPO_S = 4  # a policy for the e2e VMs, so the test waits seconds rather than minutes


def rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s * 1000) % 1000:03d}Z"


def replication(event_id: str, vm: str, cluster: str, recovery_point_s: float) -> bytes:
    return json.dumps({
        "event_id": event_id, "ts": rfc3339(time.time()), "vm_id": vm, "cluster_id": cluster,
        "target_id": "hci-dr", "technology": "hyperv_replica", "kind": "cycle_completed",
        "frequency_s": 30, "recovery_point_ts": rfc3339(recovery_point_s), "pending_bytes": 1024,
    }).encode()


def heartbeat(node: str, cluster: str) -> bytes:
    now_ms = int(time.time() * 1000)
    return json.dumps({"event_id": f"{node}:{now_ms}", "ts": now_ms, "cluster_id": cluster, "node_id": node,
                       "state": "up", "memory_bytes": 2**38, "memory_used_bytes": 2**37}).encode()



async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    return await _until(check, timeout, what, in_thread=True, interval=0.25)


@pytest.fixture
async def service(kafka: KafkaBroker, mosquitto: Mosquitto, alertmanager: Alertmanager, unique_name: str) -> AsyncIterator[Service]:
    topics = {s: f"{unique_name}.{s}" for s in ("replication", "backup", "heartbeat", "dlq")}
    for name in topics.values():
        await kafka.acreate_topic(name, partitions=3)
    settings = Settings(**{
        "sources": {
            "kafka": {"enabled": True, "bootstrap_servers": kafka.bootstrap, "group_id": unique_name,
                      "topics": {k: topics[k] for k in ("replication", "backup", "heartbeat")},
                      "dead_letter_topic": topics["dlq"], "poll_timeout_ms": 100},
            "mqtt": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port, "topic_prefix": unique_name,
                     "client_id": unique_name},
        },
        "http": {"port": 0},
        "evaluation": {"interval": "500ms"},
        "alertmanager": {"urls": [alertmanager.url], "resend_delay": "2s"},
        "policies": [{"name": "e2e", "match": {"vm": "e2e-*"}, "replication_rpo_seconds": RPO_S}],
    })
    sink, producer = await build_dead_letter_sink(settings)
    svc = Service(settings, load_rule_packs(settings), build_sources(settings), sink)
    await svc.start()
    svc.topics = topics  # type: ignore[attr-defined]
    svc.prefix = unique_name  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        await svc.stop()
        if producer is not None:
            await producer.stop()


async def test_records_from_kafka_and_mqtt_reach_prometheus_and_alertmanager(
    service: Service, kafka: KafkaBroker, mosquitto: Mosquitto, prometheus: Prometheus, alertmanager: Alertmanager
) -> None:
    topics: dict[str, str] = service.topics  # type: ignore[attr-defined]
    prefix: str = service.prefix  # type: ignore[attr-defined]
    prometheus.set_targets([f"127.0.0.1:{service.port}"], labels={"e2e": prefix})
    producer = await start_producer(kafka.bootstrap, "e2e-producer")
    try:
        # Kafka: the VM that will stall, a healthy one, and a poison record in between.
        now = time.time()
        for value in (replication("k1", STALLED_VM, "hci-a", now), b'{"event_id": "broken", "vm_id": 7',
                      replication("k2", "e2e-ok-1", "hci-a", now)):
            await producer.send_and_wait(topics["replication"], value, key=b"hci-a")
        # MQTT: an edge instance publishing its node heartbeat and a VM's cycle.
        async with aiomqtt.Client(mosquitto.host, port=mosquitto.port, identifier=f"{prefix}-pub") as client:
            await client.publish(f"{prefix}/hci-edge/n1/heartbeat", heartbeat("n1", "hci-edge"), qos=1)
            await client.publish(f"{prefix}/hci-edge/n1/replication",
                                 replication("m1", "edge-vm-1", "hci-edge", time.time()), qos=1)

        # Prometheus really scrapes what both sources delivered.
        job = f'e2e="{prefix}"'
        await prometheus.wait_for_async(f'rpowatch_node_up{{{job},hci_cluster="hci-edge",node="n1"}}',
                                        lambda r: len(r) == 1 and r[0]["value"][1] == "1", timeout=30)
        result = await prometheus.wait_for_async(f"rpowatch_replication_rpo_target_seconds{{{job}}}",
                                                 lambda r: len(r) == 3, timeout=30)
        targets = {s["metric"]["vm"]: float(s["value"][1]) for s in result}
        assert targets == {STALLED_VM: RPO_S, "e2e-ok-1": RPO_S, "edge-vm-1": 60.0}
        await prometheus.wait_for_async(f'rpowatch_events_invalid_total{{{job},stream="replication",reason="not_json"}}',
                                        lambda r: len(r) == 1 and r[0]["value"][1] == "1")
        await prometheus.wait_for_async(f'rpowatch_events_total{{{job},source="mqtt"}}',
                                        lambda r: sum(float(s["value"][1]) for s in r) == 2)

        # The stalled VM's breach reaches the real Alertmanager with identity labels and values.
        breach = {"alertname": "ReplicationRPOBreach", "vm": STALLED_VM}
        alerts = await until(lambda: alertmanager.get_alerts(labels=breach), 20, "breach in Alertmanager")
        (alert,) = alerts
        assert alert["labels"] == {"alertname": "ReplicationRPOBreach", "severity": "critical", "service": "rpowatch",
                                   "vm": STALLED_VM, "hci_cluster": "hci-a", "target": "hci-dr",
                                   "technology": "hyperv_replica"}
        assert "RPO is 4.0 s" in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].endswith("/ReplicationRPOBreach.md")
        assert alert["generatorURL"].startswith(f"http://127.0.0.1:{service.port}/")
        assert alert["status"]["state"] == "active"
        await prometheus.wait_for_async(f'rpowatch_alerts{{{job},alertname="ReplicationRPOBreach"}}',
                                        lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 1)

        # Replication resumes: the alert is resolved in Alertmanager.
        await producer.send_and_wait(topics["replication"], replication("k3", STALLED_VM, "hci-a", time.time()), key=b"hci-a")
        await until(lambda: not alertmanager.get_alerts(labels=breach), 20, "breach resolved in Alertmanager")
    finally:
        await producer.stop()

    # The poison record is in the dead-letter topic, byte for byte, with its origin.
    consumer = AIOKafkaConsumer(topics["dlq"], bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest",
                                group_id=f"{prefix}-dlq-reader")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000, max_records=10)
        records = [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert [r.value for r in records] == [b'{"event_id": "broken", "vm_id": 7']
    headers = {k: v.decode() for k, v in records[0].headers}
    assert headers["rpowatch.origin.topic"] == topics["replication"]
    assert headers["rpowatch.reason"] == "not_json"
    assert headers["rpowatch.stream"] == "replication"
    assert int(headers["rpowatch.origin.offset"]) >= 0
