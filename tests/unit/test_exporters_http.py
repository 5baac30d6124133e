"""The HTTP port served for real on 127.0.0.1:0 and queried with an aiohttp client."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporters.alertmanager import rfc3339
from exporters.http import accepts_gzip, bound_port, make_app, start_http
from exporters.metrics import RpowatchCollector, make_evaluation_histogram
from exporters.snapshot import SelfCounters, Snapshot, SnapshotHolder
from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules.engine import Engine, EngineSettings, TickResult
from rules.pack import compile_pack

T0 = 1_790_000_000_000

PACK = {
    "rules": [
        {
            "alert": "LagOverRpo",
            "entity": "vm_replication",
            "condition": "lag_seconds > rpo_target_seconds",
            "severity": "critical",
            "annotations": {"summary": "Lag is over the RPO.", "description": "VM {vm} lag {lag_seconds} s."},
        },
        {
            "alert": "LagSlow",
            "entity": "vm_replication",
            "condition": "lag_seconds > 100",
            "for": "10m",
            "severity": "warning",
            "annotations": {"summary": "Lag is over 100 s.", "description": "VM {vm}."},
        },
    ]
}


def _cycle(engine: Engine, vm: str, event_id: str, rp_ms: int, now_ms: int) -> None:
    payload = {
        "event_id": event_id,
        "ts": rp_ms + 1_000,
        "vm_id": vm,
        "cluster_id": "c1",
        "target_id": "azure:westeurope",
        "technology": "asr",
        "kind": "cycle_completed",
        "frequency_s": 300,
        "recovery_point_ts": rp_ms,
    }
    decoded = decode_batch(Stream.REPLICATION, [json.dumps(payload).encode()], now_ms)
    assert decoded.rejects.is_empty()
    engine.apply(Stream.REPLICATION, decoded.valid, now_ms)


def _result() -> TickResult:
    """vm1 and vm2 fire LagOverRpo at T0, vm3 recovers (resolved), all three have LagSlow
    pending or not."""
    pack, problems = compile_pack(PACK)
    assert problems == []
    engine = Engine(pack, EngineSettings())
    _cycle(engine, "vm1", "a", T0 - 700_000, T0)
    _cycle(engine, "vm2", "b", T0 - 800_000, T0)
    _cycle(engine, "vm3", "c", T0 - 700_000, T0)
    engine.tick(T0 - 1_000)
    _cycle(engine, "vm3", "d", T0 - 50_000, T0)  # recovers: its LagOverRpo resolves at T0
    return engine.tick(T0)


@dataclass
class Served:
    base: str
    holder: SnapshotHolder
    ready: list[tuple[bool, str]]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    holder = SnapshotHolder()
    holder.set(Snapshot(_result(), SelfCounters().freeze()))
    registry = CollectorRegistry()
    registry.register(RpowatchCollector(holder, clock=lambda: T0 / 1000))
    make_evaluation_histogram(registry).observe(0.003)
    ready = [(False, "waiting for the first evaluation")]
    runner = await start_http(make_app(holder, registry, lambda: ready[0]), "127.0.0.1", 0)
    port = bound_port(runner)
    assert port > 0
    yield Served(f"http://127.0.0.1:{port}", holder, ready)
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_metrics_text_format(served: Served, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{served.base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lag = {s.labels["vm"]: s.value for s in families["rpowatch_replication_lag_seconds"].samples}
    assert lag == {"vm1": 700.0, "vm2": 800.0, "vm3": 50.0}
    firing = {s.labels["alertname"]: s.value for s in families["rpowatch_alerts"].samples}
    assert firing == {"LagOverRpo": 2.0, "LagSlow": 0.0}
    assert families["rpowatch_evaluation_duration_seconds"].type == "histogram"


async def test_metrics_openmetrics_format(served: Served, client: aiohttp.ClientSession) -> None:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"}
    async with client.get(f"{served.base}/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        text = await response.text()
    assert text.endswith("# EOF\n")
    families = {f.name: f.type for f in parse_openmetrics(text)}
    assert families["rpowatch_events"] == "counter"  # OpenMetrics names counters without _total
    assert families["rpowatch_replication_health"] == "gauge"
    assert families["rpowatch_evaluation_duration_seconds"] == "histogram"
    assert "rpowatch_build_info" in families


async def _raw_metrics(client: aiohttp.ClientSession, base: str, accept_encoding: str) -> tuple[str | None, bytes]:
    """The body as sent (not decompressed by the client) and its Content-Encoding."""
    headers = {"Accept-Encoding": accept_encoding}
    async with client.get(f"{base}/metrics", headers=headers, auto_decompress=False) as response:
        assert response.status == 200
        assert response.headers["Vary"] == "Accept-Encoding"
        return response.headers.get("Content-Encoding"), await response.read()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # The evaluation histogram is left out: nothing else in the body changes between two scrapes.
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_metrics_gzip_when_the_scraper_accepts_it(served: Served, client: aiohttp.ClientSession) -> None:
    # What Prometheus sends on every scrape (scrape_config `enable_compression`, on by default).
    encoding, body = await _raw_metrics(client, served.base, "gzip")
    assert encoding == "gzip"
    text = gzip.decompress(body).decode()
    plain_encoding, plain = await _raw_metrics(client, served.base, "identity")
    assert plain_encoding is None
    assert len(body) < len(plain)
    assert _samples(text) == _samples(plain.decode())
    assert ("rpowatch_replication_lag_seconds", (("hci_cluster", "c1"), ("target", "azure:westeurope"),
            ("technology", "asr"), ("vm", "vm2"))) in _samples(text)


async def test_metrics_uncompressed_when_gzip_is_refused(served: Served, client: aiohttp.ClientSession) -> None:
    for refused in ("gzip;q=0", "deflate", "br, *;q=0"):
        encoding, body = await _raw_metrics(client, served.base, refused)
        assert encoding is None, refused
        assert body.startswith(b"# HELP"), refused


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("GZip", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("gzip;q=0.001", True),
        ("x-gzip", True),
        ("*", True),
        ("", False),
        ("identity", False),
        ("gzip;q=0", False),
        ("gzip; q=0.0", False),
        ("gzip;q=zero", False),
        ("br, deflate", False),
    ],
)
def test_accepts_gzip(header: str, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


async def test_healthz_and_readyz(served: Served, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{served.base}/healthz") as response:
        assert (response.status, await response.text()) == (200, "ok\n")
    async with client.get(f"{served.base}/readyz") as response:
        assert response.status == 503
        assert "waiting for the first evaluation" in await response.text()
    served.ready[0] = (True, "evaluated 1 s ago")
    async with client.get(f"{served.base}/readyz") as response:
        assert (response.status, await response.text()) == (200, "evaluated 1 s ago\n")


async def _alerts(client: aiohttp.ClientSession, base: str, query: str = "") -> list[dict[str, Any]]:
    async with client.get(f"{base}/api/v1/alerts{query}") as response:
        assert response.status == 200, await response.text()
        body: list[dict[str, Any]] = await response.json()
        return body


async def test_alerts_api_filters(served: Served, client: aiohttp.ClientSession) -> None:
    everything = await _alerts(client, served.base)
    states = sorted((a["labels"]["alertname"], a["labels"]["vm"], a["state"]) for a in everything)
    assert states == [
        ("LagOverRpo", "vm1", "firing"),
        ("LagOverRpo", "vm2", "firing"),
        ("LagOverRpo", "vm3", "resolved"),
        ("LagSlow", "vm1", "pending"),
        ("LagSlow", "vm2", "pending"),
    ]

    firing = await _alerts(client, served.base, "?state=firing")
    assert {a["labels"]["vm"] for a in firing} == {"vm1", "vm2"}
    one = await _alerts(client, served.base, "?alertname=LagOverRpo&vm=vm1")
    assert len(one) == 1
    alert = one[0]
    assert alert["state"] == "firing"
    assert alert["labels"] == {
        "alertname": "LagOverRpo",
        "severity": "critical",
        "service": "rpowatch",
        "vm": "vm1",
        "hci_cluster": "c1",
        "target": "azure:westeurope",
        "technology": "asr",
    }
    assert alert["annotations"] == {"summary": "Lag is over the RPO.", "description": "VM vm1 lag 700.0 s."}
    assert alert["activeAt"] == alert["firedAt"] == rfc3339(T0 - 1_000)
    assert alert["resolvedAt"] is None

    resolved = await _alerts(client, served.base, "?state=resolved")
    assert [(a["labels"]["vm"], a["resolvedAt"]) for a in resolved] == [("vm3", rfc3339(T0))]
    pending = await _alerts(client, served.base, "?state=pending&vm=vm2")
    assert [(a["labels"]["alertname"], a["firedAt"]) for a in pending] == [("LagSlow", None)]
    both = await _alerts(client, served.base, "?state=pending,resolved")
    assert len(both) == 3
    assert await _alerts(client, served.base, "?vm=nope") == []

    async with client.get(f"{served.base}/api/v1/alerts?state=exploded") as response:
        assert response.status == 400


async def test_status_page(served: Served, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{served.base}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert "Firing alerts: 2" in page
    assert 'href="/metrics"' in page and "LagOverRpo" in page
