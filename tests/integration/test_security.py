"""Secured brokers with certificates generated here: a Kafka broker with a SASL_SSL listener (PLAIN,
SCRAM-SHA-256, SCRAM-SHA-512) and an mTLS listener, and a Mosquitto with TLS and a password
file. rpowatch connects with the right settings and is refused, with an error that says why,
with wrong ones; credentials never reach a log line."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.hazmat.primitives.serialization.pkcs12 import PBES
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from ingest.kafka import KafkaSource, start_producer
from ingest.mqtt import MqttSource
from ingest.source import Batch
from rpowatch.config import Settings
from rpowatch.wiring import kafka_security, kafka_settings, mqtt_settings
from tests.harness import KafkaBroker, Mosquitto
from tests.harness.kafka import KafkaSecurity
from tests.harness.mosquitto import MosquittoTls
from tests.harness.timing import record_timing

pytestmark = pytest.mark.integration

KAFKA_USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
MQTT_USERS = {"edge": "edge-Secret-3"}
KEY_PASSWORD = "keystore-pw"


# -- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the brokers' certificates are signed by
    other_ca: Path  # a CA nobody uses: verifying against it must fail
    server_cert: Path
    server_key: Path  # unencrypted PKCS#8 (Mosquitto)
    kafka_keystore: Path  # key + certificate chain, PKCS#12 (Kafka)
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pkcs12(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, ca: x509.Certificate, password: str) -> bytes:
    # PBES1 (SHA1 + 3DES) and a SHA1 MAC: what every Java 17 reads.
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50_000)
        .key_cert_algorithm(PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(password.encode())
    )
    return pkcs12.serialize_key_and_certificates(b"broker", key, cert, [ca], encryption)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("rpowatch test CA")
    _, other = _ca("some other CA")
    server_key, server_cert = _issue(ca_key, ca_cert, "localhost", server=True)
    client_key, client_cert = _issue(ca_key, ca_cert, "rpowatch", server=False)
    files = {
        "ca.pem": _pem(ca_cert), "other-ca.pem": _pem(other), "server.pem": _pem(server_cert),
        "server.key": _key(server_key), "keystore.p12": _pkcs12(server_key, server_cert, ca_cert, KEY_PASSWORD),
        "client.pem": _pem(client_cert), "client.key": _key(client_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    d = directory
    return Pki(d / "ca.pem", d / "other-ca.pem", d / "server.pem", d / "server.key", d / "keystore.p12",
               d / "client.pem", d / "client.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_kafka(pki: Pki) -> Iterator[KafkaBroker]:
    t0 = time.monotonic()
    security = KafkaSecurity(keystore=pki.kafka_keystore, key_password=KEY_PASSWORD, truststore=pki.ca, users=KAFKA_USERS)
    with KafkaBroker(security=security) as broker:
        record_timing("kafka (SASL_SSL)", "start", time.monotonic() - t0)
        broker.create_topic("secure.replication", partitions=1)
        yield broker


@pytest.fixture(scope="module")
def secure_mosquitto(pki: Pki) -> Iterator[Mosquitto]:
    t0 = time.monotonic()
    with Mosquitto(tls=MosquittoTls(certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca), users=MQTT_USERS) as m:
        record_timing("mosquitto (TLS)", "start", time.monotonic() - t0)
        yield m


# -- Kafka -----------------------------------------------------------------------------------------


def kafka_config(broker: KafkaBroker, pki: Pki, group: str, **kafka: Any) -> Settings:
    return Settings(**{"sources": {"kafka": {
        "enabled": True, "group_id": group, "client_id": group, "poll_timeout_ms": 100,
        "topics": {"replication": "secure.replication", "backup": "secure.backup", "heartbeat": "secure.heartbeat"},
        "ssl_ca_file": str(pki.ca), **kafka,
    }}})


async def first_batch(source: KafkaSource | MqttSource, timeout: float = 30) -> Batch:
    iterator = aiter(source.batches())
    try:
        async with asyncio.timeout(timeout):
            return await anext(iterator)
    finally:
        await source.close()


@pytest.mark.parametrize("mechanism, user", [("PLAIN", "alice"), ("SCRAM-SHA-256", "bob"), ("SCRAM-SHA-512", "alice")])
async def test_kafka_sasl_ssl_connects_and_consumes(secure_kafka: KafkaBroker, pki: Pki, unique_name: str,
                                                    mechanism: str, user: str) -> None:
    settings = kafka_config(secure_kafka, pki, unique_name, bootstrap_servers=secure_kafka.sasl_ssl_bootstrap,
                            security_protocol="SASL_SSL", sasl_mechanism=mechanism, sasl_username=user,
                            sasl_password=KAFKA_USERS[user])
    kafka = settings.sources.kafka
    payload = f'{{"via": "{mechanism}", "id": "{unique_name}"}}'.encode()
    producer = await start_producer(kafka.bootstrap_servers, "secure-producer", kafka_security(kafka))
    try:
        await producer.send_and_wait("secure.replication", payload, key=b"hci-s")
    finally:
        await producer.stop()
    source = KafkaSource(kafka_settings(kafka))
    batch = await first_batch(source)
    assert payload in batch.payloads


async def test_kafka_mutual_tls_connects_with_a_client_certificate(secure_kafka: KafkaBroker, pki: Pki, unique_name: str) -> None:
    settings = kafka_config(secure_kafka, pki, unique_name, bootstrap_servers=secure_kafka.ssl_bootstrap,
                            security_protocol="SSL", ssl_cert_file=str(pki.client_cert), ssl_key_file=str(pki.client_key))
    kafka = settings.sources.kafka
    payload = f'{{"via": "mTLS", "id": "{unique_name}"}}'.encode()
    producer = await start_producer(kafka.bootstrap_servers, "secure-producer", kafka_security(kafka))
    try:
        await producer.send_and_wait("secure.replication", payload, key=b"hci-s")
    finally:
        await producer.stop()
    batch = await first_batch(KafkaSource(kafka_settings(kafka)))
    assert payload in batch.payloads


WRONG_KAFKA = {
    "wrong PLAIN password": (
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "alice", "sasl_password": "nope-1"},
        "sasl", "authentication"),
    "wrong SCRAM password": (
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "bob", "sasl_password": "nope-2"},
        "sasl", "authentication"),
    "unknown SCRAM user": (
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "mallory", "sasl_password": "nope-3"},
        "sasl", "authentication"),
    "broker certificate from another CA": (
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "alice",
         "sasl_password": KAFKA_USERS["alice"], "ssl_ca_file": "OTHER_CA"},
        "sasl", "certificate verify failed"),
    "plaintext to a TLS listener": ({"security_protocol": "PLAINTEXT"}, "sasl", "expect tls"),
    "mTLS without a client certificate": ({"security_protocol": "SSL"}, "ssl", "client certificate"),
}


@pytest.mark.parametrize("case", list(WRONG_KAFKA))
async def test_kafka_wrong_settings_are_refused_with_a_clear_error(
    secure_kafka: KafkaBroker, pki: Pki, unique_name: str, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    override, listener, expected = WRONG_KAFKA[case]
    if override.get("ssl_ca_file") == "OTHER_CA":
        override = {**override, "ssl_ca_file": str(pki.other_ca)}
    bootstrap = secure_kafka.sasl_ssl_bootstrap if listener == "sasl" else secure_kafka.ssl_bootstrap
    settings = kafka_config(secure_kafka, pki, unique_name, bootstrap_servers=bootstrap, **override)
    source = KafkaSource(kafka_settings(settings.sources.kafka))
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(anext(aiter(source.batches())))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            r.name == "ingest.kafka" and r.levelno >= logging.ERROR for r in caplog.records
        ):
            await asyncio.sleep(0.2)
        assert not task.done(), "a refused connection must not end the source"
        assert not source.up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
    errors = [r.getMessage() for r in caplog.records if r.name == "ingest.kafka" and r.levelno >= logging.ERROR]
    assert errors, "no error logged"
    assert expected in errors[0].lower(), errors[0]
    assert bootstrap in errors[0]
    for password in (*KAFKA_USERS.values(), "nope-1", "nope-2", "nope-3"):
        assert password not in caplog.text


def test_credentials_never_appear_in_settings_reprs(pki: Pki) -> None:
    settings = Settings(**{"sources": {
        "kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "alice",
                  "sasl_password": "top-Secret-9", "ssl_key_password": "key-Secret-8"},
        "mqtt": {"username": "edge", "password": "mqtt-Secret-7"},
    }})
    texts = [repr(settings), str(settings), repr(kafka_settings(settings.sources.kafka)),
             repr(mqtt_settings(settings.sources.mqtt)), str(kafka_security(settings.sources.kafka))]
    for text in texts:
        for secret in ("top-Secret-9", "key-Secret-8", "mqtt-Secret-7"):
            assert secret not in text
    assert isinstance(dict(kafka_security(settings.sources.kafka))["sasl_plain_password"], SecretStr)


# -- MQTT ------------------------------------------------------------------------------------------


def mqtt_config(m: Mosquitto, pki: Pki, client_id: str, **mqtt: Any) -> Settings:
    return Settings(**{"sources": {"mqtt": {
        "enabled": True, "host": m.host, "port": m.port, "client_id": client_id, "topic_prefix": client_id,
        "batch_window_ms": 50, **mqtt}}})


@pytest.fixture
async def publisher(secure_mosquitto: Mosquitto, pki: Pki) -> AsyncIterator[aiomqtt.Client]:
    import ssl

    context = ssl.create_default_context(cafile=str(pki.ca))
    async with aiomqtt.Client(secure_mosquitto.host, secure_mosquitto.port, username="edge",
                              password=MQTT_USERS["edge"], tls_context=context) as client:
        yield client


async def test_mqtt_tls_and_password_connect_and_consume(secure_mosquitto: Mosquitto, pki: Pki, unique_name: str,
                                                          publisher: aiomqtt.Client) -> None:
    settings = mqtt_config(secure_mosquitto, pki, unique_name, username="edge", password=MQTT_USERS["edge"],
                           tls=True, ca_file=str(pki.ca))
    source = MqttSource(mqtt_settings(settings.sources.mqtt))
    first = asyncio.create_task(anext(aiter(source.batches())))
    try:
        async with asyncio.timeout(20):
            while not source.up:
                await asyncio.sleep(0.05)
            await publisher.publish(f"{unique_name}/hci-e/n1/heartbeat", b'{"tls": true}', qos=1)
            batch = await first
    finally:
        first.cancel()
        await source.close()
    assert batch.payloads == [b'{"tls": true}']


WRONG_MQTT = {
    "wrong password": ({"username": "edge", "password": "nope-4", "tls": True}, "check sources.mqtt.username"),
    "no credentials": ({"tls": True}, "not authori"),
    "broker certificate from another CA": (
        {"username": "edge", "password": MQTT_USERS["edge"], "ca_file": "OTHER_CA"}, "check sources.mqtt.ca_file"),
    "plaintext to a TLS listener": ({"username": "edge", "password": MQTT_USERS["edge"]}, "expect tls"),
}


@pytest.mark.parametrize("case", list(WRONG_MQTT))
async def test_mqtt_wrong_settings_are_refused_with_a_clear_error(
    secure_mosquitto: Mosquitto, pki: Pki, unique_name: str, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    override, expected = WRONG_MQTT[case]
    if override.get("ca_file") == "OTHER_CA":
        override = {**override, "ca_file": str(pki.other_ca)}
    if override.get("tls"):
        override = {"ca_file": str(pki.ca), **override}
    settings = mqtt_config(secure_mosquitto, pki, unique_name, **override)
    source = MqttSource(mqtt_settings(settings.sources.mqtt))
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(anext(aiter(source.batches())))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            r.name == "ingest.mqtt" and r.levelno >= logging.ERROR for r in caplog.records
        ):
            await asyncio.sleep(0.1)
        assert not task.done() and not source.up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
    errors = [r.getMessage() for r in caplog.records if r.name == "ingest.mqtt" and r.levelno >= logging.ERROR]
    assert errors, "no error logged"
    assert expected in errors[0].lower(), errors[0]
    assert f"{secure_mosquitto.host}:{secure_mosquitto.port}" in errors[0]
    for password in (*MQTT_USERS.values(), "nope-4"):
        assert password not in caplog.text
