"""Prometheus Alertmanager (single node, clustering off)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from .ports import LOOPBACK, free_port
from .process import HarnessError, Service, find_binary, http_status

Alert = dict[str, Any]


class Alertmanager(Service):
    """Alertmanager routing everything to one receiver.

    With ``webhook_url`` the receiver posts to it (``send_resolved: true``);
    without, the receiver has no configs and alerts are only stored.
    With ``config`` (a whole alertmanager.yml as a mapping) that configuration
    is used instead, e.g. deploy/alertmanager/alertmanager.yml with its
    receivers pointed at a test's webhook server.
    """

    name = "alertmanager"
    receiver = "harness"

    def __init__(
        self,
        webhook_url: str | None = None,
        ready_timeout: float | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if webhook_url is not None and config is not None:
            raise ValueError("give webhook_url or config, not both")
        self._binary = find_binary("prometheus-alertmanager", "/usr/bin/alertmanager")
        super().__init__(ready_timeout)
        self.host = LOOPBACK
        self.port = free_port()
        self.webhook_url = webhook_url
        self.config = config
        self.config_path = self.workdir / "alertmanager.yml"
        self.storage_path = self.workdir / "data"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        if self.config is not None:
            # JSON is valid YAML, so no YAML library is needed.
            self.config_path.write_text(json.dumps(self.config, indent=2))
            return
        receiver: dict[str, Any] = {"name": self.receiver}
        if self.webhook_url:
            receiver["webhook_configs"] = [{"url": self.webhook_url, "send_resolved": True}]
        config = {
            "route": {
                "receiver": self.receiver,
                "group_by": ["alertname"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [receiver],
        }
        # JSON is valid YAML, so no YAML library is needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    def command(self) -> list[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.path={self.storage_path}",
            f"--web.listen-address={self.host}:{self.port}",
            # Empty value disables the gossip cluster (which would otherwise
            # bind 0.0.0.0:9094 and clash between parallel instances).
            "--cluster.listen-address=",
        ]

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/-/ready") == 200

    # -- API helpers ---------------------------------------------------------

    def get_alerts(
        self,
        active: bool = True,
        silenced: bool = True,
        inhibited: bool = True,
        unprocessed: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> list[Alert]:
        """GET /api/v2/alerts; ``labels`` become exact-match ``filter`` params."""
        params: list[tuple[str, str]] = [
            ("active", _flag(active)),
            ("silenced", _flag(silenced)),
            ("inhibited", _flag(inhibited)),
            ("unprocessed", _flag(unprocessed)),
        ]
        params += [("filter", f"{k}={json.dumps(v)}") for k, v in (labels or {}).items()]
        url = f"{self.url}/api/v2/alerts?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            alerts: list[Alert] = json.load(resp)
        return alerts

    def post_alerts(self, alerts: Sequence[Alert]) -> None:
        """POST /api/v2/alerts (each: labels, annotations, startsAt, endsAt, ...)."""
        req = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(list(alerts)).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5):
                pass
        except urllib.error.HTTPError as exc:
            # The body says what was wrong (e.g. "start time must be before end time").
            raise HarnessError(f"alertmanager rejected alerts: {exc.code} {exc.read()!r}") from exc


def _flag(value: bool) -> str:
    return "true" if value else "false"
