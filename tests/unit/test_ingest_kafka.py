"""Kafka source settings: the Event Hubs preset, TLS/SASL client arguments, secrets kept secret,
and a refused commit that does not stop the source."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError
from pydantic import SecretStr

from ingest.contracts import Stream
from ingest.kafka import KafkaSettings, KafkaSource, _client_kwargs, describe_error
from ingest.source import Batch, PartitionedSource
from rpowatch.config import Settings
from rpowatch.loading import check
from rpowatch.wiring import bridge_settings, kafka_security, kafka_settings

CONNECTION_STRING = "Endpoint=sb://contoso-dr.servicebus.windows.net/;SharedAccessKeyName=rpowatch;SharedAccessKey=s3cr3t+key="


def test_event_hubs_preset_sets_sasl_ssl_plain_and_microsofts_timeouts() -> None:
    kafka = Settings(**{"sources": {"kafka": {"preset": "azure_event_hubs", "sasl_password": CONNECTION_STRING}}}).sources.kafka
    assert kafka.bootstrap_servers == "contoso-dr.servicebus.windows.net:9093"
    assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_username) == ("SASL_SSL", "PLAIN", "$ConnectionString")
    assert kafka.request_timeout == 60 and kafka.session_timeout == 30
    assert kafka.metadata_max_age == 180 and kafka.connections_max_idle == 180
    assert kafka.max_request_size is not None and kafka.max_request_size < 1_046_528

    args = _client_kwargs(kafka_security(kafka))
    assert args["security_protocol"] == "SASL_SSL" and args["sasl_mechanism"] == "PLAIN"
    assert args["sasl_plain_username"] == "$ConnectionString" and args["sasl_plain_password"] == CONNECTION_STRING
    assert args["ssl_context"].check_hostname  # verified against the system's CAs
    assert (args["request_timeout_ms"], args["metadata_max_age_ms"], args["connections_max_idle_ms"]) == (60_000, 180_000, 180_000)
    consumer = kafka_settings(kafka)
    assert consumer.session_timeout_ms == 30_000


def test_event_hubs_preset_keeps_an_explicit_bootstrap_and_timeouts() -> None:
    kafka = Settings(**{"sources": {"kafka": {
        "preset": "azure_event_hubs", "sasl_password": CONNECTION_STRING, "bootstrap_servers": "ns2.servicebus.windows.net:9093",
        "session_timeout": "45s"}}}).sources.kafka
    assert kafka.bootstrap_servers == "ns2.servicebus.windows.net:9093"
    assert kafka.session_timeout == 45


def test_event_hubs_preset_takes_the_connection_string_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rpowatch.loading import load_settings

    path = tmp_path / "rpowatch.yaml"
    path.write_text("sources:\n  kafka:\n    enabled: true\n    preset: azure_event_hubs\n")
    monkeypatch.setenv("RPOWATCH_SOURCES__KAFKA__SASL_PASSWORD", CONNECTION_STRING)
    kafka = load_settings(path).sources.kafka
    assert kafka.sasl_password is not None and kafka.sasl_password.get_secret_value() == CONNECTION_STRING
    assert kafka.bootstrap_servers == "contoso-dr.servicebus.windows.net:9093"


@pytest.mark.parametrize("body, reason", [
    ("    preset: azure_event_hubs\n", "connection string"),
    ("    preset: azure_event_hubs\n    sasl_password: x\n    security_protocol: SASL_PLAINTEXT\n", "security_protocol must be 'SASL_SSL'"),
    ("    security_protocol: SASL_SSL\n", "needs sasl_username and sasl_password"),
    ("    ssl_ca_file: /nonexistent/ca.pem\n", "ssl_ca_file"),
    ("    security_protocol: SSL\n    ssl_cert_file: FILE\n", "go together"),
    ("    replay_window: -1h\n", "replay_window"),
])
def test_bad_security_settings_are_one_clear_line(tmp_path: Path, body: str, reason: str) -> None:
    existing = tmp_path / "cert.pem"
    existing.write_text("x")
    path = tmp_path / "rpowatch.yaml"
    path.write_text("sources:\n  kafka:\n" + body.replace("FILE", str(existing)))
    problems = [str(p) for p in check(path)]
    assert len(problems) == 1, problems
    assert reason in problems[0] and problems[0].startswith(f"{path}:")


def test_secrets_stay_wrapped_until_a_client_is_built() -> None:
    kafka = Settings(**{"sources": {"kafka": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                              "sasl_username": "u", "sasl_password": "p4ss-Word"}}}).sources.kafka
    security = kafka_security(kafka)
    assert isinstance(dict(security)["sasl_plain_password"], SecretStr)
    assert "p4ss-Word" not in repr(kafka_settings(kafka)) and "p4ss-Word" not in str(security)
    assert _client_kwargs(security)["sasl_plain_password"] == "p4ss-Word"
    assert "ssl_context" not in dict(security)  # no TLS on SASL_PLAINTEXT


def test_bridge_settings_come_from_both_sections() -> None:
    settings = Settings(**{"sources": {
        "mqtt": {"host": "edge", "port": 8883, "client_id": "site-7", "tls": True},
        "kafka": {"bootstrap_servers": "k:9092", "topics": {"replication": "r", "backup": "b", "heartbeat": "h"}},
    }})
    bridge = bridge_settings(settings)
    assert bridge.client_id == "site-7-bridge" and bridge.mqtt.client_id == "site-7-bridge"
    assert bridge.mqtt.tls and bridge.mqtt.port == 8883
    assert bridge.topics == {Stream.REPLICATION: "r", Stream.BACKUP: "b", Stream.HEARTBEAT: "h"}
    assert bridge_settings(settings, "other").client_id == "other"


class RefusingConsumer:
    """Stands in for a consumer whose group moved on: every commit is refused."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", 0), TopicPartition("t", 1)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)
        raise self.error


@pytest.mark.parametrize("error", [CommitFailedError("rebalanced"), KafkaConnectionError("gone")])
async def test_a_refused_commit_is_logged_not_raised(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    source = KafkaSource(KafkaSettings("x:9092", "g", {Stream.REPLICATION: "t"}))
    consumer = RefusingConsumer(error)
    source._consumer = consumer  # type: ignore[assignment]
    caplog.set_level(logging.INFO)
    batch = Batch("kafka", Stream.REPLICATION, [b"{}"], ["t"], [0], [41], 0, {("t", 0): 42, ("t", 5): 7})
    await source.commit(batch)
    assert consumer.commits == [{TopicPartition("t", 0): 42}]  # not the unassigned partition
    assert "redelivered" in caplog.text


def test_the_kafka_source_is_a_partitioned_source() -> None:
    source: Any = KafkaSource(KafkaSettings("x:9092", "g", {Stream.REPLICATION: "t"}))
    assert isinstance(source, PartitionedSource)
    assert not source.rebuilding and not source.up


def test_errors_are_described_with_their_cause() -> None:
    try:
        try:
            raise ConnectionResetError("peer reset")
        except OSError as inner:
            raise KafkaConnectionError("closed") from inner
    except KafkaConnectionError as exc:
        assert describe_error(exc) == "KafkaConnectionError: KafkaConnectionError: closed <- ConnectionResetError: peer reset"
