"""`/api/v1/history/...` served for real on 127.0.0.1:0: answers, and 400s that say what to fix."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import polars as pl
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from exporters.http import bound_port, make_app, start_http
from exporters.history import queries
from exporters.history.queries import Window
from exporters.history.store import HistoryStore
from exporters.history.tables import ALERTS, DAY_MS, LINK, VM
from exporters.snapshot import SnapshotHolder

T0 = 20_400 * DAY_MS  # 2025-11-08T00:00:00Z
MIN = 60_000
DAY = "start=2025-11-08T00:00:00Z&end=2025-11-09T00:00:00Z"


def fill(store: HistoryStore) -> None:
    rows = [
        {"ts_ms": T0 + m * MIN, "interval_ms": MIN, "vm": vm, "hci_cluster": "c1", "target": "t",
         "technology": "asr", "service_group": "sql", "lag_max_seconds": 700.0 if 10 <= m < 13 and vm == "vm-1" else 60.0,
         "lag_last_seconds": 30.0, "rpo_target_seconds": 600.0, "pending_bytes": 0, "samples": 60,
         "last_at_ms": T0 + m * MIN + 59_000}
        for m in range(30) for vm in ("vm-1", "vm-2")
    ]
    store.write_rows(VM, pl.DataFrame(rows, schema=VM.schema))
    labels = json.dumps({"alertname": "ReplicationRPOBreach", "vm": "vm-1", "hci_cluster": "c1"})
    log = [
        {"at_ms": T0 + 10 * MIN + 500, "alertname": "ReplicationRPOBreach", "alert_key": "vm-1", "transition": "fired",
         "severity": "critical", "hci_cluster": "c1", "vm": "vm-1", "node": None, "labels": labels,
         "annotations": json.dumps({"summary": "A VM cannot be recovered within its replication RPO."})},
        {"at_ms": T0 + 13 * MIN + 500, "alertname": "ReplicationRPOBreach", "alert_key": "vm-1", "transition": "resolved",
         "severity": "critical", "hci_cluster": "c1", "vm": "vm-1", "node": None, "labels": labels, "annotations": "{}"},
    ]
    store.write_rows(ALERTS, pl.DataFrame(log, schema=ALERTS.schema))
    links = [
        {"ts_ms": T0 + m * MIN, "interval_ms": MIN, "hci_cluster": "c1", "target": "t",
         "saturation_max_ratio": 1.2 if m == 5 else 0.5, "saturation_last_ratio": 0.5, "samples": 60,
         "last_at_ms": T0 + m * MIN + 59_000}
        for m in range(30)
    ]
    store.write_rows(LINK, pl.DataFrame(links, schema=LINK.schema))


async def serve(history: HistoryStore | None) -> tuple[web.AppRunner, str]:
    app = make_app(SnapshotHolder(), CollectorRegistry(), lambda: (True, "ready"), history)
    runner = await start_http(app, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{bound_port(runner)}/api/v1/history"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, aiohttp.ClientSession, HistoryStore]]:
    store = HistoryStore(tmp_path)
    fill(store)
    runner, base = await serve(store)
    async with aiohttp.ClientSession() as session:
        yield base, session, store
    await runner.cleanup()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_lag_series(api: tuple[str, aiohttp.ClientSession, HistoryStore]) -> None:
    base, session, _ = api
    status, body = await get(session, f"{base}/lag?vm=vm-1&{DAY}")
    assert status == 200, body
    rows = json.loads(body)
    assert len(rows) == 30
    assert rows[0]["time"] == "2025-11-08T00:00:00.000Z" and rows[0]["vm"] == "vm-1"
    assert [r["within_rpo"] for r in rows[9:14]] == [True, False, False, False, True]
    status, body = await get(session, f"{base}/lag?vm=vm-1&{DAY}&step=10m")
    rows = json.loads(body)
    assert [(r["time"][11:16], r["lag_max_seconds"], r["interval_seconds"]) for r in rows] == [
        ("00:00", 60.0, 600.0), ("00:10", 700.0, 600.0), ("00:20", 60.0, 600.0)]
    status, body = await get(session, f"{base}/lag?vm=vm-1,vm-2&start=1762560000&end=1762560600")
    assert status == 200 and {r["vm"] for r in json.loads(body)} == {"vm-1", "vm-2"}
    # Grafana: ${__from} in milliseconds, $__interval finer than the stored minute.
    status, body = await get(session, f"{base}/lag?vm=vm-1&start=1762560000000&end=1762563600000&step=15s")
    rows = json.loads(body)
    assert len(rows) == 30 and {r["interval_seconds"] for r in rows} == {60.0}


async def test_link_saturation(api: tuple[str, aiohttp.ClientSession, HistoryStore]) -> None:
    base, session, _ = api
    status, body = await get(session, f"{base}/link?hci_cluster=c1&{DAY}&step=30m")
    assert status == 200, body
    (row,) = json.loads(body)
    assert (row["target"], row["saturation_max_ratio"], row["saturation_last_ratio"]) == ("t", 1.2, 0.5)
    assert row["observed_seconds"] == 1800.0


async def test_compliance(api: tuple[str, aiohttp.ClientSession, HistoryStore]) -> None:
    base, session, store = api
    status, body = await get(session, f"{base}/compliance?group_by=service_group&{DAY}")
    assert status == 200, body
    (row,) = json.loads(body)
    assert row == {
        "service_group": "sql", "vms": 2, "observed_seconds": 3600.0, "breached_seconds": 180.0,
        "within_rpo_ratio": pytest.approx(0.95), "breaches": 1, "recovered_breaches": 1,
        "longest_breach_seconds": 180.0, "mean_time_to_recover_seconds": 180.0,
    }
    status, body = await get(session, f"{base}/compliance?group_by=vm&{DAY}")
    direct = queries.compliance(store, Window(T0, T0 + DAY_MS), "vm").to_dicts()
    assert json.loads(body) == direct


async def test_alerts(api: tuple[str, aiohttp.ClientSession, HistoryStore]) -> None:
    base, session, _ = api
    status, body = await get(session, f"{base}/alerts?vm=vm-1&{DAY}")
    assert status == 200, body
    fired, resolved = json.loads(body)
    assert (fired["transition"], resolved["transition"]) == ("fired", "resolved")
    assert fired["time"] == "2025-11-08T00:10:00.500Z"
    assert fired["labels"]["vm"] == "vm-1" and fired["annotations"]["summary"].endswith(".")
    status, body = await get(session, f"{base}/alerts?vm=vm-2&{DAY}")
    assert (status, json.loads(body)) == (200, [])
    status, body = await get(session, f"{base}/alerts?alertname=ReplicationRPOBreach&transition=resolved&{DAY}")
    assert [r["transition"] for r in json.loads(body)] == ["resolved"]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        (f"lag?{DAY}", "vm is required"),
        ("lag?vm=a&start=yesterday", "start='yesterday' is not a time"),
        ("lag?vm=a&start=2025-11-08T00:00:00", "is not a time; use RFC 3339 with an offset"),
        ("lag?vm=a&start=now-1d&end=now-2d", "must be before end"),
        ("lag?vm=a&step=fast", "step='fast' is not a duration"),
        ("lag?vm=a&step=0s", "must be longer than zero"),
        ("lag?vm=a&start=now-400d&step=1s", "use step of at least"),
        ("lag?vm=a&stpe=1m", "unknown parameter stpe"),
        ("lag?vm=a&start=now-1d&start=now-2d", "start given 2 times"),
        ("lag?vm=a&end=99999999999999999", "out of range"),
        ("compliance?group_by=node", "group_by='node' is not supported; use one of vm, hci_cluster, service_group"),
        ("alerts?transition=pending", "use fired or resolved"),
    ],
)
async def test_bad_parameters_get_a_400_that_says_what_to_fix(
    api: tuple[str, aiohttp.ClientSession, HistoryStore], query: str, says: str
) -> None:
    base, session, _ = api
    status, body = await get(session, f"{base}/{query}")
    assert status == 400
    assert says in body


async def test_without_history_the_routes_say_how_to_enable_it() -> None:
    runner, base = await serve(None)
    try:
        async with aiohttp.ClientSession() as session:
            status, body = await get(session, f"{base}/lag?vm=a")
        assert status == 404 and "history.enabled" in body
    finally:
        await runner.cleanup()
