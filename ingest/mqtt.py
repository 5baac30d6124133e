"""MQTT source (aiomqtt) for edge sites: topics `<prefix>/<cluster_id>/<node_id>/<stream>`.

Messages are drained from the client into a bounded queue and handed over in micro-batches
(whatever arrived within the batch window). The client reconnects with backoff and
re-subscribes on every connection, as aiomqtt's reconnection guide prescribes.

Delivery: QoS 1 with a persistent session, so the broker keeps messages while we are away.
paho acknowledges a message when it is received, before it is applied, so a crash loses what
was queued in the process; MQTT has no offsets to commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt

from ingest.contracts import Stream
from ingest.source import Batch

logger = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
QUEUE_LIMIT = 100_000


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str = "rpowatch"
    topic_prefix: str = "rpowatch"
    qos: int = 1
    max_batch_records: int = 10_000
    batch_window_ms: int = 100


class MqttSource:
    name = "mqtt"

    def __init__(self, settings: MqttSettings) -> None:
        self._settings = settings
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=QUEUE_LIMIT)
        self._reader: asyncio.Task[None] | None = None
        self._up = False
        self._streams = {s.value: s for s in Stream}

    @property
    def up(self) -> bool:
        return self._up

    def topic_filters(self) -> list[str]:
        return [f"{self._settings.topic_prefix}/+/+/{s.value}" for s in Stream]

    async def _read_forever(self) -> None:
        s = self._settings
        client = aiomqtt.Client(
            s.host,
            port=s.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id,
            clean_session=False,
        )
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                async with client:
                    for topic_filter in self.topic_filters():
                        await client.subscribe(topic_filter, qos=s.qos)
                    self._up = True
                    delay = BACKOFF_INITIAL_S
                    logger.info("mqtt: connected to %s:%d", s.host, s.port)
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = str(payload).encode() if payload is not None else b""
                        # A full queue blocks here: backpressure instead of unbounded memory.
                        await self._queue.put((message.topic.value, bytes(payload)))
            except aiomqtt.MqttError as exc:
                self._up = False
                logger.warning("mqtt: connection to %s:%d lost (%s); retrying in %.1f s", s.host, s.port, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def batches(self) -> AsyncIterator[Batch]:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="mqtt-reader")
        loop = asyncio.get_running_loop()
        window = self._settings.batch_window_ms / 1000
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + window
            while len(items) < self._settings.max_batch_records:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            for batch in self._to_batches(items):
                yield batch

    def _to_batches(self, items: list[tuple[str, bytes]]) -> list[Batch]:
        received = int(time.time() * 1000)
        grouped: dict[Stream, list[tuple[str, bytes]]] = defaultdict(list)
        for topic, payload in items:
            stream = self._streams.get(topic.rsplit("/", 1)[-1])
            if stream is not None:  # the subscriptions only match known streams
                grouped[stream].append((topic, payload))
        return [
            Batch(
                self.name,
                stream,
                [p for _, p in msgs],
                [t for t, _ in msgs],
                [-1] * len(msgs),
                [-1] * len(msgs),
                received,
            )
            for stream, msgs in grouped.items()
        ]

    async def commit(self, batch: Batch) -> None:
        return None  # paho has already acknowledged; MQTT has nothing to commit

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, aiomqtt.MqttError):
                pass
            self._reader = None
        self._up = False
