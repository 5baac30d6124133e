"""`rpowatch simulate`: the demo's fleet, produced to a real Kafka or MQTT broker.

Kafka records go to the default topics keyed by `cluster_id` (idempotent producer, acks=all);
MQTT messages to `rpowatch/<cluster_id>/<node_id>/<stream>` with QoS 1. A progress line says how
much was sent: redrawn in place on a terminal, one line per second otherwise (logs, CI).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import aiomqtt
from aiokafka import AIOKafkaProducer
from rich.console import Console

from ingest.contracts import Stream
from ingest.kafka import start_producer
from rpowatch.config import Topics
from rpowatch.simulator import Emitted, FleetSimulator

STEP_S = 0.5
PROGRESS_EVERY_S = 1.0
TOPICS = {Stream.REPLICATION: Topics().replication, Stream.BACKUP: Topics().backup, Stream.HEARTBEAT: Topics().heartbeat}


def mqtt_topic(e: Emitted, prefix: str = "rpowatch") -> str:
    return f"{prefix}/{e.key}/{e.node_id}/{e.stream.value}"


def progress_line(target: str, sent: Counter[str], elapsed_s: float) -> str:
    by_stream = ", ".join(f"{k} {v}" for k, v in sorted(sent.items()))
    return f"{target}: {sum(sent.values())} records ({by_stream}) · t+{elapsed_s:.0f}s"


async def run_simulation(
    *,
    kafka: str | None,
    mqtt: str | None,
    rate: float,
    vms: int,
    duration_s: float | None,
    seed: int,
    incidents: bool,
    console: Console | None = None,
) -> int:
    """Step the simulator in (accelerated) real time and publish everything it emits, with a
    progress line. `rate` simulated seconds pass per wall-clock second. Returns the number of
    records the broker acknowledged."""
    console = console or Console(stderr=True)
    started = time.time()
    sim_start_ms = int(started * 1000)
    simulator = FleetSimulator(vms, start_ms=sim_start_ms, seed=seed, incidents=incidents)
    sent: Counter[str] = Counter()

    producer: AIOKafkaProducer | None = None
    client: aiomqtt.Client | None = None
    publish: Callable[[list[Emitted]], Awaitable[None]]
    if kafka is not None:
        kafka_producer = producer = await start_producer(kafka, "rpowatch-simulate")
        target = f"kafka {kafka}"

        async def publish_kafka(batch: list[Emitted]) -> None:
            futures = [await kafka_producer.send(TOPICS[e.stream], e.payload, key=e.key.encode()) for e in batch]
            for f in futures:
                await f

        publish = publish_kafka
    else:
        host, _, port = (mqtt or "").rpartition(":")
        mqtt_client = client = aiomqtt.Client(host or "127.0.0.1", port=int(port or 1883), identifier="rpowatch-simulate")
        await mqtt_client.__aenter__()
        target = f"mqtt {mqtt}"

        async def publish_mqtt(batch: list[Emitted]) -> None:
            for e in batch:
                await mqtt_client.publish(mqtt_topic(e), e.payload, qos=1)

        publish = publish_mqtt

    def show(status: Callable[[str], None] | None) -> None:
        line = progress_line(target, sent, time.time() - started)
        if status is not None:
            status(line)
        else:
            console.print(line, highlight=False, soft_wrap=True)

    try:
        with console.status(f"simulating {vms} VMs into {target}") as status:
            live = console.is_terminal
            last_line = time.monotonic()
            while duration_s is None or time.time() - started < duration_s:
                sim_now = sim_start_ms + int((time.time() - started) * rate * 1000)
                batch = simulator.step(sim_now)
                await publish(batch)
                sent.update(e.stream.value for e in batch)
                if live:
                    show(status.update)
                elif time.monotonic() - last_line >= PROGRESS_EVERY_S:
                    show(None)
                    last_line = time.monotonic()
                await asyncio.sleep(STEP_S)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        if producer is not None:
            await producer.stop()
        if client is not None:
            await client.__aexit__(None, None, None)
    console.print(f"sent {sum(sent.values())} records to {target}", highlight=False)
    return sum(sent.values())
