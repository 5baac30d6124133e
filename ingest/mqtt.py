"""MQTT source (aiomqtt) for edge sites: topics `<prefix>/<cluster_id>/<node_id>/<stream>`.

Messages are drained from the client into a bounded queue and handed over in micro-batches
(whatever arrived within the batch window, at most `max_batch_records`). The client reconnects
with exponential backoff and re-subscribes on every connection, as aiomqtt's reconnection guide
prescribes (a broker that restarted without persistence has forgotten the subscriptions).

Delivery: QoS 1 with a persistent session (`clean_session=False`, a stable client id), so the
broker queues messages while we are away. paho acknowledges a QoS 1 message as soon as it is
received, before it is applied, so a crash loses what was queued in this process; MQTT has no
offsets to commit. (Acknowledging after the apply is possible — `ingest/bridge.py` does it — but
the broker then sends at most `max_inflight_messages`, 20 by default, before waiting for acks,
which throttles a direct feed to a few hundred messages per batch window.)

Security: TLS (`tls`, a CA file, optionally a client certificate) and username/password.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from pydantic import SecretStr

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
    password: SecretStr | None = field(default=None, repr=False)
    client_id: str = "rpowatch"
    topic_prefix: str = "rpowatch"
    qos: int = 1
    max_batch_records: int = 10_000
    batch_window_ms: int = 100
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # More topic filters, as (filter, stream, format): a format other than "canonical" is read
    # by an adapter (ingest/adapters), and the stream is where records it cannot read count.
    # A message matching one of them goes by it, even if it also matches a stream's filter.
    extra_filters: tuple[tuple[str, Stream, str], ...] = ()


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context for `settings` (None without TLS): verifies the broker's certificate
    against `ca_file` (or the system's CAs) and its host name."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file is not None:
        context.load_cert_chain(
            str(settings.cert_file), str(settings.key_file) if settings.key_file else None
        )
    return context


def new_client(settings: MqttSettings, client_id: str | None = None) -> aiomqtt.Client:
    """An aiomqtt client with a persistent session (call inside the running event loop)."""
    return aiomqtt.Client(
        settings.host,
        port=settings.port,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password is not None else None,
        identifier=client_id or settings.client_id,
        clean_session=False,
        tls_context=tls_context(settings),
    )


def topic_filters(prefix: str) -> list[str]:
    return [f"{prefix}/+/+/{s.value}" for s in Stream]


def describe_mqtt_error(exc: BaseException, settings: MqttSettings | None = None) -> str:
    """One line an operator can act on: a refused CONNECT says why (bad credentials, not
    authorised), a TLS failure names the certificate problem, with the setting to check."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        text = f"TLS: {cause}"
    rc = getattr(exc, "rc", None)
    if rc is not None and str(rc) not in text:
        text = f"{text} ({rc})"
    lowered = text.lower()
    if "not authori" in lowered or "bad user name or password" in lowered:
        return f"{text} (check sources.mqtt.username and password)"
    if "certificate verify failed" in lowered:
        return f"{text} (check sources.mqtt.ca_file)"
    if "timed out" in lowered and settings is not None and not settings.tls:
        return f"{text} (no answer to MQTT: does the broker expect TLS? sources.mqtt.tls)"
    return text


class MqttSource:
    def __init__(self, settings: MqttSettings, name: str = "mqtt") -> None:
        self.name = name
        self._settings = settings
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=QUEUE_LIMIT)
        self._reader: asyncio.Task[None] | None = None
        self._up = False
        self._streams = {s.value: s for s in Stream}
        self.connections = 0  # successful connections so far (tests, logs)

    @property
    def up(self) -> bool:
        return self._up

    def topic_filters(self) -> list[str]:
        extra = [topic_filter for topic_filter, _, _ in self._settings.extra_filters]
        return [*topic_filters(self._settings.topic_prefix), *extra]

    def _route(self, topic: str) -> tuple[Stream, str] | None:
        """(stream, format) of a message: the extra filter it matches, else the stream its last
        topic level names (the subscriptions only match known streams)."""
        for topic_filter, stream, fmt in self._settings.extra_filters:
            if aiomqtt.Topic(topic).matches(topic_filter):
                return stream, fmt
        known = self._streams.get(topic.rsplit("/", 1)[-1])
        return None if known is None else (known, "canonical")

    async def _read_forever(self) -> None:
        s = self._settings
        client = new_client(s)
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                async with client:
                    for topic_filter in self.topic_filters():
                        await client.subscribe(topic_filter, qos=s.qos)
                    self._up = True
                    self.connections += 1
                    delay = BACKOFF_INITIAL_S
                    logger.info("mqtt: connected to %s:%d, subscribed to %s/+/+/<stream>", s.host, s.port, s.topic_prefix)
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = str(payload).encode() if payload is not None else b""
                        # A full queue blocks here: backpressure instead of unbounded memory.
                        await self._queue.put((message.topic.value, bytes(payload)))
            except aiomqtt.MqttError as exc:
                level = logging.WARNING if self._up else logging.ERROR
                self._up = False
                logger.log(
                    level,
                    "mqtt: %s:%d: %s; retrying in %.1f s",
                    s.host,
                    s.port,
                    describe_mqtt_error(exc, s),
                    delay,
                )
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
        grouped: dict[tuple[Stream, str], list[tuple[str, bytes]]] = defaultdict(list)
        for topic, payload in items:
            route = self._route(topic)
            if route is not None:
                grouped[route].append((topic, payload))
        return [
            Batch(
                self.name,
                stream,
                [p for _, p in msgs],
                [t for t, _ in msgs],
                [-1] * len(msgs),
                [-1] * len(msgs),
                received,
                format=fmt,
            )
            for (stream, fmt), msgs in grouped.items()
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
