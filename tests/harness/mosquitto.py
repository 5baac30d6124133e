"""Eclipse Mosquitto MQTT broker on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .ports import LOOPBACK, free_port, tcp_connectable
from .process import HarnessError, Service, find_binary


def mqtt_connack(host: str, port: int, timeout: float = 2.0) -> bool:
    """One MQTT 3.1.1 CONNECT -> CONNACK round trip over a raw socket.

    A bare TCP connect can succeed before the broker processes packets; a
    CONNACK with return code 0 proves it accepts (anonymous) clients.
    """
    client_id = b"harness-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol, level 4, clean session, keepalive 10s
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    packet = b"\x10" + bytes([len(body)]) + body  # body < 128 bytes: 1-byte length
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(packet)
        reply = sock.recv(4)
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    return reply == b"\x20\x02\x00\x00"


def tls_handshake(host: str, port: int, cafile: Path, timeout: float = 2.0) -> bool:
    """A TLS handshake that verifies the server against ``cafile``."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=host):
            return True


@dataclass(frozen=True)
class MosquittoTls:
    """The listener's certificate and key (PEM) and the CA clients verify it with."""

    certfile: Path
    keyfile: Path
    cafile: Path


class Mosquitto(Service):
    """Mosquitto on a free loopback port: anonymous and plain by default; with ``tls`` the
    listener speaks TLS only, and with ``users`` (name → password) anonymous clients are refused
    and the passwords are checked against a file made by ``mosquitto_passwd``."""

    name = "mosquitto"

    def __init__(
        self,
        ready_timeout: float | None = None,
        tls: MosquittoTls | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self._binary = find_binary("mosquitto", "/usr/sbin/mosquitto")
        super().__init__(ready_timeout)
        self.host = LOOPBACK
        self.port = free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.tls = tls
        self.users = dict(users or {})
        self.password_file = self.workdir / "passwords"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _secured(self) -> str:
        lines = []
        readable: list[Path] = []
        if self.tls is not None:
            # Copies in our own directory: mosquitto started as root reads them after dropping
            # to its own user, who cannot enter the caller's private directories.
            for option, source in (("cafile", self.tls.cafile), ("certfile", self.tls.certfile), ("keyfile", self.tls.keyfile)):
                copy = self.workdir / f"tls-{option}.pem"
                shutil.copyfile(source, copy)
                readable.append(copy)
                lines.append(f"{option} {copy}")
        if self.users:
            passwd = find_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
            self.password_file.unlink(missing_ok=True)
            for i, (user, password) in enumerate(self.users.items()):
                argv = [passwd, "-b", *(["-c"] if i == 0 else []), str(self.password_file), user, password]
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                if proc.returncode != 0:
                    raise HarnessError(f"mosquitto_passwd failed: {proc.stderr.strip()}")
            lines += [f"password_file {self.password_file}"]
        os.chmod(self.workdir, 0o755)
        for path in [self.password_file, *readable]:
            if path.exists():
                os.chmod(path, 0o644)
        return "".join(f"{line}\n" for line in lines)

    def prepare(self) -> None:
        self.config_path.write_text(
            f"listener {self.port} {self.host}\n"
            + self._secured()
            + f"allow_anonymous {'false' if self.users else 'true'}\n"
            "persistence false\n"
            # stdout is redirected into mosquitto.log by Service.start(); a
            # log_dest file would be opened after mosquitto (as root) drops
            # privileges to the 'mosquitto' user, which cannot write our
            # private temp dir.
            "log_dest stdout\n"
            "log_type error\n"
            "log_type warning\n"
            "log_type notice\n"
            "log_type information\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
        )

    def command(self) -> list[str]:
        return [self._binary, "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        if self.tls is not None:
            return tls_handshake(self.host, self.port, self.tls.cafile)
        if self.users:
            return tcp_connectable(self.host, self.port)
        return mqtt_connack(self.host, self.port)
