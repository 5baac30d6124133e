"""Benchmark of the Alertmanager sender at fleet scale.

    python3 -m bench.sender [--alerts 200000] [--replicas 1]

Builds a `rules.engine.TickResult` holding `--alerts` standing alerts with their details (labels
and annotations JSON shaped as the engine renders them), starts a real HTTP server on 127.0.0.1
in a child process that accepts `POST /api/v2/alerts` and counts the alerts it receives, and
times `AlertmanagerSender.send`:

- **flood**: the first send of a fresh sender, every alert due;
- **steady state**: a tick after the flood where about 1/60 of the alerts are due for their
  resend (the alerts fired in 60 cohorts one tick apart, so their resends are spread over the
  60 s resend delay, as in the service).

In the same run, interleaved, it times the implementation the sender replaced (`BaselineSender`
below, kept verbatim) on the same tables against its own server port, and prints the ratio
baseline / current. It also records the longest the event loop went without running while a
send was in progress (a 1 ms ticker), which is what scrapes and ingest would have waited.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import multiprocessing
import os
import re
import statistics
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import aiohttp
import polars as pl
from aiohttp import web

from bench._common import machine_line, summary
from exporters.alertmanager import AlertmanagerSender, rfc3339
from exporters.snapshot import SelfCounters
from rules import lifecycle
from rules.engine import TickResult, empty_result
from rules.state import FleetState
from rules.views import ViewParams, build_views

logger = logging.getLogger("bench.sender.baseline")

NOW0_MS = 1_795_000_000_000  # any fixed instant keeps runs comparable
TICK_MS = 1_000  # the engine's tick interval
RESEND_S = 60.0
COHORTS = int(RESEND_S * 1000 // TICK_MS)  # one cohort fires per tick: resends spread over the delay
SITES = ("sea", "ams", "fra", "lon", "syd", "sin", "tor", "dub")
REGIONS = ("westus2", "westeurope", "germanywestcentral", "uksouth", "australiaeast", "southeastasia")

# (alertname, severity, entity labels, share of the alerts, description template): the bench
# fleet of bench/tick.py is dominated by overdue failover and restore tests.
RULES = (
    (
        "FailoverTestOverdue",
        "warning",
        ("vm", "hci_cluster", "target", "technology"),
        0.45,
        "VM {vm} on {hci_cluster}: last test failover {age} s ago, policy requires one every 15552000.0 s.",
    ),
    (
        "RestoreTestOverdue",
        "warning",
        ("vm", "hci_cluster"),
        0.45,
        "VM {vm} on {hci_cluster}: last successful restore test {age} s ago, policy requires one every 7776000.0 s.",
    ),
    (
        "ReplicationRPOBreach",
        "critical",
        ("vm", "hci_cluster", "target", "technology"),
        0.05,
        "VM {vm} on {hci_cluster} replicating to {target} can only be recovered to a point {age} s old; "
        "its RPO is 600.0 s (status replicating).",
    ),
    (
        "VMUnprotected",
        "warning",
        ("vm", "hci_cluster"),
        0.05,
        "VM {vm} on {hci_cluster}: replicated true, backed up false; neither is within its RPO.",
    ),
)


# --- the alert table -------------------------------------------------------------------------


def _format(template: str) -> pl.Expr:
    """`{column}` placeholders → pl.format, as rules/pack.py renders annotations."""
    pieces = re.split(r"\{(\w+)\}", template)
    return pl.format("".join("{}" if i % 2 else p for i, p in enumerate(pieces)), *[pl.col(c) for c in pieces[1::2]])


def _digits(number: pl.Expr, width: int) -> pl.Expr:
    return number.cast(pl.String).str.zfill(width)


def alert_tables(n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`n` alerts (alertname, alert_key, hci_cluster, severity, cohort) and their details, built
    the way the engine builds them: the key joins the entity labels with \\x1f, labels and
    annotations are `struct.json_encode` of string columns. One VM per alert, 100 per instance."""
    alerts: list[pl.DataFrame] = []
    details: list[pl.DataFrame] = []
    start = 0
    for index, (name, severity, label_cols, share, description) in enumerate(RULES):
        count = n - start if index == len(RULES) - 1 else int(n * share)
        i = pl.col("i")
        cluster = i // 100
        site = pl.lit(pl.Series(SITES)).get(cluster % len(SITES))
        asr = cluster % 5 == 0
        frame = pl.DataFrame(pl.int_range(start, start + count, eager=True).alias("i")).with_columns(
            vm=pl.format("vm-{}{}-{}", site, _digits(cluster + 1, 5), _digits(i % 100 + 1, 4)),
            hci_cluster=pl.format("hci-{}-{}", site, _digits(cluster + 1, 5)),
            target=pl.when(asr)
            .then(pl.format("azure:{}", pl.lit(pl.Series(REGIONS)).get(cluster % len(REGIONS))))
            .otherwise(pl.format("hci-{}-{}", site, _digits(cluster + 2, 5))),
            technology=pl.when(asr).then(pl.lit("asr")).otherwise(pl.lit("hyperv_replica")),
            age=((i * 7919) % 9_000_000 + 600).cast(pl.Float64).cast(pl.String),
        )
        start += count
        key = pl.concat_str([pl.col(c) for c in label_cols], separator="\x1f").alias("alert_key")
        labels = pl.struct(
            pl.lit(name).alias("alertname"),
            pl.lit(severity).alias("severity"),
            pl.lit("rpowatch").alias("service"),
            *[pl.col(c) for c in label_cols],
        )
        annotations = pl.struct(
            pl.lit(f"{name}: the condition holds.").alias("summary"),
            _format(description).alias("description"),
            pl.lit(f"https://runbooks.example/rpowatch/{name}.md").alias("runbook_url"),
        )
        alert_id = pl.concat_str(pl.lit(name), key, separator="\x1e").hash(1).alias("alert_id")
        alerts.append(
            frame.select(
                alert_id,
                pl.lit(index, dtype=pl.UInt16).alias("rule"),
                pl.lit(name).alias("alertname"),
                key,
                "hci_cluster",
                pl.lit(severity).alias("severity"),
                (pl.col("i") % COHORTS).alias("cohort"),
            )
        )
        details.append(
            frame.select(
                pl.lit(name).alias("alertname"),
                key,
                labels.struct.json_encode().alias("labels"),
                annotations.struct.json_encode().alias("annotations"),
            )
        )
    # The engine's table comes in no particular order.
    return pl.concat(alerts).sample(fraction=1.0, shuffle=True, seed=7), pl.concat(details)


