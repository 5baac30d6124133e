"""The secured-Kafka examples in deploy/kafka/secure are valid rpowatch configurations."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpowatch.loading import check, load_settings

SECURE = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "secure"


def test_sasl_ssl_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = tmp_path / "rpowatch.yaml"
    config.write_text((SECURE / "rpowatch-sasl-ssl.yaml").read_text().replace("/etc/rpowatch/kafka-ca.pem", str(ca)))
    monkeypatch.setenv("RPOWATCH_SOURCES__KAFKA__SASL_PASSWORD", "from-the-environment")
    assert check(config) == []
    kafka = load_settings(config).sources.kafka
    assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.replay_window) == ("SASL_SSL", "SCRAM-SHA-512", 26 * 3600)


def test_sasl_ssl_example_without_a_password_is_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = tmp_path / "rpowatch.yaml"
    config.write_text((SECURE / "rpowatch-sasl-ssl.yaml").read_text().replace("/etc/rpowatch/kafka-ca.pem", str(ca)))
    (problem,) = check(config)
    assert "sasl_password" in str(problem)


def test_event_hubs_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "RPOWATCH_SOURCES__KAFKA__SASL_PASSWORD",
        "Endpoint=sb://fleet-dr.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=abc=",
    )
    assert check(SECURE / "rpowatch-event-hubs.yaml") == []
    kafka = load_settings(SECURE / "rpowatch-event-hubs.yaml").sources.kafka
    assert kafka.bootstrap_servers == "fleet-dr.servicebus.windows.net:9093"
