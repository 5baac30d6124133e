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
import polars as pl
import pytest
import yaml
from aiohttp import web

import exporters.alertmanager as alertmanager
from exporters.alertmanager import AlertmanagerSender, alert_bodies, reference_body, rfc3339
from exporters.snapshot import SelfCounters
from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules import lifecycle
from rules.engine import Engine, TickResult, empty_result
from rules.pack import compile_pack
from rules.state import FleetState
from rules.views import ViewParams, build_views

REPO = Path(__file__).resolve().parents[2]
T0 = 1_790_000_000_000
EVAL_S = 15.0
RESEND_S = 60.0
LEASE_MS = int(4 * max(EVAL_S, RESEND_S) * 1000)


@dataclass
class FakeAlertmanager:
    """Records every POST /api/v2/alerts body; `status` is what it answers, or the next of
    `statuses` while there are any."""

    status: int = 200
    statuses: list[int] = field(default_factory=list)
    posts: list[list[dict[str, Any]]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)  # the status of each post, in order
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.posts.append(await request.json())
        status = self.statuses.pop(0) if self.statuses else self.status
        self.answered.append(status)
        return web.Response(status=status, text="" if status == 200 else "broken on purpose")

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
        posts, self.posts, self.answered = self.posts, [], []
        return posts

    def take_answered(self) -> list[tuple[list[dict[str, Any]], int]]:
        answered = self.answered
        return list(zip(self.take(), answered, strict=True))


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
    assert sender._sent[am.url].is_empty()  # noqa: SLF001 - the bookkeeping itself is the subject here


# --- the bookkeeping at a few thousand alerts -------------------------------------------------

Key = tuple[str, str]  # (alertname, vm)
SEVERITY = {"RestoreTestOverdue": "warning", "ReplicationRPOBreach": "critical"}


@dataclass
class Occurrence:
    state: str
    fired_at_ms: int | None = None
    resolved_at_ms: int | None = None


@dataclass(frozen=True)
class TableResult(TickResult):
    """A tick result over a table written by hand: its labels and annotations are a fixed frame
    (alertname, alert_key, labels, annotations), not rendered by an engine."""

    fixed_details: pl.DataFrame = field(default_factory=pl.DataFrame)

    def with_details(self, alerts: pl.DataFrame) -> pl.DataFrame:
        return alerts.join(self.fixed_details, on=["alertname", "alert_key"], how="left")


@dataclass
class AlertTable:
    """An engine alert table written by hand: alerts by (alertname, vm), with labels and
    annotations rendered the way the engine renders them."""

    rows: dict[Key, Occurrence] = field(default_factory=dict)

    def result(self, now_ms: int) -> TickResult:
        keys = list(self.rows)
        frame = pl.DataFrame(
            {
                "alertname": [name for name, _ in keys],
                "vm": [vm for _, vm in keys],
                "state": [self.rows[k].state for k in keys],
                "fired_at_ms": [self.rows[k].fired_at_ms for k in keys],
                "resolved_at_ms": [self.rows[k].resolved_at_ms for k in keys],
            },
            schema_overrides={"fired_at_ms": pl.Int64, "resolved_at_ms": pl.Int64},
        ).with_columns(
            pl.format("hci-{}", pl.col("vm").str.slice(3, 2)).alias("hci_cluster"),
            pl.col("alertname").replace_strict(SEVERITY).alias("severity"),
        )
        full = frame.with_columns(
            pl.concat_str("vm", "hci_cluster", separator="\x1f").alias("alert_key"),
            pl.lit(0, dtype=pl.UInt16).alias("rule"),
            pl.coalesce("fired_at_ms", pl.lit(now_ms)).alias("active_at_ms"),
            pl.lit(now_ms).alias("last_true_ms"),
            pl.lit(now_ms).alias("describe_at_ms"),
        ).with_columns(pl.concat_str("alertname", "alert_key").hash(3).alias("alert_id"))
        details = full.select(
            "alertname",
            "alert_key",
            pl.struct("alertname", "severity", pl.lit("rpowatch").alias("service"), "vm", "hci_cluster")
            .struct.json_encode()
            .alias("labels"),
            pl.struct(
                pl.lit("Overdue.").alias("summary"),
                pl.format("VM {} on {} is overdue.", "vm", "hci_cluster").alias("description"),
            )
            .struct.json_encode()
            .alias("annotations"),
        )
        # Whichever columns the engine's alert table has.
        alerts = full.select(lifecycle.ALERT_SCHEMA.names()).cast(lifecycle.ALERT_SCHEMA)
        views = build_views(FleetState(), now_ms, ViewParams())
        return TableResult(views=views, alerts=alerts, changes=empty_result().changes, fixed_details=details)


