"""`rpowatch simulate` against real brokers: the records really arrive (Kafka topics keyed by
instance, MQTT topics per instance/node/stream) and the progress line says how many were sent."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest
from aiokafka import AIOKafkaConsumer

from rpowatch.traffic import TOPICS
from tests.harness import KafkaBroker, Mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROGRESS = re.compile(r"^(kafka|mqtt) \S+: (\d+) records \(backup (\d+), heartbeat (\d+), replication (\d+)\) · t\+(\d+)s$")


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpowatch.cli", "simulate", "--vms", "60", "--duration", "4", "--rate", "30", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def check_progress(stderr: str, kind: str) -> int:
    lines = stderr.splitlines()
    progress = [m for line in lines if (m := PROGRESS.match(line))]
    assert len(progress) >= 2, stderr  # one line per second over four seconds
    counts = [int(m.group(2)) for m in progress]
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0
    assert all(m.group(1) == kind and int(m.group(2)) == sum(int(m.group(i)) for i in (3, 4, 5)) for m in progress)
    final = re.fullmatch(rf"sent (\d+) records to {kind} \S+", lines[-1])
    assert final, lines[-1]
    assert "Traceback" not in stderr
    return int(final.group(1))


async def test_simulate_to_kafka_reports_progress_and_delivers(kafka: KafkaBroker) -> None:
    proc = await asyncio.to_thread(simulate, "--kafka", kafka.bootstrap)
    assert proc.returncode == 0, proc.stderr
    sent = check_progress(proc.stderr, "kafka")

    consumer = AIOKafkaConsumer(*TOPICS.values(), bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest",
                                group_id=None)
    await consumer.start()
    records = []
    try:
        deadline = time.monotonic() + 30
        while len(records) < sent and time.monotonic() < deadline:
            for rs in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(rs)
    finally:
        await consumer.stop()
    assert len(records) == sent
    assert all(r.key and r.value.startswith(b"{") for r in records)
    assert {r.topic for r in records} == set(TOPICS.values())


async def test_simulate_to_mqtt_reports_progress_and_delivers(mosquitto: Mosquitto) -> None:
    received: list[str] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="simulate-watcher") as client:
        await client.subscribe("rpowatch/+/+/+", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                received.append(message.topic.value)

        collector = asyncio.create_task(collect())
        proc = await asyncio.to_thread(simulate, "--mqtt", f"{mosquitto.host}:{mosquitto.port}")
        assert proc.returncode == 0, proc.stderr
        sent = check_progress(proc.stderr, "mqtt")
        deadline = time.monotonic() + 20
        while len(received) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        collector.cancel()
    assert len(received) == sent
    assert all(re.fullmatch(r"rpowatch/[^/]+/[^/]+/(replication|backup|heartbeat)", t) for t in received)
