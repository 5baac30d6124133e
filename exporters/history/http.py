"""`/api/v1/history/...` (contracts.md §5): lag, compliance, alert transitions, and the link,
cluster and node series. Each response is a JSON array of flat objects (what Grafana's JSON
datasources read best); a bad parameter gets a 400 whose text says what to fix, and a service
without history enabled answers 404 saying so.

Queries run in a worker thread (polars releases the GIL) so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import polars as pl
from aiohttp import web

from exporters.history import output, params, queries
from exporters.history.store import HistoryStore

logger = logging.getLogger(__name__)

STORE = web.AppKey("history_store", HistoryStore)
CLOCK = web.AppKey[Callable[[], float]]("history_clock")
PREFIX = "/api/v1/history"
MAX_ROWS = 500_000


def _params(request: web.Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in request.query.items():
        out.setdefault(key, []).append(value)
    return out


def _store(request: web.Request) -> HistoryStore:
    store = request.app.get(STORE)
    if store is None:
        raise web.HTTPNotFound(text="history is not enabled: set history.enabled (and history.path) in the configuration\n")
    return store


async def _run(request: web.Request, kind: str, query: Callable[[HistoryStore, int], pl.DataFrame]) -> web.Response:
    store = _store(request)
    now_ms = int(request.app[CLOCK]() * 1000)
    try:
        frame = await asyncio.to_thread(query, store, now_ms)
    except params.QueryError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    if frame.height > MAX_ROWS:
        raise web.HTTPBadRequest(
            text=f"the answer has {frame.height} rows (at most {MAX_ROWS}); narrow the window, add filters or raise step\n"
        )
    body = await asyncio.to_thread(output.to_json, kind, frame)
    return web.Response(text=body, content_type="application/json")


def _series_handler(name: str) -> Callable[[web.Request], object]:
    async def handler(request: web.Request) -> web.Response:
        raw = _params(request)

        def query(store: HistoryStore, now_ms: int) -> pl.DataFrame:
            args = params.series_args(name, raw, now_ms)
            return queries.series(store, name, args.window, args.filters, args.step_ms)

        return await _run(request, name, query)

    return handler


async def _compliance(request: web.Request) -> web.Response:
    raw = _params(request)

    def query(store: HistoryStore, now_ms: int) -> pl.DataFrame:
        args = params.compliance_args(raw, now_ms)
        return queries.compliance(store, args.window, args.group_by, args.filters)

    return await _run(request, "compliance", query)


async def _alerts(request: web.Request) -> web.Response:
    raw = _params(request)

    def query(store: HistoryStore, now_ms: int) -> pl.DataFrame:
        args = params.alert_args(raw, now_ms)
        return queries.alerts(store, args.window, args.filters)

    return await _run(request, "alerts", query)


def add_history_routes(app: web.Application, store: HistoryStore | None, clock: Callable[[], float] = time.time) -> None:
    """Register `/api/v1/history/*` on `app`. With `store` None the routes answer 404 (history
    disabled) rather than not existing, so a dashboard says why it is empty."""
    if store is not None:
        app[STORE] = store
    app[CLOCK] = clock
    for name in queries.SERIES_TABLES:
        app.router.add_get(f"{PREFIX}/{name}", _series_handler(name))  # type: ignore[arg-type]
    app.router.add_get(f"{PREFIX}/compliance", _compliance)
    app.router.add_get(f"{PREFIX}/alerts", _alerts)