@dataclass(frozen=True)
class TableResult(TickResult):
    """The engine's TickResult over a table built here: labels and annotations come from a
    fixed frame (alertname, alert_key, labels, annotations) instead of the engine's renderer,
    through the same `with_details` the sender calls."""

    fixed_details: pl.DataFrame = field(default_factory=pl.DataFrame)

    def with_details(self, alerts: pl.DataFrame) -> pl.DataFrame:
        return alerts.join(self.fixed_details, on=["alertname", "alert_key"], how="left")


def tick_result(base: pl.DataFrame, details: pl.DataFrame, fired_cohorts: int, now_ms: int) -> TickResult:
    """The alert table at `now_ms` when cohorts 0 .. fired_cohorts-1 have fired (cohort c at
    NOW0 + c ticks) and the others are pending."""
    fired = pl.col("cohort") < fired_cohorts
    alerts = base.with_columns(
        pl.when(fired).then(pl.lit(lifecycle.FIRING)).otherwise(pl.lit(lifecycle.PENDING)).alias("state"),
        pl.lit(NOW0_MS - 600_000, dtype=pl.Int64).alias("active_at_ms"),
        pl.when(fired).then(NOW0_MS + pl.col("cohort") * TICK_MS).alias("fired_at_ms"),
        pl.lit(now_ms, dtype=pl.Int64).alias("last_true_ms"),
        pl.lit(None, dtype=pl.Int64).alias("resolved_at_ms"),
        pl.lit(now_ms + 30_000, dtype=pl.Int64).alias("describe_at_ms"),
    )
    # Whichever columns the engine's alert table has: the table here carries a superset.
    alerts = alerts.select(lifecycle.ALERT_SCHEMA.names()).cast(lifecycle.ALERT_SCHEMA)
    views = build_views(FleetState(), now_ms, ViewParams())
    return TableResult(views=views, alerts=alerts, changes=empty_result().changes, fixed_details=details)