@dataclass
class PrometheusModel:
    """Prometheus's `needsSending`, one alert at a time, per URL: what the sender must do."""

    urls: list[str]
    resend_ms: int = int(RESEND_S * 1000)
    sent: dict[str, dict[Key, tuple[int, int]]] = field(default_factory=dict)  # url → key → (at, fired_at)

    def __post_init__(self) -> None:
        self.sent = {url: {} for url in self.urls}

    def due(self, url: str, table: AlertTable, now_ms: int) -> set[Key]:
        sent = self.sent[url]
        present = {k for k, o in table.rows.items() if o.state != lifecycle.PENDING}
        for gone in sent.keys() - present:
            del sent[gone]
        out = set()
        for key in present:
            o, last = table.rows[key], sent.get(key)
            if (
                last is None
                or last[1] != o.fired_at_ms
                or (o.resolved_at_ms is not None and o.resolved_at_ms > last[0])
                or now_ms - last[0] >= self.resend_ms
            ):
                out.add(key)
        return out

    def delivered(self, url: str, keys: set[Key], table: AlertTable, now_ms: int) -> None:
        for key in keys:
            fired_at = table.rows[key].fired_at_ms
            assert fired_at is not None
            self.sent[url][key] = (now_ms, fired_at)


async def _tick(
    sender: AlertmanagerSender, table: AlertTable, model: PrometheusModel, fakes: list[FakeAlertmanager], now_ms: int
) -> dict[str, set[Key]]:
    """One send, checked against the model: every URL got exactly what was due for it (or a
    prefix of it in batches, up to a failed batch), each alert with the right times. Returns
    what each URL was sent."""
    expected = {fake.url: model.due(fake.url, table, now_ms) for fake in fakes}
    await sender.send(table.result(now_ms))
    out: dict[str, set[Key]] = {}
    for fake in fakes:
        answered = fake.take_answered()
        assert all(len(alerts) <= 1000 for alerts, _ in answered)
        assert all(status == 200 for _, status in answered[:-1]), "posting stops at a failed batch"
        attempted: list[Key] = []
        for alerts, status in answered:
            keys = [(a["labels"]["alertname"], a["labels"]["vm"]) for a in alerts]
            attempted += keys
            if status == 200:
                model.delivered(fake.url, set(keys), table, now_ms)
            for a, key in zip(alerts, keys, strict=True):
                o = table.rows[key]
                assert o.fired_at_ms is not None
                assert a["startsAt"] == rfc3339(o.fired_at_ms)
                ends = o.resolved_at_ms if o.state == lifecycle.RESOLVED else now_ms + LEASE_MS
                assert a["endsAt"] == rfc3339(ends or 0), (key, a)
        assert len(attempted) == len(set(attempted)), "an alert twice in one send"
        if all(status == 200 for _, status in answered):
            assert set(attempted) == expected[fake.url]
        else:
            assert set(attempted) <= expected[fake.url]
        out[fake.url] = set(attempted)
    return out


def _fleet(firing: int, pending: int, resolved: int) -> AlertTable:
    """Alerts of two rules over VMs vm-00000…, first firing (since T0), then pending, then
    resolved (fired 10 min and resolved 5 min before T0)."""
    table = AlertTable()
    states = [Occurrence(lifecycle.FIRING, T0)] * firing + [Occurrence(lifecycle.PENDING)] * pending
    states += [Occurrence(lifecycle.RESOLVED, T0 - 600_000, T0 - 300_000)] * resolved
    for i, o in enumerate(states):
        table.rows[("RestoreTestOverdue" if i % 3 else "ReplicationRPOBreach", f"vm-{i:05d}")] = o
    return table


def _keys(table: AlertTable, state: str) -> list[Key]:
    return [k for k, o in table.rows.items() if o.state == state]


