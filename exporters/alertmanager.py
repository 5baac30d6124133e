"""Alertmanager API v2 sender with Prometheus's re-send semantics (contracts.md §4).

Prometheus (rules/alerting.go `needsSending`, rules/manager.go `sendAlerts`) never sends pending
alerts, sends a firing alert at once and then every `resend_delay` with a lease
`endsAt = now + 4 × max(evaluation interval, resend delay)` so that two lost sends do not
resolve it, and sends a resolve at once and again every `resend_delay` while the engine keeps the
resolved alert (15 minutes). Alertmanager keeps no state across restarts and merges re-posts of
the same label set, so re-sending is both necessary and harmless.

Bookkeeping is per (Alertmanager URL, alert): a replica that is down keeps its alerts "unsent"
and gets them on the next `send`, while the healthy replicas follow the normal schedule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import polars as pl

from exporters.snapshot import SelfCounters
from rules import lifecycle
from rules.engine import TickResult

logger = logging.getLogger(__name__)

Alert = dict[str, Any]


def rfc3339(ms: int) -> str:
    """Epoch milliseconds → `2026-11-24T10:00:30.123Z` (UTC)."""
    return datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


@dataclass(frozen=True)
class _Sent:
    """What was last delivered to one Alertmanager for one alert."""

    at_ms: int
    fired_at_ms: int  # identifies the occurrence: a re-fire after a resolve is a new one


@dataclass(frozen=True)
class _Candidate:
    """One firing or resolved row of the alert table."""

    fingerprint: str
    state: str
    fired_at_ms: int
    resolved_at_ms: int | None
    labels_json: str
    annotations_json: str


def fingerprint(alertname: str, alert_key: str) -> str:
    # The engine's identity for an alert; labels are derived from it, so it is stable too.
    return f"{alertname}\x1e{alert_key}"


class AlertmanagerSender:
    """Posts the current alert state to every configured Alertmanager.

    `send` must not be called concurrently with itself (a lock enforces it); it never raises
    on delivery failure — failures are logged, counted and retried at the next call.
    """

    def __init__(
        self,
        urls: Sequence[str],
        session: aiohttp.ClientSession,
        counters: SelfCounters,
        evaluation_interval_s: float,
        generator_url_base: str,
        resend_delay_s: float = 60.0,
        timeout_s: float = 10.0,
        max_batch: int = 1000,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._urls = list(dict.fromkeys(u.rstrip("/") for u in urls))  # a URL listed twice is one replica
        self._session = session
        self._counters = counters
        self._resend_ms = int(resend_delay_s * 1000)
        self._lease_ms = int(4 * max(evaluation_interval_s, resend_delay_s) * 1000)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._generator_base = generator_url_base.rstrip("/")
        self._max_batch = max_batch
        self._sent: dict[str, dict[str, _Sent]] = {url: {} for url in self._urls}
        self._failing: set[str] = set()  # URLs in a failure streak: logged once per streak
        self._lock = asyncio.Lock()

    async def send(self, result: TickResult) -> None:
        """Send what needs sending for the alert table of `result`, at `result.now_ms`."""
        async with self._lock:
            now_ms = result.now_ms
            candidates = self._candidates(result)
            present = {c.fingerprint for c in candidates}
            due: dict[str, list[_Candidate]] = {}
            for url, sent in self._sent.items():
                # Alerts gone from the table (resolved longer than the retention) are forgotten.
                for gone in sent.keys() - present:
                    del sent[gone]
                due[url] = [c for c in candidates if self._needs_sending(c, sent.get(c.fingerprint), now_ms)]
            # Bodies only for what some URL needs: most of a large table is not due at a tick.
            bodies = {c.fingerprint: self._body(c, now_ms) for alerts in due.values() for c in alerts}
            await asyncio.gather(*(self._send_to(url, due[url], bodies, now_ms) for url in self._urls))

    def _candidates(self, result: TickResult) -> list[_Candidate]:
        sendable = result.alerts.filter(pl.col("state") != lifecycle.PENDING)
        rows = result.with_details(sendable).filter(pl.col("labels").is_not_null()).select(
            "alertname", "alert_key", "state", "fired_at_ms", "resolved_at_ms", "labels", "annotations"
        )
        out: list[_Candidate] = []
        for alertname, alert_key, state, fired_at, resolved_at, labels_json, annotations_json in rows.iter_rows():
            if fired_at is None:  # defensive: a firing or resolved alert always has fired_at
                logger.warning("alert %s %r has no fired_at; not sent", alertname, alert_key)
                continue
            out.append(
                _Candidate(
                    fingerprint(alertname, alert_key), state, fired_at, resolved_at, labels_json, annotations_json
                )
            )
        return out

    def _body(self, c: _Candidate, now_ms: int) -> Alert:
        # Alertmanager drops empty label values anyway; dropping them here keeps the
        # generatorURL and the stored label set identical.
        labels = {k: str(v) for k, v in json.loads(c.labels_json).items() if v not in ("", None)}
        annotations = {k: str(v) for k, v in json.loads(c.annotations_json).items() if v is not None}
        if c.state == lifecycle.RESOLVED and c.resolved_at_ms is not None:
            ends_at = c.resolved_at_ms
        else:
            ends_at = now_ms + self._lease_ms
        query = [("alertname", labels.get("alertname", ""))] + sorted(
            (k, v) for k, v in labels.items() if k != "alertname"
        )
        return {
            "labels": labels,
            "annotations": annotations,
            "startsAt": rfc3339(c.fired_at_ms),
            "endsAt": rfc3339(ends_at),
            "generatorURL": f"{self._generator_base}/api/v1/alerts?{urllib.parse.urlencode(query)}",
        }

    def _needs_sending(self, candidate: _Candidate, last: _Sent | None, now_ms: int) -> bool:
        if last is None or last.fired_at_ms != candidate.fired_at_ms:
            return True  # never sent, or a new occurrence
        if candidate.resolved_at_ms is not None and candidate.resolved_at_ms > last.at_ms:
            return True  # resolved since the last send: tell Alertmanager at once
        return now_ms - last.at_ms >= self._resend_ms

    async def _send_to(self, url: str, due: list[_Candidate], bodies: dict[str, Alert], now_ms: int) -> None:
        sent = self._sent[url]
        for start in range(0, len(due), self._max_batch):
            chunk = due[start : start + self._max_batch]
            if not await self._post(url, [bodies[c.fingerprint] for c in chunk]):
                # The rest stays unsent too: the next send retries all of it.
                return
            for c in chunk:
                sent[c.fingerprint] = _Sent(at_ms=now_ms, fired_at_ms=c.fired_at_ms)

    async def _post(self, url: str, alerts: list[Alert]) -> bool:
        error: str | None = None
        try:
            async with self._session.post(f"{url}/api/v2/alerts", json=alerts, timeout=self._timeout) as response:
                if not 200 <= response.status < 300:
                    # Alertmanager's body says why (e.g. "start time must be before end time").
                    error = f"HTTP {response.status}: {(await response.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        if error is not None:
            self._counters.count_notification(url, ok=False, n=len(alerts))
            if url not in self._failing:
                self._failing.add(url)
                logger.warning(
                    "posting %d alerts to Alertmanager %s failed (%s); retrying at every send, "
                    "logged again only after it recovers",
                    len(alerts),
                    url,
                    error,
                )
            return False
        self._counters.count_notification(url, ok=True, n=len(alerts))
        if url in self._failing:
            self._failing.discard(url)
            logger.info("posting alerts to Alertmanager %s works again", url)
        return True