# --- the baseline: the sender as it was before the polars bookkeeping, verbatim ------------------
# Per alert in Python: a `_Candidate` object per firing/resolved row and dict bookkeeping per URL.
# Only renamed (AlertmanagerSender → BaselineSender); `rfc3339` is the module's own.

Alert = dict[str, Any]


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


class BaselineSender:
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


# --- the Alertmanager stand-in: a real HTTP server in a child process ------------------------


def _serve(ports: int, conn: Connection) -> None:
    asyncio.run(_serve_async(ports, conn))


async def _serve_async(ports: int, conn: Connection) -> None:
    """`ports` servers on 127.0.0.1, each accepting POST /api/v2/alerts and counting the alerts;
    GET /counts on any of them answers every port's count. Sends the port numbers to `conn`."""
    received = [0] * ports

    def handler(index: int) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            received[index] += len(json.loads(await request.read()))
            return web.Response(status=200)

        return handle

    async def counts(request: web.Request) -> web.Response:
        return web.json_response(received)

    numbers: list[int] = []
    for index in range(ports):
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/v2/alerts", handler(index))
        app.router.add_get("/counts", counts)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        numbers.append(runner.addresses[0][1])
    conn.send(numbers)
    conn.close()
    parent = os.getppid()
    while os.getppid() == parent:  # the benchmark was killed: do not outlive it
        await asyncio.sleep(1.0)


# --- measuring -------------------------------------------------------------------------------


class Sender(Protocol):
    async def send(self, result: TickResult) -> None: ...


@dataclass
class Sample:
    seconds: float
    loop_cpu_s: float  # CPU time of the event loop's thread during the send (not worker threads)
    worst_loop_gap_s: float  # longest the event loop went without running the 1 ms ticker
    alerts: int  # alerts the server received during the send


async def _ticker(stop: asyncio.Event, worst: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last)
        last = now


async def timed_send(sender: Sender, result: TickResult, received: Callable[[], Awaitable[int]]) -> Sample:
    before = await received()
    stop, worst = asyncio.Event(), [0.0]
    ticker = asyncio.create_task(_ticker(stop, worst))
    await asyncio.sleep(0.005)  # the ticker runs before the send starts
    started, cpu = time.perf_counter(), time.thread_time()
    await sender.send(result)
    elapsed, loop_cpu = time.perf_counter() - started, time.thread_time() - cpu
    stop.set()
    await ticker
    return Sample(elapsed, loop_cpu, worst[0], await received() - before)


class _Idle:
    async def send(self, result: TickResult) -> None:
        await asyncio.sleep(1.0)


async def _zero() -> int:
    return 0


def _urls(ports: Sequence[int]) -> list[str]:
    return [f"http://127.0.0.1:{p}" for p in ports]


def _sender(
    cls: type[BaselineSender] | type[AlertmanagerSender], ports: Sequence[int], session: aiohttp.ClientSession
) -> Sender:
    return cls(
        urls=_urls(ports),
        session=session,
        counters=SelfCounters(),
        evaluation_interval_s=TICK_MS / 1000,
        generator_url_base="http://rpowatch.example:9464",
        resend_delay_s=RESEND_S,
    )


