"""Kafka consumer-group source (aiokafka).

Auto-commit is off: offsets are committed per partition only after the pipeline has applied a
batch and handed its dead letters over (at-least-once; the engine ignores repeated event ids).
Values are never deserialized by aiokafka, so a poison record cannot wedge the consumer (a
raising `value_deserializer` re-raises on the same record forever, aiokafka #744).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from ingest.contracts import Stream
from ingest.source import Batch

logger = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    group_id: str
    topics: dict[Stream, str]
    client_id: str = "rpowatch"
    max_batch_records: int = 10_000
    poll_timeout_ms: int = 200
    auto_offset_reset: str = "earliest"
    security: tuple[tuple[str, Any], ...] = ()  # extra aiokafka client arguments (TLS, SASL)


class KafkaSource:
    name = "kafka"

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._stream_of = {topic: stream for stream, topic in settings.topics.items()}
        self._consumer: AIOKafkaConsumer | None = None
        self._up = False

    @property
    def up(self) -> bool:
        return self._up

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            *s.topics.values(),
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            **dict(s.security),
        )

    async def _connect(self) -> AIOKafkaConsumer:
        """Start a consumer, retrying with exponential backoff while the broker is away."""
        delay = BACKOFF_INITIAL_S
        while True:
            consumer = self._new_consumer()
            try:
                await consumer.start()
                logger.info("kafka: connected to %s as group %s", self._settings.bootstrap_servers, self._settings.group_id)
                return consumer
            except KafkaError as exc:
                self._up = False
                logger.warning("kafka: cannot connect to %s (%s); retrying in %.1f s", self._settings.bootstrap_servers, exc, delay)
                await _stop_quietly(consumer)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def batches(self) -> AsyncIterator[Batch]:
        s = self._settings
        while True:
            if self._consumer is None:
                self._consumer = await self._connect()
            consumer = self._consumer
            try:
                polled = await consumer.getmany(timeout_ms=s.poll_timeout_ms, max_records=s.max_batch_records)
            except KafkaError as exc:
                # aiokafka reconnects by itself for most errors; a fatal one needs a new consumer.
                logger.warning("kafka: fetch failed (%s); reconnecting", exc)
                self._up = False
                self._consumer = None
                await _stop_quietly(consumer)
                await asyncio.sleep(BACKOFF_INITIAL_S)
                continue
            # getmany returns quietly while the broker is down (aiokafka #992): ask the client
            # whether it still has a live connection instead of trusting silence.
            self._up = _connected(consumer)
            for batch in self._to_batches(polled):
                yield batch

    def _to_batches(self, polled: dict[TopicPartition, list[Any]]) -> list[Batch]:
        received = int(time.time() * 1000)
        by_stream: dict[Stream, list[tuple[TopicPartition, list[Any]]]] = defaultdict(list)
        for tp, records in polled.items():
            if records:
                by_stream[self._stream_of[tp.topic]].append((tp, records))
        batches = []
        for stream, parts in by_stream.items():
            payloads: list[bytes] = []
            topics: list[str] = []
            partitions: list[int] = []
            offsets: list[int] = []
            positions: dict[tuple[str, int], int] = {}
            for tp, records in parts:
                payloads.extend(r.value if r.value is not None else b"" for r in records)
                offsets.extend(r.offset for r in records)
                topics.extend([tp.topic] * len(records))
                partitions.extend([tp.partition] * len(records))
                positions[(tp.topic, tp.partition)] = records[-1].offset + 1
            batches.append(Batch(self.name, stream, payloads, topics, partitions, offsets, received, positions))
        return batches

    async def commit(self, batch: Batch) -> None:
        if self._consumer is None or not batch.positions:
            return
        offsets = {TopicPartition(t, p): o for (t, p), o in batch.positions.items()}
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            # The partitions moved to another member during the batch; it will re-read them.
            logger.info("kafka: commit refused after a rebalance (%s); records will be redelivered", exc)
        except KafkaError as exc:
            logger.warning("kafka: commit failed (%s); records since the last commit will be redelivered", exc)

    async def close(self) -> None:
        if self._consumer is not None:
            await _stop_quietly(self._consumer)
            self._consumer = None
        self._up = False


def _connected(consumer: AIOKafkaConsumer) -> bool:
    client = getattr(consumer, "_client", None)
    conns = getattr(client, "_conns", None)
    if not conns:
        return False
    return any(conn.connected() for conn in conns.values())


async def _stop_quietly(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    try:
        await client.stop()
    except Exception:  # stopping a half-started client may raise anything; nothing to do
        logger.debug("kafka: error while stopping a client", exc_info=True)


async def start_producer(bootstrap_servers: str, client_id: str, security: tuple[tuple[str, Any], ...] = ()) -> AIOKafkaProducer:
    """An idempotent producer (acks=all), for dead letters and the simulator."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        **dict(security),
    )
    await producer.start()
    return producer
