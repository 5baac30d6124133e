"""Eclipse Mosquitto MQTT broker on a free loopback port."""

from __future__ import annotations

import socket

from .ports import LOOPBACK, free_port
from .process import Service, find_binary


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


class Mosquitto(Service):
    name = "mosquitto"

    def __init__(self, ready_timeout: float | None = None) -> None:
        self._binary = find_binary("mosquitto", "/usr/sbin/mosquitto")
        super().__init__(ready_timeout)
        self.host = LOOPBACK
        self.port = free_port()
        self.config_path = self.workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def prepare(self) -> None:
        self.config_path.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
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
        return mqtt_connack(self.host, self.port)
