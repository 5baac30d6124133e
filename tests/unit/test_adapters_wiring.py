"""Adapted feeds from configuration to sources to the service (no broker needed)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from pydantic import ValidationError

from ingest.adapters import IdentityRule
from ingest.contracts import Stream
from ingest.deadletter import MemoryDeadLetterSink
from ingest.kafka import KafkaSource
from ingest.mqtt import MqttSource
from ingest.source import Batch
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.wiring import adapter_settings, kafka_settings, mqtt_settings
from tests.fixtures.adapters.payloads import asr_stats, backup_job, event_hub, hyperv_record, ms, ps51


def settings(**extra: Any) -> Settings:
    return Settings(**{
        "sources": {
            "kafka": {"extra_topics": [
                {"topic": "eh.recoveryservices", "format": "azure_diagnostics"},
                {"topic": "more.heartbeats", "stream": "heartbeat"},
            ]},
            "mqtt": {"extra_filters": [{"filter": "azlocal/+/+/hyperv-replica", "format": "hyperv_replica_json"}]},
        },
        **extra,
    })


def test_extra_feeds_reach_the_sources_settings() -> None:
    s = settings()
    assert kafka_settings(s.sources.kafka).extra_topics == (
        ("eh.recoveryservices", Stream.REPLICATION, "azure_diagnostics"),
        ("more.heartbeats", Stream.HEARTBEAT, "canonical"),
    )
    assert mqtt_settings(s.sources.mqtt).extra_filters == (
        ("azlocal/+/+/hyperv-replica", Stream.REPLICATION, "hyperv_replica_json"),
    )


def test_bad_feeds_and_identity_rules_are_configuration_errors() -> None:
    with pytest.raises(ValidationError, match="a canonical feed needs its stream"):
        Settings(**{"sources": {"kafka": {"extra_topics": [{"topic": "t"}]}}})
    with pytest.raises(ValidationError, match="format"):
        Settings(**{"sources": {"kafka": {"extra_topics": [{"topic": "t", "format": "csv"}]}}})
    with pytest.raises(ValidationError, match=r"named group \(\?P<id>"):
        Settings(**{"adapters": {"identity": {"cluster": {"pattern": "^([^.]+)"}}}})
    with pytest.raises(ValidationError, match="polars cannot use this pattern"):
        Settings(**{"adapters": {"identity": {"vm": {"pattern": r"(?P<id>\w+)(?=\.)"}}}})
    with pytest.raises(ValidationError, match="default_frequency_s"):
        Settings(**{"adapters": {"hyperv": {"default_frequency_s": 60}}})


def test_identity_configuration_keeps_the_default_pattern_unless_replaced() -> None:
    s = settings(adapters={"identity": {"vm_source": "id", "cluster": {"map": {"broker.contoso.com": "hci-1"}},
                                        "target": {"pattern": None, "default": "hci-dr"}}})
    a = adapter_settings(s)
    assert a.identity.vm_source == "id"
    assert a.identity.cluster == IdentityRule(map={"broker.contoso.com": "hci-1"}, pattern=r"^(?P<id>[^.]+)")
    assert a.identity.target == IdentityRule(pattern=None, default="hci-dr")
    assert a.identity.vm.pattern is not None  # the DPM data-source prefix rule
    assert (a.hyperv_default_frequency_s, a.asr_frequency_s) == (300, 900)


def test_mqtt_routes_extra_filters_before_stream_names() -> None:
    source = MqttSource(mqtt_settings(settings().sources.mqtt))
    assert "azlocal/+/+/hyperv-replica" in source.topic_filters()
    batches = source._to_batches([
        ("azlocal/hci-1/n1/hyperv-replica", b"[]"),
        ("rpowatch/hci-1/n1/heartbeat", b"{}"),
        ("azlocal/hci-1/n2/hyperv-replica", b"{}"),
    ])
    got = {(b.stream, b.format): b.topics for b in batches}
    assert got == {
        (Stream.REPLICATION, "hyperv_replica_json"): ["azlocal/hci-1/n1/hyperv-replica", "azlocal/hci-1/n2/hyperv-replica"],
        (Stream.HEARTBEAT, "canonical"): ["rpowatch/hci-1/n1/heartbeat"],
    }


def test_kafka_batches_carry_their_topic_format() -> None:
    source = KafkaSource(kafka_settings(settings().sources.kafka))

    def records(*offsets: int) -> list[Any]:
        return [SimpleNamespace(value=b"{}", offset=o) for o in offsets]

    batches = source._to_batches({
        TopicPartition("eh.recoveryservices", 0): records(5, 6),
        TopicPartition("rpowatch.replication", 0): records(1),
        TopicPartition("more.heartbeats", 1): records(9),
    })
    got = {(b.stream, b.format): (b.topics, b.positions) for b in batches}
    assert got == {
        (Stream.REPLICATION, "azure_diagnostics"): (["eh.recoveryservices"] * 2, {("eh.recoveryservices", 0): 7}),
        (Stream.REPLICATION, "canonical"): (["rpowatch.replication"], {("rpowatch.replication", 0): 2}),
        (Stream.HEARTBEAT, "canonical"): (["more.heartbeats"], {("more.heartbeats", 1): 10}),
    }


async def test_the_service_applies_counts_and_dead_letters_adapted_batches() -> None:
    s = settings(policies=[{"name": "fast", "match": {"vm": "hv-*"}, "replication_rpo_seconds": 60}])
    sink = MemoryDeadLetterSink()
    service = Service(s, load_rule_packs(s), [], sink)
    now = datetime.now(timezone.utc)
    try:
        hyperv = ps51([
            hyperv_record("hv-fresh", now - timedelta(seconds=10)),
            hyperv_record("hv-stale", now - timedelta(minutes=10)),
            hyperv_record("hv-odd", now, health=7),
        ])
        await service.handle(Batch("mqtt", Stream.REPLICATION, [hyperv], ["azlocal/hci-1/n1/hyperv-replica"], [-1], [-1],
                                   ms(now), format="hyperv_replica_json"))
        azure = event_hub([
            asr_stats("erp-01", now - timedelta(minutes=1), 30),
            backup_job("vm-b", "job-1", now - timedelta(minutes=20), "Failed", duration_s=60),
            backup_job("vm-b", "job-2", now - timedelta(minutes=20), "Exploded", duration_s=60),
        ])
        await service.handle(Batch("kafka", Stream.REPLICATION, [azure], ["eh.recoveryservices"], [0], [41], ms(now),
                                   format="azure_diagnostics"))
        result = service.engine.tick(int(time.time() * 1000))
    finally:
        service._executor.shutdown(wait=True)
    replication = {r["vm"]: r for r in result.views.vm_replication.to_dicts()}
    assert set(replication) == {"hv-fresh", "hv-stale", "erp-01"}
    assert replication["hv-stale"]["lag_seconds"] > replication["hv-stale"]["rpo_target_seconds"] == 60
    breaches = result.with_details(result.alerts.filter(result.alerts["alertname"] == "ReplicationRPOBreach"))
    assert [json.loads(labels)["vm"] for labels in breaches.get_column("labels")] == ["hv-stale"]
    backup = {r["vm"]: r for r in result.views.vm_backup.to_dicts()}
    assert backup["vm-b"]["consecutive_failures"] == 1
    stats = service.counters.freeze()
    assert stats.events_total == {("replication", "mqtt"): 2, ("replication", "kafka"): 1, ("backup", "kafka"): 1}
    assert stats.events_invalid_total == {("replication", "unknown_enum"): 1, ("backup", "unknown_enum"): 1}
    letters = {(d.headers["rpowatch.stream"], d.headers["rpowatch.origin.topic"], d.headers["rpowatch.origin.offset"])
               for d in sink.letters}
    assert letters == {("replication", "azlocal/hci-1/n1/hyperv-replica", "-1"), ("backup", "eh.recoveryservices", "41")}
