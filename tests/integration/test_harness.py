"""Proves each real service in tests/harness starts, serves and stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta

import aiomqtt
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from tests.harness import Alertmanager, KafkaBroker, Mosquitto, Prometheus, free_port
from tests.harness.timing import record_timing

pytestmark = pytest.mark.integration


# -- Kafka ---------------------------------------------------------------------


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, key=f"k{i}".encode())
    finally:
        await producer.stop()


async def consume(
    bootstrap: str, topic: str, group: str, count: int, timeout: float = 30.0
) -> list[ConsumerRecord]:
    """Read exactly ``count`` records with consumer group ``group`` and commit."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(timeout):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for part_records in batch.values():
                    records.extend(part_records)
        await consumer.commit()
        # Nothing beyond the expected records should be waiting.
        extra = await consumer.getmany(timeout_ms=500)
        assert not any(extra.values()), f"unexpected extra records: {extra}"
    finally:
        await consumer.stop()
    return records


async def test_kafka_produce_consume(kafka: KafkaBroker, unique_name: str) -> None:
    await kafka.acreate_topic(unique_name, partitions=3)
    values = [b"one", b"two", b"three"]
    await produce(kafka.bootstrap, unique_name, values)
    records = await consume(kafka.bootstrap, unique_name, f"{unique_name}-g", 3)
    assert sorted(r.value for r in records) == sorted(values)


@pytest.fixture
def private_kafka() -> Iterator[KafkaBroker]:
    """A broker of its own, so stopping it does not disturb the session one."""
    t0 = time.monotonic()
    with KafkaBroker() as broker:
        record_timing("kafka (private)", "start", time.monotonic() - t0)
        yield broker
        t1 = time.monotonic()
    record_timing("kafka (private)", "close", time.monotonic() - t1)


async def test_kafka_stop_and_restart(private_kafka: KafkaBroker, unique_name: str) -> None:
    broker, group = private_kafka, f"{unique_name}-g"
    await produce(broker.bootstrap, unique_name, [b"a1", b"a2", b"a3"])  # auto-created topic
    first = await consume(broker.bootstrap, unique_name, group, 3)
    assert sorted(r.value for r in first) == [b"a1", b"a2", b"a3"]

    port = broker.port
    # stop()/start() block for seconds: keep the event loop free meanwhile.
    await asyncio.to_thread(broker.stop)
    assert not broker.running
    record_timing("kafka (private)", "stop", broker.last_stop_seconds or 0.0)
    await asyncio.to_thread(broker.start)
    record_timing("kafka (private)", "restart", broker.last_start_seconds or 0.0)
    assert broker.port == port

    await produce(broker.bootstrap, unique_name, [b"b1", b"b2", b"b3"])
    # Same group resumes after its committed offsets: only the new records.
    second = await consume(broker.bootstrap, unique_name, group, 3)
    assert sorted(r.value for r in second) == [b"b1", b"b2", b"b3"]
    # A new group sees the whole log, i.e. the data dir survived the restart.
    everything = await consume(broker.bootstrap, unique_name, f"{group}-fresh", 6)
    assert len(everything) == 6


# -- Mosquitto -----------------------------------------------------------------


async def test_mqtt_round_trip_qos1(mosquitto: Mosquitto, unique_name: str) -> None:
    topic = f"harness/{unique_name}"
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"{unique_name}-sub") as sub:
        await sub.subscribe(topic, qos=1)
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, identifier=f"{unique_name}-pub"
        ) as pub:
            await pub.publish(topic, b"hello", qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(sub.messages))
    assert message.topic.value == topic
    assert message.payload == b"hello"
    assert message.qos == 1


# -- Prometheus ----------------------------------------------------------------


@pytest.fixture
async def probe_target() -> AsyncIterator[str]:
    """A tiny aiohttp server exposing ``harness_probe 42``; yields host:port."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text="# TYPE harness_probe gauge\nharness_probe 42\n",
            content_type="text/plain",
            headers={"X-Format": "prometheus-text-0.0.4"},
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_prometheus_scrapes_target(prometheus: Prometheus, probe_target: str) -> None:
    prometheus.set_targets([probe_target])
    try:
        result = await prometheus.wait_for_async(
            "harness_probe",
            lambda r: len(r) == 1 and float(r[0]["value"][1]) == 42.0,
            timeout=30,
        )
        assert result[0]["metric"]["job"] == "rpowatch"
        assert result[0]["metric"]["instance"] == probe_target
    finally:
        prometheus.set_targets([])


# -- Alertmanager --------------------------------------------------------------


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


async def _poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_alertmanager_post_get_resolve(alertmanager: Alertmanager, unique_name: str) -> None:
    labels = {"alertname": unique_name, "severity": "test"}
    now = datetime.now(UTC)
    alert = {
        "labels": labels,
        "annotations": {"summary": "harness self-test"},
        # Started a minute ago, so the resolving endsAt below is after it
        # (Alertmanager answers 400 to endsAt < startsAt).
        "startsAt": _iso(now - timedelta(minutes=1)),
        "endsAt": _iso(now + timedelta(minutes=5)),
    }
    alertmanager.post_alerts([alert])

    def active() -> list[dict[str, object]]:
        return alertmanager.get_alerts(active=True, labels={"alertname": unique_name})

    await _poll(lambda: len(active()) == 1, 10, "alert to appear")
    got = active()[0]
    assert got["labels"] == labels
    assert got["annotations"] == {"summary": "harness self-test"}

    # Resolve: same labels, endsAt in the past.
    alertmanager.post_alerts([{**alert, "endsAt": _iso(datetime.now(UTC) - timedelta(seconds=1))}])
    await _poll(lambda: active() == [], 10, "alert to resolve")
