"""Prometheus server with a file-based scrape target list tests can rewrite."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from .ports import LOOPBACK, free_port
from .process import HarnessError, Service, find_binary, http_status

Result = list[dict[str, Any]]
Predicate = Callable[[Result], bool]


class Prometheus(Service):
    """Prometheus scraping job ``rpowatch`` from ``targets.json`` every second.

    ``alertmanagers`` (base URLs such as ``http://127.0.0.1:9093``) go into
    ``alerting.alertmanagers``; ``rule_files`` into ``rule_files``; ``extra_flags``
    are appended to the command line (e.g. ``--rules.alert.resend-delay=1s``: by
    default Prometheus re-sends an alert it could not deliver yet, such as one
    fired before the Alertmanagers were discovered, only after a minute).
    """

    name = "prometheus"

    def __init__(
        self,
        alertmanagers: Sequence[str] = (),
        rule_files: Sequence[str] = (),
        ready_timeout: float | None = None,
        extra_flags: Sequence[str] = (),
    ) -> None:
        self._binary = find_binary("prometheus")
        super().__init__(ready_timeout)
        self.host = LOOPBACK
        self.port = free_port()
        self.alertmanagers = list(alertmanagers)
        self.rule_files = list(rule_files)
        self.extra_flags = list(extra_flags)
        self.config_path = self.workdir / "prometheus.yml"
        self.targets_path = self.workdir / "targets.json"
        self.storage_path = self.workdir / "data"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> None:
        if not self.targets_path.exists():
            self.set_targets([])
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "rpowatch",
                    "file_sd_configs": [
                        {"files": [str(self.targets_path)], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        if self.rule_files:
            config["rule_files"] = self.rule_files
        if self.alertmanagers:
            config["alerting"] = {"alertmanagers": [_am_config(u) for u in self.alertmanagers]}
        # JSON is valid YAML, so no YAML library is needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    def command(self) -> list[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.storage_path}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
            *self.extra_flags,
        ]

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/-/ready") == 200

    # -- helpers -------------------------------------------------------------

    def set_targets(self, targets: Sequence[str], labels: dict[str, str] | None = None) -> None:
        """Point job ``rpowatch`` at ``host:port`` targets.

        Written to a temp file and renamed, so Prometheus' file watcher never
        reads a half-written list. Picked up within ~1 s (refresh_interval).
        """
        groups = [{"targets": list(targets), "labels": labels or {}}] if targets else []
        tmp = self.targets_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.targets_path)

    def query(self, expr: str) -> Result:
        """Instant query via GET /api/v1/query; returns ``data.result``."""
        qs = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=5) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise HarnessError(f"prometheus query {expr!r} failed: {body}")
        result: Result = body["data"]["result"]
        return result

    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """GET /api/v1/<path>; returns ``data``. An error response (e.g. a query that does not
        parse, HTTP 400) raises :class:`HarnessError` with Prometheus's error message."""
        qs = urllib.parse.urlencode(list(params))
        url = f"{self.url}/api/v1/{path.lstrip('/')}" + (f"?{qs}" if qs else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                body = json.load(exc)
            except ValueError:
                raise HarnessError(f"prometheus GET {path} {list(params)}: HTTP {exc.code}") from exc
        if body.get("status") != "success":
            raise HarnessError(f"prometheus GET {path} {list(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """Values of ``label`` (over series matching ``match``), as Grafana's
        ``label_values(match, label)`` lists them."""
        values: list[str] = self.api(f"label/{label}/values", [("match[]", match)] if match else [])
        return values

    def wait_for(self, expr: str, predicate: Predicate, timeout: float = 20.0) -> Result:
        """Poll ``query(expr)`` until ``predicate(result)``; return that result.

        Blocks the calling thread: from async tests that serve the scraped
        endpoint themselves, use :meth:`wait_for_async`.
        """
        deadline = time.monotonic() + timeout
        last: Result | str = "(no result yet)"
        while True:
            try:
                last = self.query(expr)
                if predicate(last):
                    return last
            except OSError as exc:
                last = f"(query error: {exc})"
            if time.monotonic() >= deadline:
                raise HarnessError(f"prometheus: {expr!r} not satisfied after {timeout}s; last result: {last}")
            time.sleep(0.5)

    async def wait_for_async(self, expr: str, predicate: Predicate, timeout: float = 20.0) -> Result:
        """:meth:`wait_for` that keeps the event loop running."""
        return await asyncio.to_thread(self.wait_for, expr, predicate, timeout)

    def reload(self) -> None:
        """Rewrite the config and POST /-/reload (needs --web.enable-lifecycle)."""
        self.prepare()
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass


def _am_config(url: str) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    cfg: dict[str, Any] = {
        "scheme": parsed.scheme or "http",
        "static_configs": [{"targets": [parsed.netloc]}],
    }
    if parsed.path.strip("/"):
        cfg["path_prefix"] = parsed.path
    return cfg
