"""The Alertmanager sender against in-test fake Alertmanagers (aiohttp servers recording POSTs),
driven by a real engine with an injected clock."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web

from exporters.alertmanager import AlertmanagerSender, rfc3339
from exporters.snapshot import SelfCounters
from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules.engine import Engine, TickResult
from rules.pack import compile_pack

REPO = Path(__file__).resolve().parents[2]
T0 = 1_790_000_000_000
EVAL_S = 15.0
RESEND_S = 60.0
LEASE_MS = int(4 * max(EVAL_S, RESEND_S) * 1000)


@dataclass
class FakeAlertmanager:
    """Records every POST /api/v2/alerts body; `status` is what it answers."""

    status: int = 200
    posts: list[list[dict[str, Any]]] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.json())
        return web.Response(status=self.status, text="" if self.status == 200 else "broken on purpose")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v2/alerts", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def take(self) -> list[list[dict[str, Any]]]:
        posts, self.posts = self.posts, []
        return posts


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeAlertmanager, FakeAlertmanager]]:
    pair = (FakeAlertmanager(), FakeAlertmanager())
    for fake in pair:
        await fake.start()
    yield pair
    for fake in pair:
        assert fake.runner is not None
        await fake.runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _closed_port_url() -> str:
    # Bound then closed: nothing listens there, so connecting is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _engine() -> Engine:
    """The shipped pack's replication RPO breach rule alone, so each VM raises one alert."""
    with open(REPO / "rules" / "packs" / "default.yaml") as f:
        document = yaml.safe_load(f)
    document["rules"] = [r for r in document["rules"] if r["alert"] == "ReplicationRPOBreach"]
    pack, problems = compile_pack(document, {"runbook_base": "docs/runbooks"})
    assert problems == []
    return Engine(pack)


def _cycle(engine: Engine, vm: str, event_id: str, ts_ms: int, rp_ms: int, now_ms: int) -> None:
    payload = {
        "event_id": event_id,
        "ts": ts_ms,
        "vm_id": vm,
        "cluster_id": "c1",
        "target_id": "c2",
        "technology": "asr",
        "kind": "cycle_completed",
        "frequency_s": 300,
        "recovery_point_ts": rp_ms,
    }
    decoded = decode_batch(Stream.REPLICATION, [json.dumps(payload).encode()], now_ms)
    assert decoded.rejects.is_empty()
    engine.apply(Stream.REPLICATION, decoded.valid, now_ms)


def _breaching_engine(*vms: str) -> Engine:
    """Each VM's recovery point is 700 s old at T0: over its 600 s RPO, so it fires at T0."""
    engine = _engine()
    for vm in vms:
        _cycle(engine, vm, f"{vm}-1", T0 - 690_000, T0 - 700_000, T0)
    return engine


def _sender(urls: list[str], session: aiohttp.ClientSession, counters: SelfCounters, **kw: Any) -> AlertmanagerSender:
    return AlertmanagerSender(
        urls=urls,
        session=session,
        counters=counters,
        evaluation_interval_s=EVAL_S,
        resend_delay_s=RESEND_S,
        timeout_s=2.0,
        generator_url_base="http://rpowatch.example:9464",
        **kw,
    )


def _only_alert(posts: list[list[dict[str, Any]]]) -> dict[str, Any]:
    assert len(posts) == 1 and len(posts[0]) == 1, posts
    return posts[0][0]


async def test_firing_resend_and_resolve_follow_prometheus(
    fakes: tuple[FakeAlertmanager, FakeAlertmanager], session: aiohttp.ClientSession
) -> None:
    am, _ = fakes
    counters = SelfCounters()
    sender = _sender([am.url], session, counters)
    engine = _breaching_engine("vm2")

    await sender.send(engine.tick(T0))
    alert = _only_alert(am.take())
    assert alert["labels"] == {
        "alertname": "ReplicationRPOBreach",
        "severity": "critical",
        "service": "rpowatch",
        "vm": "vm2",
        "hci_cluster": "c1",
        "target": "c2",
        "technology": "asr",
    }
    assert alert["annotations"]["summary"] == "A VM cannot be recovered within its replication RPO."
    assert "vm2" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"] == "docs/runbooks/ReplicationRPOBreach.md"
    assert alert["startsAt"] == rfc3339(T0)
    assert alert["endsAt"] == rfc3339(T0 + LEASE_MS)
    generator = urlsplit(alert["generatorURL"])
    assert (generator.scheme, generator.netloc, generator.path) == ("http", "rpowatch.example:9464", "/api/v1/alerts")
    query = parse_qsl(generator.query)
    assert query[0] == ("alertname", "ReplicationRPOBreach")
    assert dict(query) == alert["labels"]

    # 1 s later: nothing is due.
    await sender.send(engine.tick(T0 + 1_000))
    assert am.take() == []

    # After the resend delay: re-sent with a renewed lease, same start.
    await sender.send(engine.tick(T0 + 60_000))
    alert = _only_alert(am.take())
    assert alert["startsAt"] == rfc3339(T0)
    assert alert["endsAt"] == rfc3339(T0 + 60_000 + LEASE_MS)

    # A fresh recovery point resolves it: sent at once with endsAt = the resolve time.
    _cycle(engine, "vm2", "vm2-2", T0 + 61_000, T0 + 60_000, T0 + 62_000)
    await sender.send(engine.tick(T0 + 62_000))
    alert = _only_alert(am.take())
    assert alert["endsAt"] == rfc3339(T0 + 62_000)
    assert alert["startsAt"] == rfc3339(T0)

    await sender.send(engine.tick(T0 + 63_000))
    assert am.take() == []
    # Re-sent resolved every resend delay while the engine keeps it (15 min).
    await sender.send(engine.tick(T0 + 122_000))
    assert _only_alert(am.take())["endsAt"] == rfc3339(T0 + 62_000)

    # Pending alerts never go out; nothing else fired.
    stats = counters.freeze()
    assert stats.alertmanager_notifications_total == {am.url: 4}
    assert stats.alertmanager_notifications_failed_total == {am.url: 0}


