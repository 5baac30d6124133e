"""Sources and sinks built from settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.adapters import AdapterSettings, IdentityRule, IdentitySettings
from ingest.bridge import BridgeSettings
from ingest.contracts import Stream
from ingest.deadletter import FileDeadLetterSink, KafkaDeadLetterSink
from ingest.kafka import KafkaSettings, KafkaSource, client_security, start_producer
from ingest.mqtt import MqttSettings, MqttSource
from ingest.source import DeadLetterSink, Source
from rpowatch.config import IdentityRule as IdentityRuleConfig
from rpowatch.config import KafkaSource as KafkaConfig
from rpowatch.config import MqttSource as MqttConfig
from rpowatch.config import Settings

DEFAULT_DEAD_LETTER_FILE = Path("rpowatch-dead-letters.jsonl")


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def kafka_security(cfg: KafkaConfig) -> tuple[tuple[str, Any], ...]:
    """aiokafka client arguments for TLS / SASL and connection timeouts, shared by consumers and
    producers (secrets stay `SecretStr` until a client is built: ingest.kafka)."""
    return client_security(
        security_protocol=cfg.security_protocol,
        ssl_ca_file=cfg.ssl_ca_file,
        ssl_cert_file=cfg.ssl_cert_file,
        ssl_key_file=cfg.ssl_key_file,
        ssl_key_password=cfg.ssl_key_password,
        sasl_mechanism=cfg.sasl_mechanism,
        sasl_username=cfg.sasl_username,
        sasl_password=cfg.sasl_password,
        request_timeout_ms=_ms(cfg.request_timeout),
        metadata_max_age_ms=_ms(cfg.metadata_max_age),
        connections_max_idle_ms=_ms(cfg.connections_max_idle),
    )


def kafka_settings(kafka: KafkaConfig) -> KafkaSettings:
    """The consumer's settings from the `sources.kafka` section."""
    topics = {
        Stream.REPLICATION: kafka.topics.replication,
        Stream.BACKUP: kafka.topics.backup,
        Stream.HEARTBEAT: kafka.topics.heartbeat,
    }
    return KafkaSettings(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=kafka.group_id,
        topics=topics,
        client_id=kafka.client_id,
        max_batch_records=kafka.max_batch_records,
        poll_timeout_ms=kafka.poll_timeout_ms,
        auto_offset_reset=kafka.auto_offset_reset,
        security=kafka_security(kafka),
        replay_window_ms=int(kafka.replay_window * 1000),
        max_in_flight_batches=kafka.max_in_flight_batches,
        session_timeout_ms=int(kafka.session_timeout * 1000),
        heartbeat_interval_ms=int(kafka.heartbeat_interval * 1000),
        max_poll_interval_ms=int(kafka.max_poll_interval * 1000),
        rebalance_timeout_ms=int(kafka.rebalance_timeout * 1000),
        extra_topics=tuple((t.topic, _stream(t.stream), t.format) for t in kafka.extra_topics),
    )


def build_sources(settings: Settings) -> list[Source]:
    sources: list[Source] = []
    kafka = settings.sources.kafka
    if kafka.enabled:
        sources.append(KafkaSource(kafka_settings(kafka)))
    mqtt = settings.sources.mqtt
    if mqtt.enabled:
        sources.append(MqttSource(mqtt_settings(mqtt)))
    return sources


def mqtt_settings(mqtt: MqttConfig, client_id: str | None = None) -> MqttSettings:
    """The MQTT client's settings from the `sources.mqtt` section."""
    return MqttSettings(
        host=mqtt.host,
        port=mqtt.port,
        username=mqtt.username,
        password=mqtt.password,
        client_id=client_id or mqtt.client_id,
        topic_prefix=mqtt.topic_prefix,
        qos=mqtt.qos,
        max_batch_records=mqtt.max_batch_records,
        batch_window_ms=mqtt.batch_window_ms,
        tls=mqtt.tls or any(f is not None for f in (mqtt.ca_file, mqtt.cert_file, mqtt.key_file)),
        ca_file=mqtt.ca_file,
        cert_file=mqtt.cert_file,
        key_file=mqtt.key_file,
        extra_filters=tuple((f.filter, _stream(f.stream), f.format) for f in mqtt.extra_filters),
    )


def _stream(name: str | None) -> Stream:
    """An extra feed's stream; an adapted feed without one counts unreadable messages as
    replication records (every adapter's default stream)."""
    return Stream(name) if name is not None else Stream.REPLICATION


def adapter_settings(settings: Settings) -> AdapterSettings:
    """The adapters' settings from the `adapters` section (docs/adapters.md)."""
    cfg = settings.adapters

    def rule(r: IdentityRuleConfig) -> IdentityRule:
        return IdentityRule(map=dict(r.map), pattern=r.pattern, default=r.default)

    identity = IdentitySettings(
        vm_source=cfg.identity.vm_source,
        vm=rule(cfg.identity.vm),
        cluster=rule(cfg.identity.cluster),
        target=rule(cfg.identity.target),
    )
    return AdapterSettings(
        identity=identity,
        hyperv_default_frequency_s=cfg.hyperv.default_frequency_s,
        asr_frequency_s=cfg.asr.frequency_s,
        max_message_bytes=cfg.max_message_bytes,
    )


def bridge_settings(settings: Settings, client_id: str | None = None) -> BridgeSettings:
    """`rpowatch bridge`: from `sources.mqtt` into the topics of `sources.kafka` (their
    `enabled` flags are about the service consuming them and do not matter here)."""
    kafka, mqtt = settings.sources.kafka, settings.sources.mqtt
    session = client_id or f"{mqtt.client_id}-bridge"
    return BridgeSettings(
        mqtt=mqtt_settings(mqtt, session),
        bootstrap_servers=kafka.bootstrap_servers,
        topics=kafka_settings(kafka).topics,
        security=kafka_security(kafka),
        client_id=session,
        max_request_size=kafka.max_request_size,
    )


async def build_dead_letter_sink(settings: Settings) -> tuple[DeadLetterSink, AIOKafkaProducer | None]:
    """The Kafka dead-letter topic when Kafka is configured, else a local JSON-lines file.
    Returns the producer too, so the caller can stop it."""
    kafka = settings.sources.kafka
    if kafka.enabled:
        producer = await start_producer(
            kafka.bootstrap_servers, f"{kafka.client_id}-dlq", kafka_security(kafka), max_request_size=kafka.max_request_size
        )
        return KafkaDeadLetterSink(producer, kafka.dead_letter_topic), producer
    return FileDeadLetterSink(DEFAULT_DEAD_LETTER_FILE), None