async def test_schedule_of_thousands_of_alerts_follows_prometheus(
    fakes: tuple[FakeAlertmanager, FakeAlertmanager], session: aiohttp.ClientSession
) -> None:
    am, _ = fakes
    sender = _sender([am.url], session, SelfCounters())
    model = PrometheusModel([am.url])
    table = _fleet(firing=2000, pending=500, resolved=500)
    pending = _keys(table, lifecycle.PENDING)

    # First send: every firing and resolved alert at once, in batches of 1000; never pending.
    sent = await _tick(sender, table, model, [am], T0)
    assert len(sent[am.url]) == 2500 and not sent[am.url] & set(pending)
    # No resend before the resend delay.
    assert (await _tick(sender, table, model, [am], T0 + 1_000))[am.url] == set()

    # Pending alerts that fire are sent at once (a second cohort, 30 s after the first).
    for key in pending:
        table.rows[key] = Occurrence(lifecycle.FIRING, T0 + 30_000)
    assert (await _tick(sender, table, model, [am], T0 + 30_000))[am.url] == set(pending)
    assert (await _tick(sender, table, model, [am], T0 + 59_999))[am.url] == set()
    # After the resend delay: the first cohort and the resolved alerts again, not the second.
    assert len((await _tick(sender, table, model, [am], T0 + 60_000))[am.url]) == 2500

    # A resolve is sent at once (endsAt = the resolve time), within the resend delay.
    resolving = _keys(table, lifecycle.FIRING)[:300]
    for key in resolving:
        table.rows[key] = Occurrence(lifecycle.RESOLVED, T0, T0 + 61_000)
    assert (await _tick(sender, table, model, [am], T0 + 61_000))[am.url] == set(resolving)
    # A re-fire after the resolve is a new occurrence: sent at once too.
    refiring = resolving[:100]
    for key in refiring:
        table.rows[key] = Occurrence(lifecycle.FIRING, T0 + 62_000)
    assert (await _tick(sender, table, model, [am], T0 + 62_000))[am.url] == set(refiring)

    # Alerts gone from the table are forgotten by the bookkeeping...
    gone = _keys(table, lifecycle.FIRING)[-100:] + _keys(table, lifecycle.RESOLVED)[-100:]
    kept = {key: table.rows.pop(key) for key in gone}
    assert (await _tick(sender, table, model, [am], T0 + 63_000))[am.url] == set()
    sendable = sum(o.state != lifecycle.PENDING for o in table.rows.values())
    assert sender._sent[am.url].height == sendable  # noqa: SLF001 - the bookkeeping is the subject
    # ...so when one comes back (same occurrence), it is sent at once.
    table.rows.update(kept)
    assert (await _tick(sender, table, model, [am], T0 + 64_000))[am.url] == set(gone)

    # The rest of the schedule, checked against the model tick by tick (resolved alerts are
    # re-sent every resend delay while they are kept).
    for now in range(T0 + 65_000, T0 + 121_000, 5_000):
        await _tick(sender, table, model, [am], now)
    assert len((await _tick(sender, table, model, [am], T0 + 121_000))[am.url]) == 200  # the resolves of T0+61 s
    for now in range(T0 + 122_000, T0 + 200_000, 7_000):
        await _tick(sender, table, model, [am], now)