async def test_refiring_after_resolve_is_sent_at_once(
    fakes: tuple[FakeAlertmanager, FakeAlertmanager], session: aiohttp.ClientSession
) -> None:
    am, _ = fakes
    sender = _sender([am.url], session, SelfCounters())
    engine = _breaching_engine("vm2")
    await sender.send(engine.tick(T0))
    _cycle(engine, "vm2", "vm2-2", T0 + 1_000, T0 + 1_000, T0 + 2_000)
    await sender.send(engine.tick(T0 + 2_000))
    assert len(am.take()) == 2
    # 700 s without a new cycle: lag > RPO again, a new occurrence within the resend delay.
    later = T0 + 1_000 + 601_000
    await sender.send(engine.tick(later))
    alert = _only_alert(am.take())
    assert alert["startsAt"] == rfc3339(later)
    assert alert["endsAt"] == rfc3339(later + LEASE_MS)


async def test_failing_url_does_not_block_the_other_and_is_retried(
    fakes: tuple[FakeAlertmanager, FakeAlertmanager], session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = fakes
    dead = _closed_port_url()
    bad.status = 500
    counters = SelfCounters()
    sender = _sender([good.url, bad.url, dead], session, counters)
    engine = _breaching_engine("vm2")

    with caplog.at_level(logging.WARNING, logger="exporters.alertmanager"):
        await sender.send(engine.tick(T0))
        assert _only_alert(good.take())["endsAt"] == rfc3339(T0 + LEASE_MS)
        assert len(bad.take()) == 1  # tried, answered 500

        # 1 s later: the good replica is up to date; the failed ones are retried.
        await sender.send(engine.tick(T0 + 1_000))
        assert good.take() == []
        assert len(bad.take()) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # Logged once per URL per failure streak, not at every send.
    assert sorted(str(r.args[1]) for r in warnings if isinstance(r.args, tuple)) == sorted([bad.url, dead])

    bad.status = 200
    await sender.send(engine.tick(T0 + 2_000))
    assert _only_alert(bad.take())["endsAt"] == rfc3339(T0 + 2_000 + LEASE_MS)
    assert good.take() == []
    await sender.send(engine.tick(T0 + 3_000))
    assert bad.take() == [] and good.take() == []

    # Each replica keeps its own schedule: good is due at T0+60 s, bad at T0+62 s.
    await sender.send(engine.tick(T0 + 60_000))
    assert len(good.take()) == 1 and bad.take() == []
    await sender.send(engine.tick(T0 + 62_000))
    assert good.take() == [] and len(bad.take()) == 1

    stats = counters.freeze()
    assert stats.alertmanager_notifications_total == {good.url: 2, bad.url: 4, dead: 6}
    assert stats.alertmanager_notifications_failed_total == {good.url: 0, bad.url: 2, dead: 6}


async def test_batches_are_chunked_and_bookkeeping_forgets_gone_alerts(
    fakes: tuple[FakeAlertmanager, FakeAlertmanager], session: aiohttp.ClientSession
) -> None:
    am, _ = fakes
    sender = _sender([am.url], session, SelfCounters(), max_batch=2)
    engine = _breaching_engine("vm1", "vm2", "vm3")
    await sender.send(engine.tick(T0))
    posts = am.take()
    assert [len(p) for p in posts] == [2, 1]
    assert sorted(a["labels"]["vm"] for p in posts for a in p) == ["vm1", "vm2", "vm3"]

    for i, vm in enumerate(("vm1", "vm2", "vm3")):
        _cycle(engine, vm, f"{vm}-2", T0 + 1_000, T0 + 1_000, T0 + 2_000 + i)
    await sender.send(engine.tick(T0 + 2_000))
    assert sum(len(p) for p in am.take()) == 3  # three resolves
    # Past the 15 min retention (replication kept healthy) the engine drops them, and so does
    # the sender.
    for vm in ("vm1", "vm2", "vm3"):
        _cycle(engine, vm, f"{vm}-3", T0 + 900_000, T0 + 900_000, T0 + 901_000)
    gone = engine.tick(T0 + 2_000 + 900_000)
    assert gone.alerts.is_empty()
    await sender.send(gone)
    assert am.take() == []
    assert sender._sent[am.url] == {}  # noqa: SLF001 - the bookkeeping itself is the subject here
