"""`rpowatch bridge` between a real Mosquitto and a real Kafka: every MQTT message lands in its
stream's topic, byte for byte, keyed by the instance; and a bridge killed (-9) while Kafka is
unreachable loses nothing — MQTT redelivers what it had not acknowledged to the next bridge."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from tests.harness import KafkaBroker, Mosquitto
from tests.harness.timing import record_timing

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STREAMS = ("replication", "backup", "heartbeat")


@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    t0 = time.monotonic()
    with KafkaBroker() as b:
        record_timing("kafka (private)", "start", time.monotonic() - t0)
        yield b


@pytest.fixture
def config(tmp_path: Path, broker: KafkaBroker, mosquitto: Mosquitto, unique_name: str) -> Path:
    for stream in STREAMS:
        broker.create_topic(f"{unique_name}.{stream}", partitions=3)
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({"sources": {
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "client_id": unique_name, "topic_prefix": unique_name},
        "kafka": {"bootstrap_servers": broker.bootstrap, "topics": {s: f"{unique_name}.{s}" for s in STREAMS},
                  "request_timeout": "5s"},
    }}))
    return path


class BridgeProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpowatch.cli", "bridge", "--config", str(config), "--log-level", "info"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        if bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.wait(10)


async def publish(m: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(m.host, m.port, identifier=f"pub-{time.monotonic_ns()}") as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


async def read_topics(bootstrap: str, topics: list[str], until: Any, timeout: float = 60) -> list[Any]:
    """Everything in `topics` from the start, read until `until(records)` or the timeout."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(records) and time.monotonic() < deadline:
            for rs in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(rs)
    finally:
        await consumer.stop()
    return records


async def test_bridge_forwards_keyed_by_instance_and_survives_a_crash_without_loss(
    broker: KafkaBroker, mosquitto: Mosquitto, config: Path, unique_name: str, tmp_path: Path, bridges: list[BridgeProcess]
) -> None:
    topics = [f"{unique_name}.{s}" for s in STREAMS]
    log = tmp_path / "bridge.log"
    bridges.append(BridgeProcess(config, log))

    # 1. Forwarding: each message to its stream's topic, key = cluster_id, bytes unchanged.
    first = [(f"{unique_name}/hci-{i % 4}/node-{i % 3}/{STREAMS[i % 3]}", f'{{"n": {i}, "x": "\\u00e9"}}'.encode())
             for i in range(12)]
    deadline = time.monotonic() + 60
    records: list[Any] = []
    while time.monotonic() < deadline and not records:  # the bridge subscribes after it starts
        await publish(mosquitto, first[:1])
        records = await read_topics(broker.bootstrap, topics, bool, timeout=3)
    assert records, f"the bridge forwarded nothing\n{log.read_text()}"
    await publish(mosquitto, first[1:])
    records = await read_topics(broker.bootstrap, topics, lambda rs: {r.value for r in rs} >= {p for _, p in first})
    by_payload = {r.value: r for r in records}
    for topic, payload in first:
        record = by_payload[payload]
        _, cluster, _, stream = topic.split("/")
        assert record.topic == f"{unique_name}.{stream}"
        assert record.key == cluster.encode()
    partitions = {(r.key, r.topic): r.partition for r in records}
    for key in {r.key for r in records}:  # one instance, one partition number on every topic
        assert len({p for (k, _), p in partitions.items() if k == key}) == 1

    # 2. Kafka goes away; messages arrive over MQTT; the bridge is killed before Kafka has them.
    await asyncio.to_thread(broker.stop)
    pending = [(f"{unique_name}/hci-9/node-1/replication", f'{{"pending": {i}}}'.encode()) for i in range(30)]
    await publish(mosquitto, pending)
    await asyncio.sleep(2)  # the bridge has received (some of) them and cannot produce
    bridges[0].kill()

    # 3. Kafka is back, a new bridge with the same session id starts: MQTT redelivers.
    await asyncio.to_thread(broker.start)
    bridges.append(BridgeProcess(config, log))
    wanted = {p for _, p in pending}
    records = await read_topics(broker.bootstrap, topics, lambda rs: {r.value for r in rs} >= wanted, timeout=90)
    assert wanted <= {r.value for r in records}, "messages lost across the crash"
    assert all(r.key == b"hci-9" for r in records if r.value in wanted)

    # A clean stop acknowledges everything and exits 0.
    assert await asyncio.to_thread(bridges[1].terminate) == 0
    text = log.read_text()
    assert "Traceback" not in text
