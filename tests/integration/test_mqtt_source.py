"""The MQTT source against a real Mosquitto: QoS 1 on a persistent session (what is published
while rpowatch is away arrives when it is back), and after the broker restarts — forgetting every
subscription, since the test broker keeps no persistence — it reconnects with backoff,
subscribes again and consumes, by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import aiomqtt
import pytest

from ingest.mqtt import MqttSettings, MqttSource
from ingest.source import Batch
from tests.harness import Mosquitto
from tests.harness.timing import record_timing

pytestmark = pytest.mark.integration


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    t0 = time.monotonic()
    with Mosquitto() as m:
        record_timing("mosquitto (private)", "start", time.monotonic() - t0)
        yield m


class Reader:
    """Runs a source's `batches()` in a task and collects the payloads."""

    def __init__(self, source: MqttSource) -> None:
        self.source = source
        self.batches: list[Batch] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.source.batches():
            self.batches.append(batch)

    @property
    def payloads(self) -> list[bytes]:
        return [p for b in self.batches for p in b.payloads]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.source.close()


async def until_true(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not true after {timeout}s")


async def publish(m: Mosquitto, topic: str, payloads: list[bytes]) -> None:
    async with aiomqtt.Client(m.host, m.port, identifier=f"pub-{time.monotonic_ns()}") as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


@pytest.fixture
async def readers() -> AsyncIterator[list[Reader]]:
    made: list[Reader] = []
    yield made
    for reader in made:
        await reader.close()


async def test_reconnects_resubscribes_and_consumes_after_a_broker_restart(
    broker: Mosquitto, unique_name: str, readers: list[Reader]
) -> None:
    source = MqttSource(MqttSettings(host=broker.host, port=broker.port, client_id=unique_name,
                                     topic_prefix=unique_name, batch_window_ms=20))
    reader = Reader(source)
    readers.append(reader)
    await until_true(lambda: source.up, 10, "connected")
    await publish(broker, f"{unique_name}/hci-1/n1/heartbeat", [b"before"])
    await until_true(lambda: reader.payloads == [b"before"], 10, "first message")
    assert reader.batches[0].topics == [f"{unique_name}/hci-1/n1/heartbeat"]

    await asyncio.to_thread(broker.stop)
    await until_true(lambda: not source.up, 10, "source down while the broker is")
    await asyncio.sleep(2)  # a few reconnect attempts with backoff
    await asyncio.to_thread(broker.start)
    record_timing("mosquitto (private)", "restart", broker.last_start_seconds or 0.0)
    await until_true(lambda: source.up, 30, "reconnected")
    # The restarted broker has no session and no subscription: only a re-subscribe delivers this.
    await publish(broker, f"{unique_name}/hci-1/n1/replication", [b"after"])
    await until_true(lambda: reader.payloads == [b"before", b"after"], 10, "message after the restart")
    assert source.connections == 2
    assert reader.batches[-1].stream.value == "replication"


async def test_messages_published_while_away_arrive_on_the_persistent_session(
    broker: Mosquitto, unique_name: str, readers: list[Reader]
) -> None:
    settings = MqttSettings(host=broker.host, port=broker.port, client_id=unique_name, topic_prefix=unique_name,
                            batch_window_ms=20)
    first = MqttSource(settings)
    reader = Reader(first)
    await until_true(lambda: first.up, 10, "connected")
    await reader.close()  # rpowatch goes away; its session stays on the broker

    away = [f"away-{i}".encode() for i in range(50)]
    await publish(broker, f"{unique_name}/hci-2/n7/backup", away)

    second = Reader(MqttSource(settings))  # same client id: the same session
    readers.append(second)
    await until_true(lambda: len(second.payloads) == len(away), 15, "queued messages delivered")
    assert second.payloads == away
