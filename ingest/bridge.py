"""MQTT → Kafka bridge (`rpowatch bridge`): edge sites publish to MQTT, a scaled-out rpowatch
consumes Kafka.

Each message on `<prefix>/<cluster_id>/<node_id>/<stream>` is produced, byte for byte, to the
stream's Kafka topic with key `cluster_id` (so an instance stays on one partition and one
consumer), by an idempotent producer (`enable_idempotence`, `acks=all`). Payloads are not
decoded here: the consumers validate and dead-letter as usual.

What is guaranteed, and when things are acknowledged:
  - The MQTT subscription is QoS 1 on a persistent session (`clean_session=False`, a fixed client
    id), so the broker keeps messages for the bridge while it is away.
  - paho acknowledges QoS 1 messages on receipt by default, and aiomqtt 2.5.1 has no public way
    to change that (aiomqtt #345). The bridge turns paho's manual acknowledgement on
    (`manual_ack_set(True)` on aiomqtt's paho client) and sends the PUBACK only after Kafka has
    acknowledged the record (all in-sync replicas). A produce that fails is retried with backoff
    until it succeeds; its PUBACK waits.
  - So when the bridge crashes, every message it had not acknowledged yet is still in the
    broker's session and is delivered again when the bridge reconnects with the same client id:
    nothing is lost, and a message whose Kafka write succeeded just before the crash is written
    again (at-least-once; consumers ignore a repeated `event_id`). Acknowledgements from an
    earlier connection are never sent on a new one (MQTT packet ids are per session).
  - Limits: the broker must keep the session — across a broker restart only with
    `persistence true` — and queues at most `max_queued_messages` (Mosquitto: 1000 by default)
    for an offline or slow client, dropping the rest; raise it for edge sites that may be cut
    off. While acknowledgements wait, the broker sends at most `max_inflight_messages` (20 by
    default) unacknowledged messages, which bounds the bridge's memory and its throughput
    (roughly that many per Kafka round trip); raise it for busy sites. Publishers must use QoS 1
    too: a QoS 0 publish is delivered at most once whatever the bridge does.
  - Order: records of one instance keep their MQTT arrival order in Kafka unless a produce is
    retried; the engine orders by event time anyway.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest.contracts import Stream
from ingest.kafka import describe_error, start_producer
from ingest.mqtt import MqttSettings, describe_mqtt_error, new_client, topic_filters

logger = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BridgeSettings:
    mqtt: MqttSettings
    bootstrap_servers: str
    topics: dict[Stream, str]
    security: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    client_id: str = "rpowatch-bridge"  # MQTT session and Kafka producer id
    max_request_size: int | None = None


class Bridge:
    def __init__(self, settings: BridgeSettings) -> None:
        self._settings = settings
        self._streams = {s.value: s for s in Stream}
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0  # MQTT connections so far: acks only go to the one they came from
        self._retries: set[asyncio.Task[None]] = set()
        self.forwarded = 0  # records acknowledged by Kafka
        self.acknowledged = 0  # PUBACKs sent
        self.skipped = 0  # messages on topics that do not name a stream
        self.connections = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge until `stop` is set; then finish the records in flight and acknowledge them."""
        self._producer = await self._start_producer(stop)
        if self._producer is None:
            return
        try:
            await self._bridge(stop)
        finally:
            await self._producer.stop()

    async def _start_producer(self, stop: asyncio.Event) -> AIOKafkaProducer | None:
        s = self._settings
        delay = BACKOFF_INITIAL_S
        while not stop.is_set():
            try:
                return await start_producer(
                    s.bootstrap_servers, s.client_id, s.security, max_request_size=s.max_request_size
                )
            except KafkaError as exc:
                logger.error("bridge: cannot connect to Kafka %s: %s; retrying in %.1f s", s.bootstrap_servers, describe_error(exc), delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        return None

    async def _bridge(self, stop: asyncio.Event) -> None:
        s = self._settings.mqtt
        client = new_client(s, self._settings.client_id)
        # aiomqtt 2.5.1 exposes no manual acknowledgement; paho's is the documented workaround.
        client._client.manual_ack_set(True)
        delay = BACKOFF_INITIAL_S
        while not stop.is_set():
            try:
                async with client:
                    self._generation += 1
                    for topic_filter in topic_filters(s.topic_prefix):
                        await client.subscribe(topic_filter, qos=1)
                    self.connections += 1
                    delay = BACKOFF_INITIAL_S
                    logger.info(
                        "bridge: %s:%d (%s/+/+/<stream>) -> Kafka %s",
                        s.host,
                        s.port,
                        s.topic_prefix,
                        self._settings.bootstrap_servers,
                    )
                    reader = asyncio.create_task(self._read(client, self._generation))
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if reader.done():
                        reader.result()  # an MqttError: reconnect below
                    else:
                        reader.cancel()
                        await asyncio.gather(reader, return_exceptions=True)
                        await self._drain()  # acknowledge what Kafka took, before disconnecting
            except aiomqtt.MqttError as exc:
                logger.warning("bridge: MQTT %s:%d: %s; retrying in %.1f s", s.host, s.port, describe_mqtt_error(exc, s), delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _read(self, client: aiomqtt.Client, generation: int) -> None:
        async for message in client.messages:
            levels = message.topic.value.split("/")
            stream = self._streams.get(levels[-1])
            payload = message.payload
            if stream is None or len(levels) < 4 or not isinstance(payload, bytes | bytearray):
                self.skipped += 1
                self._ack(client, generation, message)
                continue
            await self._forward(client, generation, message, stream, levels[-3], bytes(payload))

    async def _forward(
        self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message, stream: Stream, cluster_id: str, payload: bytes
    ) -> None:
        producer = self._producer
        assert producer is not None  # set by run() before reading starts
        topic = self._settings.topics[stream]
        try:
            future = await producer.send(topic, payload, key=cluster_id.encode())
        except KafkaError:
            self._retry(client, generation, message, topic, cluster_id, payload)
            return

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                self._retry(client, generation, message, topic, cluster_id, payload)
            else:
                self.forwarded += 1
                self._ack(client, generation, message)

        future.add_done_callback(done)

    def _retry(
        self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message, topic: str, cluster_id: str, payload: bytes
    ) -> None:
        task = asyncio.create_task(self._produce_until_done(client, generation, message, topic, cluster_id, payload))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _produce_until_done(
        self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message, topic: str, cluster_id: str, payload: bytes
    ) -> None:
        producer = self._producer
        assert producer is not None
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                await producer.send_and_wait(topic, payload, key=cluster_id.encode())
                break
            except KafkaError as exc:
                logger.warning("bridge: producing to %s failed (%s); retrying in %.1f s", topic, describe_error(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        self.forwarded += 1
        self._ack(client, generation, message)

    def _ack(self, client: aiomqtt.Client, generation: int, message: aiomqtt.Message) -> None:
        if generation != self._generation or message.qos == 0:
            return  # that session's broker will deliver it again; packet ids are per connection
        client._client.ack(message.mid, message.qos)
        self.acknowledged += 1

    async def _drain(self) -> None:
        producer = self._producer
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                if producer is not None:
                    await producer.flush()
                if self._retries:
                    await asyncio.gather(*self._retries, return_exceptions=True)
                await asyncio.sleep(0)  # let the produce callbacks send their acks
        except TimeoutError:
            logger.warning("bridge: %d records not acknowledged by Kafka at shutdown; MQTT will redeliver them", len(self._retries))
            for task in list(self._retries):
                task.cancel()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