async def test_failing_url_keeps_everything_due_while_the_healthy_one_follows_the_schedule(
    fakes: tuple[FakeAlertmanager, FakeAlertmanager], session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = fakes
    sender = _sender([good.url, bad.url], session, SelfCounters())
    model = PrometheusModel([good.url, bad.url])
    table = _fleet(firing=2400, pending=300, resolved=300)
    everything = {k for k, o in table.rows.items() if o.state != lifecycle.PENDING}

    # The second batch of 1000 fails: the first stays delivered, the rest is not even tried.
    bad.statuses = [200, 500]
    sent = await _tick(sender, table, model, [good, bad], T0)
    assert sent[good.url] == everything and len(sent[bad.url]) == 2000
    # Then it is down: each send tries what it has not got, from the first batch on, and only
    # that batch is built while it fails.
    bad.status = 500
    built: list[int] = []
    real_bodies = alertmanager.alert_bodies

    def counting(rows: pl.DataFrame, *args: Any) -> pl.DataFrame:
        built.append(rows.height)
        return real_bodies(rows, *args)

    monkeypatch.setattr(alertmanager, "alert_bodies", counting)
    sent = await _tick(sender, table, model, [good, bad], T0 + 1_000)
    assert sent[good.url] == set() and len(sent[bad.url]) == 1000
    for now in range(T0 + 2_000, T0 + 60_000, 10_000):
        assert (await _tick(sender, table, model, [good, bad], now))[good.url] == set()
    assert max(built) == 1000
    # The healthy one is re-sent everything at T0 + 60 s; the failing one still only tries.
    sent = await _tick(sender, table, model, [good, bad], T0 + 60_000)
    assert sent[good.url] == everything
    # Back up: it gets everything it missed at once (also what it got at T0: now due for
    # resend), then follows its own schedule.
    bad.status = 200
    sent = await _tick(sender, table, model, [good, bad], T0 + 61_000)
    assert sent[bad.url] == everything and sent[good.url] == set()
    for now in range(T0 + 62_000, T0 + 120_000, 3_000):
        await _tick(sender, table, model, [good, bad], now)
    sent = await _tick(sender, table, model, [good, bad], T0 + 120_000)
    assert sent[good.url] == everything and sent[bad.url] == set()
    sent = await _tick(sender, table, model, [good, bad], T0 + 121_000)
    assert sent[bad.url] == everything and sent[good.url] == set()


def test_bodies_built_column_wise_equal_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Label values with every character class urlencode and JSON treat specially, empty values,
    non-string and null annotations, other JSON encoders: the same JSON value either way."""
    values = ["plain-value.1", "a b", "&=%+/?#:,", 'say "hi"', "back\\slash", "é€😀", "tab\tnew\nline"]
    values += ["\x01\x7f", "~._-", ""]
    rows: list[dict[str, Any]] = []
    for i in range(600):
        labels: dict[str, Any] = {"alertname": f"Rule{i % 3}", "severity": "warning", "vm": values[i % len(values)]}
        labels["hci_cluster"] = values[(i // len(values)) % len(values)]
        annotations: dict[str, Any] = {"summary": values[i % 7], "description": f"VM {values[i % len(values)]}"}
        if i % 3 == 2:
            labels = {"alertname": labels["alertname"], "with-dash": "x"}  # not a Prometheus label name
        if i % 13 == 0:
            annotations["runbook_url"] = None
        if i % 17 == 0:
            annotations["count"] = 3
        encoded = pl.select(
            pl.struct([pl.lit(v, dtype=pl.String).alias(k) for k, v in labels.items()]).struct.json_encode()
        ).item()
        rows.append(
            {
                "key": i,
                "alertname": labels["alertname"],
                "state": lifecycle.RESOLVED if i % 5 == 0 else lifecycle.FIRING,
                "fired_at_ms": T0 + i,
                "resolved_at_ms": T0 + 10_000 + i if i % 5 == 0 else None,
                "labels": json.dumps(labels) if i % 11 == 0 else encoded,
                "annotations": json.dumps(annotations, separators=(",", ":")) if i % 2 else json.dumps(annotations),
            }
        )
    frame = pl.DataFrame(rows, schema_overrides={"key": pl.UInt64, "resolved_at_ms": pl.Int64})
    base = 'http://rpowatch.example:9464/a "b"'
    bodies = dict(alert_bodies(frame, T0 + 50_000, LEASE_MS, base).iter_rows())
    assert len(bodies) == frame.height
    for r in rows:
        times = (r["fired_at_ms"], r["resolved_at_ms"], T0 + 50_000)
        expected = reference_body(r["labels"], r["annotations"], r["state"], *times, LEASE_MS, base)
        assert json.loads(bodies[r["key"]]) == expected, r

    # The engine's own shape never needs the reference.
    def unused(*args: Any) -> Any:
        raise AssertionError("built one at a time")

    monkeypatch.setattr(alertmanager, "reference_body", unused)
    result = _fleet(firing=50, pending=0, resolved=50).result(T0)
    engine_shaped = result.with_details(
        result.alerts.with_columns(pl.int_range(pl.len(), dtype=pl.UInt64).alias("key"))
    )
    assert alert_bodies(engine_shaped, T0, LEASE_MS, base).height == 100
