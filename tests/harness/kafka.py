"""Single-node Apache Kafka 4.1 (KRaft, combined broker+controller).

Runs the jars that ``scripts/install-test-deps`` resolves into
``deploy/kafka/lib`` with Maven; no Kafka distribution or Docker needed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .ports import LOOPBACK, free_ports
from .process import INSTALL_HINT, HarnessError, Service, find_binary

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_DIR = REPO_ROOT / "deploy" / "kafka"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"
JVM_OPTS = ["-Xms256m", "-Xmx768m", "-XX:+UseG1GC"]


def kafka_lib_dir() -> Path:
    """deploy/kafka/lib, or a HarnessError saying how to populate it."""
    lib = KAFKA_DIR / "lib"
    if not any(lib.glob("kafka_2.13-*.jar")):
        raise HarnessError(f"Kafka jars not found in {lib}; {INSTALL_HINT}")
    return lib


def random_cluster_id() -> str:
    """A Kafka Uuid as text: base64url of 16 random bytes, no padding (22 chars).

    Same as ``kafka.tools.StorageTool random-uuid`` without a JVM start.
    Kafka's own generator also rejects ids starting with '-' (they look like
    CLI flags to StorageTool's argument parser), so do the same.
    """
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def run_coroutine_blocking(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even if the calling thread
    already runs an event loop (asyncio.run() would refuse there): the
    coroutine gets a fresh loop in a helper thread."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        async def main() -> T:
            return await factory()

        try:
            result.append(asyncio.run(main()))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error.append(exc)

    thread = threading.Thread(target=target, name="harness-kafka-admin")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@dataclass(frozen=True)
class KafkaSecurity:
    """Secured listeners for a test broker, next to its PLAINTEXT one.

    ``SASL_SSL`` accepts SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for every
    user in ``users`` (SCRAM credentials are created when the storage is
    formatted); ``SSL`` requires a client certificate signed by a CA in
    ``truststore`` (PEM). Both present ``keystore``: the broker's certificate
    chain and private key, a PKCS#12 file protected by ``key_password`` (or, with
    ``keystore_type="PEM"``, one PEM file with the key encrypted by it: Kafka's
    file-based PEM keystores need an encrypted PKCS#8 key, and Java 17 cannot
    read PBES2-encrypted ones).
    """

    keystore: Path
    key_password: str
    truststore: Path
    users: Mapping[str, str] = field(default_factory=dict)
    keystore_type: str = "PKCS12"


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class KafkaBroker(Service):
    """Kafka in KRaft combined mode on two free loopback ports.

    Ports and the data dir are fixed at construction, so ``stop()`` followed by
    ``start()`` brings back the same broker with its topics, records and
    committed offsets. ``close()`` stops it and deletes everything.

    With ``security``, two more listeners: ``sasl_ssl_bootstrap`` and
    ``ssl_bootstrap`` (see :class:`KafkaSecurity`).
    """

    name = "kafka"
    ready_timeout = 60.0
    ready_poll_interval = 0.3

    def __init__(
        self,
        ready_timeout: float | None = None,
        num_partitions: int = 3,
        security: KafkaSecurity | None = None,
    ) -> None:
        self._java = find_binary("java")
        self._lib = kafka_lib_dir()
        super().__init__(ready_timeout)
        self.port, self.controller_port, self.sasl_ssl_port, self.ssl_port = free_ports(4)
        self.security = security
        self.num_partitions = num_partitions
        self.cluster_id = random_cluster_id()
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "server.properties"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.sasl_ssl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.ssl_port}"

    def _java_argv(self, main_class: str, *args: str) -> list[str]:
        return [
            self._java,
            *JVM_OPTS,
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            f"{self._lib}/*",  # expanded by the JVM, not a shell
            main_class,
            *args,
        ]

    def prepare(self) -> None:
        props = {
            "node.id": "1",
            "process.roles": "broker,controller",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            # Static quorum: with this set, "storage format" needs neither
            # --standalone nor --initial-controllers (those are for the
            # dynamic controller.quorum.bootstrap.servers setup).
            "controller.quorum.voters": f"1@{LOOPBACK}:{self.controller_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        if self.security is not None:
            props.update(self._security_props(self.security))
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        if not (self.data_dir / "meta.properties").exists():
            self._format_storage()

    def _security_props(self, sec: KafkaSecurity) -> dict[str, str]:
        plain_users = " ".join(f"user_{name}={_jaas_quote(pw)}" for name, pw in sec.users.items())
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule required"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "listeners": (
                f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port},"
                f"SASL_SSL://{LOOPBACK}:{self.sasl_ssl_port},SSL://{LOOPBACK}:{self.ssl_port}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://{LOOPBACK}:{self.port},SASL_SSL://{LOOPBACK}:{self.sasl_ssl_port},"
                f"SSL://{LOOPBACK}:{self.ssl_port}"
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL"
            ),
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_ssl.plain.sasl.jaas.config": f"{plain} {plain_users};",
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
            "ssl.keystore.type": sec.keystore_type,
            "ssl.keystore.location": str(sec.keystore),
            **({"ssl.keystore.password": sec.key_password} if sec.keystore_type != "PEM" else {}),
            "ssl.key.password": sec.key_password,
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(sec.truststore),
            "listener.name.ssl.ssl.client.auth": "required",
        }

    def _format_storage(self) -> None:
        scram: list[str] = []
        if self.security is not None:
            for name, pw in self.security.users.items():
                for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                    scram += ["--add-scram", f"{mechanism}=[name={name},password={pw}]"]
        argv = self._java_argv(
            "kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(self.config_path), *scram
        )
        proc = subprocess.run(argv, cwd=self.workdir, capture_output=True, text=True, timeout=60)
        with open(self.log_path, "a") as log:
            log.write(f"=== harness: {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise HarnessError(
                f"kafka storage format failed (exit {proc.returncode})\n{proc.stdout}{proc.stderr}"
            )

    def command(self) -> list[str]:
        return self._java_argv("kafka.Kafka", str(self.config_path))

    def is_ready(self) -> bool:
        # A metadata round trip through the PLAINTEXT listener: proves the
        # broker has registered with the controller and serves clients.
        async def probe() -> bool:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
            try:
                await asyncio.wait_for(admin.start(), timeout=5)
                await asyncio.wait_for(admin.list_topics(), timeout=5)
                return True
            finally:
                await admin.close()

        return run_coroutine_blocking(probe)

    # -- helpers -------------------------------------------------------------

    async def acreate_topic(self, name: str, partitions: int = 3) -> None:
        """Create a topic (replication factor 1) and wait until it is visible."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name=name, num_partitions=partitions, replication_factor=1)]
            )
            for _ in range(50):
                if name in await admin.list_topics():
                    return
                await asyncio.sleep(0.1)
            raise HarnessError(f"topic {name!r} not visible after creation")
        finally:
            await admin.close()

    def create_topic(self, name: str, partitions: int = 3) -> None:
        """Sync wrapper of :meth:`acreate_topic` (safe inside a running loop,
        but blocks it; prefer ``await acreate_topic`` in async tests)."""
        run_coroutine_blocking(lambda: self.acreate_topic(name, partitions))
