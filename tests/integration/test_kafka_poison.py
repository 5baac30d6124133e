"""Poison records of every kind in contracts.md §1, on a real Kafka topic between valid ones: each
lands in the dead-letter topic byte for byte with its origin and reason, is counted, its offset is
committed past, the valid records around it are applied, and a feed that is mostly rejected
raises IngestMostlyRejected."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import polars as pl
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from ingest.kafka import start_producer
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.wiring import build_dead_letter_sink, build_sources
from tests.harness import KafkaBroker
from tests.harness.wait import until

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 4096


def rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + "Z"


def replication(**override: Any) -> dict[str, Any]:
    now = time.time()
    event = {"event_id": f"ok-{time.monotonic_ns()}", "ts": rfc3339(now), "vm_id": "vm-1", "cluster_id": "hci-p",
             "target_id": "hci-dr", "technology": "hyperv_replica", "kind": "cycle_completed", "frequency_s": 300,
             "recovery_point_ts": rfc3339(now - 5), "pending_bytes": 10}
    event.update(override)
    return {k: v for k, v in event.items() if v is not None}


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


# (payload, reason) for every way a replication record can be invalid.
POISON: list[tuple[bytes | None, str]] = [
    (b"\xff\xfe{\"event_id\": 1}", "not_utf8"),
    (b'{"event_id": "x", "vm_id": ', "not_json"),
    (None, "not_json"),  # a tombstone: no value at all
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    (b"{" + b'"pad": "' + b"x" * MAX_PAYLOAD + b'"}', "too_large"),
    (encode(replication(vm_id=None)), "missing_field"),
    (encode(replication(kind="cycle_completed", recovery_point_ts=None)), "missing_field"),
    (encode(replication(pending_bytes="lots")), "wrong_type"),
    (encode(replication(vm_id={"nested": True})), "wrong_type"),
    (encode(replication(technology="vmware")), "unknown_enum"),
    (encode(replication(frequency_s=60)), "unknown_enum"),
    (encode(replication(pending_bytes=-1)), "negative_value"),
    (encode(replication(ts="yesterday")), "bad_timestamp"),
    (encode(replication(ts=rfc3339(time.time() + 3600))), "future_timestamp"),
    (encode(replication(event_id="e" * 200)), "invalid_value"),
]



@pytest.fixture
async def service(kafka: KafkaBroker, unique_name: str) -> AsyncIterator[Service]:
    topics = {s: f"{unique_name}.{s}" for s in ("replication", "backup", "heartbeat", "dlq")}
    for name in topics.values():
        await kafka.acreate_topic(name, partitions=2)
    settings = Settings(**{
        "sources": {"kafka": {
            "enabled": True, "bootstrap_servers": kafka.bootstrap, "group_id": unique_name,
            "topics": {k: topics[k] for k in ("replication", "backup", "heartbeat")},
            "dead_letter_topic": topics["dlq"], "poll_timeout_ms": 100,
        }},
        "ingest": {"max_payload_bytes": MAX_PAYLOAD},
        "http": {"port": 0},
        "evaluation": {"interval": "200ms"},
    })
    sink, producer = await build_dead_letter_sink(settings)
    svc = Service(settings, load_rule_packs(settings), build_sources(settings), sink)
    svc.topics = topics  # type: ignore[attr-defined]
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        if producer is not None:
            await producer.stop()


async def read_all(bootstrap: str, topic: str, count: int, timeout: float = 30) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while len(records) < count:
                for rs in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(rs)
    finally:
        await consumer.stop()
    return records


async def test_every_kind_of_poison_is_dead_lettered_and_the_stream_continues(kafka: KafkaBroker, service: Service) -> None:
    topics: dict[str, str] = service.topics  # type: ignore[attr-defined]
    producer = await start_producer(kafka.bootstrap, "poison-producer")
    origins: dict[tuple[int, int], tuple[bytes, str]] = {}  # (partition, offset) -> (payload, reason)
    try:
        # Valid, all the poison, valid again, on both partitions; the stream must not stop.
        for partition in (0, 1):
            await producer.send_and_wait(topics["replication"], encode(replication(vm_id=f"before-{partition}")),
                                         key=b"hci-p", partition=partition)
            for payload, reason in POISON:
                meta = await producer.send_and_wait(topics["replication"], payload, key=b"hci-p", partition=partition)
                origins[(meta.partition, meta.offset)] = (payload or b"", reason)
            await producer.send_and_wait(topics["replication"], encode(replication(vm_id=f"after-{partition}")),
                                         key=b"hci-p", partition=partition)
        # Heartbeats: a storage list that is not one.
        bad_storage = encode({"event_id": "hb-1", "ts": int(time.time() * 1000), "cluster_id": "hci-p",
                              "node_id": "n1", "state": "up", "storage": [{"path_id": 7, "capacity_bytes": "big"}]})
        hb_meta = await producer.send_and_wait(topics["heartbeat"], bad_storage, key=b"hci-p", partition=0)
    finally:
        await producer.stop()

    # The valid records after the poison were applied: the stream went on.
    await until(lambda: {"after-0", "after-1"} <= set(service.engine.fleet.replication.get_column("vm_id")), 30,
                "valid records after the poison applied")

    letters = await read_all(kafka.bootstrap, topics["dlq"], len(origins) + 1)
    assert len(letters) == len(origins) + 1
    replication_letters = [r for r in letters if dict(r.headers)["rpowatch.stream"] == b"replication"]
    seen = {}
    for letter in replication_letters:
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["rpowatch.origin.topic"] == topics["replication"]
        assert headers["rpowatch.source"] == "kafka"
        assert headers["rpowatch.detail"].startswith(headers["rpowatch.reason"])
        seen[(int(headers["rpowatch.origin.partition"]), int(headers["rpowatch.origin.offset"]))] = (
            letter.value or b"", headers["rpowatch.reason"])
    assert seen == origins  # byte for byte, with the right reason, at its origin
    (heartbeat_letter,) = [r for r in letters if dict(r.headers)["rpowatch.stream"] == b"heartbeat"]
    hb_headers = {k: v.decode() for k, v in heartbeat_letter.headers}
    assert heartbeat_letter.value == bad_storage
    assert (hb_headers["rpowatch.reason"], int(hb_headers["rpowatch.origin.offset"])) == ("wrong_type", hb_meta.offset)

    # Counted per reason.
    expected: dict[tuple[str, str], int] = {}
    for _, reason in origins.values():
        expected[("replication", reason)] = expected.get(("replication", reason), 0) + 1
    expected[("heartbeat", "wrong_type")] = 1
    await until(lambda: service.holder.get().self_stats.events_invalid_total == expected, 10, "invalid counters")

    # Most of the replication feed was rejected, on both partitions: the source-health rule
    # says so once per partition (the heartbeat feed's one record is below its minimum count).
    def mostly_rejected() -> bool:
        firing = service.holder.get().result.firing().filter(pl.col("alertname") == "IngestMostlyRejected")
        return set(firing.get_column("alert_key")) == {"kafka\x1freplication\x1f0", "kafka\x1freplication\x1f1"}

    await until(mostly_rejected, 15, "IngestMostlyRejected fires for both partitions")

    # Offsets advanced past every poison record: nothing is left for the group.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=service.settings.sources.kafka.group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topics["replication"], p) for p in (0, 1)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            deadline = time.monotonic() + 10
            while (await consumer.committed(tp)) != ends[tp] and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await consumer.committed(tp) == ends[tp]
    finally:
        await consumer.stop()


async def test_records_waiting_at_startup_are_handled_exactly_once(kafka: KafkaBroker, unique_name: str) -> None:
    """A new group finds a backlog: it is applied (held while rebuilding) and dead-lettered once —
    fetching resumes while the assignment is being set up, so a partition must not be fetched
    before it has been moved to where its replay starts."""
    topics = {s: f"{unique_name}.{s}" for s in ("replication", "backup", "heartbeat", "dlq")}
    for name in topics.values():
        await kafka.acreate_topic(name, partitions=3)
    producer = await start_producer(kafka.bootstrap, "backlog-producer")
    try:
        for i in range(300):
            value = encode(replication(vm_id=f"vm-{i}", event_id=f"e-{i}")) if i % 10 else b"not json"
            await producer.send(topics["replication"], value, key=f"hci-{i % 6}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    settings = Settings(**{
        "sources": {"kafka": {
            "enabled": True, "bootstrap_servers": kafka.bootstrap, "group_id": unique_name,
            "topics": {k: topics[k] for k in ("replication", "backup", "heartbeat")},
            "dead_letter_topic": topics["dlq"], "poll_timeout_ms": 50, "max_batch_records": 20,
        }},
        "http": {"port": 0},
        "evaluation": {"interval": "100ms"},
    })
    sink, dlq_producer = await build_dead_letter_sink(settings)
    svc = Service(settings, load_rule_packs(settings), build_sources(settings), sink)
    await svc.start()
    try:
        await until(lambda: svc.engine.fleet.replication.height == 270, 30, "backlog applied")
        await until(lambda: svc.readiness()[0], 15, "ready after the rebuild")
        await asyncio.sleep(1)  # anything handled twice would be counted by now
        stats = svc.holder.get().self_stats
        assert stats.events_total == {("replication", "kafka"): 270}
        assert stats.events_invalid_total == {("replication", "not_json"): 30}
    finally:
        await svc.stop()
        if dlq_producer is not None:
            await dlq_producer.stop()
    letters = await read_all(kafka.bootstrap, topics["dlq"], 30)
    origins = {(dict(r.headers)["rpowatch.origin.partition"], dict(r.headers)["rpowatch.origin.offset"]) for r in letters}
    assert len(origins) == 30
    reader = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await reader.start()
    try:
        ends = await reader.end_offsets([TopicPartition(topics["dlq"], p) for p in range(3)])
    finally:
        await reader.stop()
    assert sum(ends.values()) == 30  # not one dead letter twice
