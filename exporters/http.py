"""The service's HTTP port (contracts.md §5): /metrics, /healthz, /readyz, /api/v1/alerts and a
status page at /.

Every handler reads the snapshot holder once per request, so a response describes one instant.
"""

from __future__ import annotations

import asyncio
import gzip
import html
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import polars as pl
from aiohttp import web
from prometheus_client import CollectorRegistry

from exporters.alertmanager import rfc3339
from exporters.exposition import encoder_for
from exporters.history.http import add_history_routes
from exporters.history.store import HistoryStore
from exporters.snapshot import SnapshotHolder
from rules import lifecycle

logger = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]

HOLDER = web.AppKey("holder", SnapshotHolder)
REGISTRY = web.AppKey("registry", CollectorRegistry)
READINESS = web.AppKey[Readiness]("readiness")

STATES = (lifecycle.PENDING, lifecycle.FIRING, lifecycle.RESOLVED)


# gzip's fastest level: at 100,000 VMs with every per-VM series, 181 MB of text become 10.7 MB
# in 0.37 s (level 6: 9.2 MB in 1.1 s; bench.scrape), on top of 0.7 s to write the text.
GZIP_LEVEL = 1


async def _metrics(request: web.Request) -> web.Response:
    encoder, content_type = encoder_for(request.headers.get("Accept", ""))
    compress = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    registry = request.app[REGISTRY]

    def render() -> bytes:
        body = encoder(registry)
        return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0) if compress else body

    # Rendering a large fleet takes long enough to stall the event loop (and with it ingest and
    # alert sending); the collector only reads an immutable snapshot, so a thread is safe.
    body = await asyncio.to_thread(render)
    headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
    if compress:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header accepts gzip (RFC 9110 §12.5.3: named, or `*`, with a
    weight other than 0). Prometheus asks for it on every scrape unless compression is turned
    off in its scrape configuration."""
    for item in accept_encoding.split(","):
        coding, *parameters = (part.strip().lower() for part in item.split(";"))
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        weights = [p.partition("=")[2] for p in parameters if p.partition("=")[0].strip() == "q"]
        try:
            if not weights or float(weights[0]) > 0:
                return True
        except ValueError:  # a malformed weight: the coding is not accepted
            continue
    return False


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[READINESS]()
    if ready:
        return web.Response(text=f"{reason or 'ready'}\n")
    return web.Response(status=503, text=f"{reason or 'not ready'}\n")


def _ts(ms: int | None) -> str | None:
    return None if ms is None else rfc3339(ms)


def current_alerts(holder: SnapshotHolder, state: set[str] | None, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The alert table as API objects; `state` (if given) and `labels` (exact matches) filter."""
    result = holder.get().result
    alerts = result.alerts
    if state is not None:
        alerts = alerts.filter(pl.col("state").is_in(sorted(state)))
    if "alertname" in labels:  # narrow before joining labels and annotations
        alerts = alerts.filter(pl.col("alertname") == labels["alertname"])
    out: list[dict[str, Any]] = []
    rows = result.with_details(alerts).filter(pl.col("labels").is_not_null()).sort("alertname", "alert_key").select(
        "state", "labels", "annotations", "active_at_ms", "fired_at_ms", "resolved_at_ms"
    )
    for alert_state, labels_json, annotations_json, active_at, fired_at, resolved_at in rows.iter_rows():
        alert_labels: dict[str, str] = json.loads(labels_json)
        if any(alert_labels.get(k) != v for k, v in labels.items()):
            continue
        out.append(
            {
                "state": alert_state,
                "labels": alert_labels,
                "annotations": json.loads(annotations_json),
                "activeAt": _ts(active_at),
                # A pending alert that fired before carries that occurrence's time; not this one's.
                "firedAt": _ts(fired_at) if alert_state != lifecycle.PENDING else None,
                "resolvedAt": _ts(resolved_at),
            }
        )
    return out


async def _alerts(request: web.Request) -> web.Response:
    labels: dict[str, str] = {}
    states: set[str] | None = None
    for key, value in request.query.items():
        if key == "state":
            wanted = {s for s in value.split(",") if s}
            unknown = wanted - set(STATES)
            if unknown:
                raise web.HTTPBadRequest(text=f"unknown state {', '.join(sorted(unknown))}; use {', '.join(STATES)}\n")
            states = wanted if states is None else states | wanted
        elif key in labels and labels[key] != value:
            # Two different values for one label can match nothing; say so rather than return [].
            raise web.HTTPBadRequest(text=f"label {key} given twice with different values\n")
        else:
            labels[key] = value
    return web.json_response(current_alerts(request.app[HOLDER], states, labels))


async def _status(request: web.Request) -> web.Response:
    result = request.app[HOLDER].get().result
    firing = result.alerts.filter(pl.col("state") == lifecycle.FIRING)
    by_name = Counter(firing.get_column("alertname").to_list())
    ready, reason = request.app[READINESS]()
    items = "".join(
        f'<li><a href="/api/v1/alerts?state=firing&amp;alertname={html.escape(name)}">{html.escape(name)}</a>: {n}</li>'
        for name, n in sorted(by_name.items())
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rpowatch</title></head>
<body>
<h1>rpowatch</h1>
<p>Ready: {"yes" if ready else "no"} ({html.escape(reason)})</p>
<p>Evaluated at: {html.escape(rfc3339(result.now_ms))}</p>
<p>Firing alerts: {firing.height}</p>
<ul>{items}</ul>
<p><a href="/metrics">/metrics</a> · <a href="/api/v1/alerts">/api/v1/alerts</a> ·
<a href="/healthz">/healthz</a> · <a href="/readyz">/readyz</a></p>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")


def make_app(
    holder: SnapshotHolder, registry: CollectorRegistry, readiness: Readiness, history: HistoryStore | None = None
) -> web.Application:
    """The HTTP application. `readiness()` returns (ready, reason); it is called per request
    to /readyz and / and must be cheap and non-blocking. `history` serves /api/v1/history/..."""
    app = web.Application()
    app[HOLDER] = holder
    app[REGISTRY] = registry
    app[READINESS] = readiness
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/api/v1/alerts", _alerts)
    app.router.add_get("/", _status)
    add_history_routes(app, history)
    return app


async def start_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port (port 0 picks a free one; see `bound_port`). The caller stops it
    with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("HTTP listening on %s:%d", host, bound_port(runner))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the first site of `runner` is bound to."""
    for address in runner.addresses:
        if isinstance(address, tuple | list) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the runner has no TCP site bound")