async def run(args: argparse.Namespace, ports: list[int]) -> dict[str, dict[str, list[Sample]]]:
    base, details = alert_tables(args.alerts)
    old_ports, new_ports = ports[: args.replicas], ports[args.replicas :]
    samples: dict[str, dict[str, list[Sample]]] = {
        phase: {"baseline": [], "current": []} for phase in ("steady", "flood")
    }
    async with aiohttp.ClientSession() as session:

        async def received_by(which: Sequence[int]) -> int:
            async with session.get(f"http://127.0.0.1:{ports[0]}/counts") as response:
                counts: list[int] = await response.json()
            return sum(counts[ports.index(p)] for p in which)

        senders = {
            "baseline": (_sender(BaselineSender, old_ports, session), old_ports),
            "current": (_sender(AlertmanagerSender, new_ports, session), new_ports),
        }
        print(f"warming up: {COHORTS} ticks, one cohort of ~{args.alerts // COHORTS} alerts fires per tick", flush=True)
        for tick in range(COHORTS):
            result = tick_result(base, details, tick + 1, NOW0_MS + tick * TICK_MS)
            for sender, _ in senders.values():
                await sender.send(result)
        # What the 1 ms ticker sees with no send running: this machine's own scheduling noise.
        idle = await timed_send(_Idle(), tick_result(base, details, 0, NOW0_MS), _zero)
        samples["idle"] = {"nothing": [idle]}
        for step in range(args.steady_ticks):
            result = tick_result(base, details, COHORTS, NOW0_MS + (COHORTS + step) * TICK_MS)
            order = ("baseline", "current") if step % 2 == 0 else ("current", "baseline")
            for name in order:
                sender, which = senders[name]
                samples["steady"][name].append(await timed_send(sender, result, functools.partial(received_by, which)))
        for repeat in range(args.flood_repeats):
            print(f"flood {repeat + 1}/{args.flood_repeats}", flush=True)
            result = tick_result(base, details, COHORTS, NOW0_MS + COHORTS * TICK_MS)
            order = ("baseline", "current") if repeat % 2 == 0 else ("current", "baseline")
            for name in order:
                cls = BaselineSender if name == "baseline" else AlertmanagerSender
                which = old_ports if name == "baseline" else new_ports
                fresh = _sender(cls, which, session)
                samples["flood"][name].append(await timed_send(fresh, result, functools.partial(received_by, which)))
    return samples


def report(args: argparse.Namespace, samples: dict[str, dict[str, list[Sample]]]) -> None:
    print(machine_line())
    print(f"{args.alerts:,} firing alerts with details, {args.replicas} Alertmanager URL(s) per sender, max_batch 1000")
    print(
        f"{'':8} {'sender':9} {'median ms':>10} {'p90 ms':>9} {'loop CPU ms':>12} {'worst loop gap ms':>18}"
        f" {'alerts/send':>12}"
    )
    idle = samples["idle"]["nothing"][0]
    print(f"{'idle':8} {'(1 s)':9} {'':>10} {'':>9} {'':>12} {idle.worst_loop_gap_s * 1000:18.1f}")
    for phase in ("steady", "flood"):
        medians: dict[str, tuple[float, float]] = {}
        for name in ("baseline", "current"):
            runs = samples[phase][name]
            stats = summary([s.seconds for s in runs])
            loop_cpu = statistics.median(s.loop_cpu_s for s in runs) * 1000
            medians[name] = (stats["median_ms"], loop_cpu)
            gap = max(s.worst_loop_gap_s for s in runs) * 1000
            posted = sorted({s.alerts for s in runs})
            print(
                f"{phase:8} {name:9} {stats['median_ms']:10.1f} {stats['p90_ms']:9.1f} {loop_cpu:12.1f} {gap:18.1f}"
                f" {posted!s:>12}"
            )
        (old_ms, old_cpu), (new_ms, new_cpu) = medians["baseline"], medians["current"]
        print(f"{phase:8} ratio baseline / current: send {old_ms / new_ms:.1f}, event-loop CPU {old_cpu / new_cpu:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.sender", description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=200_000)
    parser.add_argument("--replicas", type=int, default=1, help="Alertmanager URLs per sender")
    parser.add_argument("--steady-ticks", type=int, default=10)
    parser.add_argument("--flood-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    context = multiprocessing.get_context("spawn")  # no fork of a process running polars threads
    parent, child = context.Pipe()
    server = context.Process(target=_serve, args=(2 * args.replicas, child), daemon=True)
    server.start()
    try:
        ports: list[int] = parent.recv()
        report(args, asyncio.run(run(args, ports)))
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
