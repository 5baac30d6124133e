"""Sources and sinks built from settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest.contracts import Stream
from ingest.deadletter import FileDeadLetterSink, KafkaDeadLetterSink
from ingest.kafka import KafkaSettings, KafkaSource, start_producer
from ingest.mqtt import MqttSettings, MqttSource
from ingest.source import DeadLetterSink, Source
from rpowatch.config import KafkaSource as KafkaConfig
from rpowatch.config import Settings

DEFAULT_DEAD_LETTER_FILE = Path("rpowatch-dead-letters.jsonl")


def kafka_security(cfg: KafkaConfig) -> tuple[tuple[str, Any], ...]:
    """aiokafka client arguments for TLS / SASL (the password is unwrapped only here)."""
    out: list[tuple[str, Any]] = [("security_protocol", cfg.security_protocol)]
    if cfg.sasl_mechanism:
        out.append(("sasl_mechanism", cfg.sasl_mechanism))
        out.append(("sasl_plain_username", cfg.sasl_username))
        if cfg.sasl_password is not None:
            out.append(("sasl_plain_password", cfg.sasl_password.get_secret_value()))
    return tuple(out)


def build_sources(settings: Settings) -> list[Source]:
    sources: list[Source] = []
    kafka = settings.sources.kafka
    if kafka.enabled:
        topics = {
            Stream.REPLICATION: kafka.topics.replication,
            Stream.BACKUP: kafka.topics.backup,
            Stream.HEARTBEAT: kafka.topics.heartbeat,
        }
        sources.append(
            KafkaSource(
                KafkaSettings(
                    bootstrap_servers=kafka.bootstrap_servers,
                    group_id=kafka.group_id,
                    topics=topics,
                    client_id=kafka.client_id,
                    max_batch_records=kafka.max_batch_records,
                    poll_timeout_ms=kafka.poll_timeout_ms,
                    auto_offset_reset=kafka.auto_offset_reset,
                    security=kafka_security(kafka),
                )
            )
        )
    mqtt = settings.sources.mqtt
    if mqtt.enabled:
        sources.append(
            MqttSource(
                MqttSettings(
                    host=mqtt.host,
                    port=mqtt.port,
                    username=mqtt.username,
                    password=mqtt.password.get_secret_value() if mqtt.password else None,
                    client_id=mqtt.client_id,
                    topic_prefix=mqtt.topic_prefix,
                    qos=mqtt.qos,
                    max_batch_records=mqtt.max_batch_records,
                    batch_window_ms=mqtt.batch_window_ms,
                )
            )
        )
    return sources


async def build_dead_letter_sink(settings: Settings) -> tuple[DeadLetterSink, AIOKafkaProducer | None]:
    """The Kafka dead-letter topic when Kafka is configured, else a local JSON-lines file.
    Returns the producer too, so the caller can stop it."""
    kafka = settings.sources.kafka
    if kafka.enabled:
        producer = await start_producer(kafka.bootstrap_servers, f"{kafka.client_id}-dlq", kafka_security(kafka))
        return KafkaDeadLetterSink(producer, kafka.dead_letter_topic), producer
    return FileDeadLetterSink(DEFAULT_DEAD_LETTER_FILE), None
