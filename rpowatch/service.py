"""The service: sources → decode → engine → snapshot, /metrics, Alertmanager.

The only place that knows ingest/, rules/ and exporters/. CPU work (decode, apply, tick) runs in
a thread pool so Kafka heartbeats and scrapes stay responsive; polars releases the GIL.

Per batch, in this order (at-least-once; every step is idempotent on replay):
  1. decode and validate the whole batch;
  2. apply the valid rows to the engine's state;
  3. hand the rejects to the dead-letter sink (retried until it takes them);
  4. commit the batch's positions at the source.
"""

from __future__ import annotations

import asyncio
from collections import Counter
import functools
import json
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from exporters.alertmanager import AlertmanagerSender
from exporters.history.runtime import HistoryRuntime
from exporters.http import bound_port, make_app, start_http
from exporters.metrics import RpowatchCollector, make_evaluation_histogram, make_prepare_histogram
from exporters.snapshot import SelfCounters, Snapshot, SnapshotHolder
from ingest.adapters import CANONICAL, StreamOutcome, adapt_and_decode, build_adapters
from ingest.contracts import Stream
from ingest.decode import DecodeLimits, Decoded, decode_batch
from ingest.health import SourceHealth, source_health_frame
from ingest.source import Batch, DeadLetterSink, PartitionedSource, Source
from rpowatch.config import Settings
from rpowatch.wiring import adapter_settings
from rules.engine import Engine, EngineSettings, TickResult
from rules.pack import RulePack

logger = logging.getLogger(__name__)

DEAD_LETTER_RETRY_MAX_S = 30.0
COMMIT_ON_STOP_S = 5.0  # how long a stopping pipeline waits for its last commit


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(
        heartbeat_timeout_s=settings.evaluation.heartbeat_timeout,
        dedupe_window_s=settings.evaluation.dedupe_window,
        resolved_retention_s=settings.alertmanager.resolved_retention,
        at_risk_ratio=settings.evaluation.at_risk_ratio,
        lookahead_s=settings.evaluation.lookahead,
        monitoring_window_s=settings.evaluation.monitoring_window,
        rolling_window_s=settings.evaluation.rolling_window,
        ingest_stall_s=settings.evaluation.ingest_stall,
        aggregate_refresh_s=settings.evaluation.aggregate_refresh,
        policies=settings.effective_policies(),
        link_capacity_bytes_per_s=tuple((c.hci_cluster, c.target, c.bytes_per_s) for c in settings.link_capacities),
    )


@dataclass
class Service:
    settings: Settings
    pack: RulePack
    sources: list[Source]
    dead_letters: DeadLetterSink
    clock: Callable[[], float] = time.time
    on_tick: Callable[[TickResult], None] | None = None

    engine: Engine = field(init=False)
    holder: SnapshotHolder = field(init=False)
    counters: SelfCounters = field(init=False)
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.engine = Engine(self.pack, engine_settings(self.settings))
        self.holder = SnapshotHolder()
        self.counters = SelfCounters()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(
            RpowatchCollector(
                self.holder,
                export_per_vm=self.settings.export.per_vm,
                export_max_vms=self.settings.export.max_vms,
                # Series that read 0 from the start, rather than appearing on first use.
                known_alerts=[(r.name, r.spec.severity) for r in self.pack.rules],
                alertmanager_urls=self.settings.alertmanager.urls,
            )
        )
        self._evaluation = make_evaluation_histogram(self.registry)
        self._preparation = make_prepare_histogram(self.registry)
        self._limits = DecodeLimits(
            max_payload_bytes=self.settings.ingest.max_payload_bytes,
            max_future_skew_ms=int(self.settings.evaluation.max_future_skew * 1000),
        )
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rpowatch-cpu")
        # Decoding has its own thread: it runs a batch ahead of the engine (see `_consume`) and
        # never makes a tick wait for a free worker.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rpowatch-decode")
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sender: AlertmanagerSender | None = None
        self._send_task: asyncio.Task[None] | None = None
        self._ticked = False
        self.port: int | None = None
        self.history: HistoryRuntime | None = None
        # Per (source, stream) accepted / rejected counts for the source-health rules.
        self._health = SourceHealth()
        for source in self.sources:
            self._health.register(source.name, [s.value for s in Stream])
        # Kafka-style sources whose partitions (and so instances) move between group members.
        self._partitioned = {s.name: s for s in self.sources if isinstance(s, PartitionedSource)}
        # Readers of real telemetry formats, by format (docs/adapters.md).
        self._adapters = build_adapters(adapter_settings(self.settings))

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        http = self.settings.http
        # History writes on its own threads: a slow disk never delays a tick.
        self.history = HistoryRuntime.from_settings(self.settings.history) if self.settings.history.enabled else None
        app = make_app(self.holder, self.registry, self.readiness, self.history.store if self.history else None)
        self._runner = await start_http(app, http.host, http.port)
        self.port = bound_port(self._runner)
        base = http.external_url or f"http://{http.host}:{self.port}"
        if self.settings.alertmanager.urls:
            self._session = aiohttp.ClientSession()
            am = self.settings.alertmanager
            self._sender = AlertmanagerSender(
                urls=list(am.urls),
                session=self._session,
                counters=self.counters,
                evaluation_interval_s=self.settings.evaluation.interval,
                resend_delay_s=am.resend_delay,
                timeout_s=am.timeout,
                generator_url_base=base,
            )
        for partitioned in self._partitioned.values():
            partitioned.attach(self)
        for source in self.sources:
            self.counters.set_source_up(source.name, False)
            self._tasks.append(asyncio.create_task(self._consume(source), name=f"consume-{source.name}"))
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="tick"))
        logger.info("rpowatch serving on %s (metrics at %s/metrics)", base, base)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._send_task is not None:
            await asyncio.gather(self._send_task, return_exceptions=True)
        for source in self.sources:
            await source.close()
        await self.dead_letters.close()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.history is not None:
            await asyncio.to_thread(self.history.close)  # writes the unfinished interval
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._decoder.shutdown(wait=True, cancel_futures=True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def readiness(self) -> tuple[bool, str]:
        if not self._ticked:
            return False, "no evaluation yet"
        down = [s.name for s in self.sources if not s.up]
        if down:
            return False, f"source not connected: {', '.join(down)}"
        rebuilding = [name for name, s in self._partitioned.items() if s.rebuilding]
        if rebuilding:
            return False, f"rebuilding the state of newly assigned partitions: {', '.join(rebuilding)}"
        return True, "ready"

    # --- partition hand-over (ingest.source.InstanceState) -------------------------------------

    async def drop_instances(self, cluster_ids: Collection[str]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.drop_clusters, list(cluster_ids))

    async def hold_instances(self, cluster_ids: Collection[str]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.hold, list(cluster_ids))

    async def release_instances(self, cluster_ids: Collection[str]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.engine.release, list(cluster_ids))

    # --- ingest ------------------------------------------------------------------------------

    async def _consume(self, source: Source) -> None:
        """Batches of one source, decoded, applied and committed in order. Decoding runs one
        batch ahead, on its own thread, while the batch before it is applied: on 2 cores the
        two stages overlap instead of taking turns (bench/ingest). A batch's commit (a round
        trip to the broker) overlaps the next batch's apply, and commits stay in order. At most
        three batches are in the pipeline besides the one being committed: one being applied,
        one decoded and waiting, one being decoded."""
        decoded: asyncio.Queue[tuple[Batch, asyncio.Future[Decoded | list[StreamOutcome]]]] = asyncio.Queue(maxsize=1)

        async def apply_in_order() -> None:
            committing: asyncio.Task[None] | None = None
            try:
                while True:
                    batch, decoding = await decoded.get()
                    await self._apply(batch, await decoding)
                    if committing is not None:
                        await committing  # in order: a later position never goes first
                    committing = asyncio.create_task(source.commit(batch), name=f"commit-{source.name}")
            finally:
                if committing is not None:
                    # Stopping: let the last commit land (or give up on it after a while; its
                    # records are then delivered again, which changes nothing).
                    await asyncio.wait({committing}, timeout=COMMIT_ON_STOP_S)
                    committing.cancel()
                    await asyncio.gather(committing, return_exceptions=True)

        applier = asyncio.create_task(apply_in_order(), name=f"apply-{source.name}")
        try:
            async for batch in source.batches():
                queued = asyncio.ensure_future(decoded.put((batch, asyncio.ensure_future(self._decode(batch)))))
                await asyncio.wait({queued, applier}, return_when=asyncio.FIRST_COMPLETED)
                if applier.done():
                    queued.cancel()
                    applier.result()  # raises what stopped it
        finally:
            applier.cancel()
            await asyncio.gather(applier, return_exceptions=True)

    async def handle(self, batch: Batch) -> None:
        """Decode, apply and dead-letter one batch (steps 1–3 above)."""
        await self._apply(batch, await self._decode(batch))

    async def _decode(self, batch: Batch) -> Decoded | list[StreamOutcome]:
        """Step 1, off the event loop: the batch's valid events and rejects per stream."""
        loop = asyncio.get_running_loop()
        if batch.format != CANONICAL:
            adapter = self._adapters[batch.format]  # formats are validated with the configuration
            outcomes, ignored = await loop.run_in_executor(self._decoder, adapt_and_decode, adapter, batch, self._limits)
            if ignored:
                logger.debug("%d %s records from %s carry nothing rpowatch models", ignored, batch.format, batch.source)
            return outcomes
        return await loop.run_in_executor(
            self._decoder, decode_batch, batch.stream, batch.payloads, batch.received_at_ms, self._limits
        )

    async def _apply(self, batch: Batch, decoded: Decoded | list[StreamOutcome]) -> None:
        """Steps 2–3: apply the valid events, count, and dead-letter the rejects."""
        loop = asyncio.get_running_loop()
        self.counters.mark_source_event(batch.source, time.time())
        if isinstance(decoded, list):
            await self._apply_adapted(batch, decoded)
            return
        partitioned = self._partitioned.get(batch.source)
        if partitioned is not None:  # notes where the instances came from; holds rebuilding ones
            await partitioned.before_apply(batch, decoded.valid, decoded.rejects)
        now_ms = int(self.clock() * 1000)
        await loop.run_in_executor(
            self._executor, self.engine.apply, batch.stream, decoded.valid, now_ms, batch.source
        )
        self.counters.count_events(batch.stream.value, batch.source, decoded.valid.height)
        self._health.record_batch(
            batch.source, batch.stream.value, batch.partitions, decoded.rejects.get_column("index"), now_ms
        )
        if decoded.rejects.height:
            for reason, count in decoded.rejects.group_by("reason").len().iter_rows():
                self.counters.count_invalid(batch.stream.value, reason, count)
            logger.debug("%d invalid %s records from %s", decoded.rejects.height, batch.stream.value, batch.source)
            await self._dead_letter(batch, decoded.rejects)

    async def _apply_adapted(self, batch: Batch, outcomes: list[StreamOutcome]) -> None:
        """Steps 2–3 for a batch in a real telemetry format: its adapter and the decoder ran off
        the event loop (ingest.adapters.adapt_and_decode) and yielded, per stream, valid events
        and the rejected source records, which are applied, counted and dead-lettered exactly
        like a canonical batch's."""
        loop = asyncio.get_running_loop()
        partitioned = self._partitioned.get(batch.source)
        now_ms = int(self.clock() * 1000)
        for outcome in outcomes:
            stream = outcome.stream
            if partitioned is not None:
                await partitioned.before_apply(outcome.decoded, outcome.valid, outcome.decoded_rejects)
            await loop.run_in_executor(self._executor, self.engine.apply, stream, outcome.valid, now_ms, batch.source)
            self.counters.count_events(stream.value, batch.source, outcome.valid.height)
            # By partition: the records of the valid events, and the rejected source records.
            made = outcome.decoded.partitions
            accepted = Counter(made) - Counter(made[i] for i in outcome.decoded_rejects.get_column("index"))
            letters = outcome.dead_letters.partitions
            rejected = Counter(letters[i] for i in outcome.rejects.get_column("index"))
            self._health.record_counts(batch.source, stream.value, accepted, rejected, now_ms)
            if outcome.rejects.height:
                for reason, count in outcome.rejects.group_by("reason").len().iter_rows():
                    self.counters.count_invalid(stream.value, reason, count)
                await self._dead_letter(outcome.dead_letters, outcome.rejects)

    async def _dead_letter(self, batch: Batch, rejects: object) -> None:
        delay = 0.5
        while True:
            try:
                await self.dead_letters.send(batch, rejects)  # type: ignore[arg-type]
                return
            except Exception as exc:  # any sink failure: keep the records, retry, do not commit
                logger.warning("dead-letter sink failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, DEAD_LETTER_RETRY_MAX_S)

    # --- evaluation --------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.evaluation.interval
        interval_ms = int(interval * 1000)
        next_at = loop.time()
        instant_ms: int | None = None
        failed = _ThrottledFailures()
        while True:
            instant_ms = evaluation_instant(instant_ms, int(self.clock() * 1000), interval_ms)
            try:
                await self._evaluate(loop, instant_ms)
                # The idle time before the next tick does what that tick would otherwise pay
                # for, for the instant it will evaluate if it keeps to the schedule.
                clock_ms = int(self.clock() * 1000)
                started = time.perf_counter()
                await loop.run_in_executor(
                    self._executor, self.engine.prepare, clock_ms, instant_ms + interval_ms - clock_ms
                )
                self._preparation.observe(time.perf_counter() - started)
            except Exception:  # one failed evaluation must not end evaluation: the next tries again
                failed.log(loop.time())
            next_at = next_tick_at(next_at, loop.time(), interval)
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _evaluate(self, loop: asyncio.AbstractEventLoop, instant_ms: int) -> None:
        """One tick at `instant_ms`, and everything that follows from it."""
        health = source_health_frame(self._health, {s.name: s.up for s in self.sources}, instant_ms)
        result = await loop.run_in_executor(
            self._executor, functools.partial(self.engine.tick, instant_ms, sources=health)
        )
        self._evaluation.observe(result.duration_s)
        for source in self.sources:
            self.counters.set_source_up(source.name, source.up)
        self.holder.set(Snapshot(result, self.counters.freeze()))
        self._ticked = True
        _log_transitions(result)
        if self.on_tick is not None:
            self.on_tick(result)
        if self.history is not None:
            self.history.offer(result)  # O(1): the writer thread takes the newest tick
        if self._sender is not None and (self._send_task is None or self._send_task.done()):
            # A slow Alertmanager must not delay evaluation; the sender works from the
            # latest state, so a skipped tick is caught up by the next send.
            self._send_task = asyncio.create_task(self._sender.send(result), name="alertmanager-send")


FAILURE_LOG_EVERY_S = 60.0


class _ThrottledFailures:
    """Logs a failed evaluation with its traceback, then at most once a minute with the number
    of failures in between: a tick failing every second must not flood the log."""

    def __init__(self) -> None:
        self.last_logged: float | None = None
        self.since = 0

    def log(self, now: float) -> None:
        self.since += 1
        if self.last_logged is not None and now - self.last_logged < FAILURE_LOG_EVERY_S:
            return
        logger.exception("evaluation failed (%d failures since the last report); the next tick tries again", self.since)
        self.last_logged, self.since = now, 0


def evaluation_instant(previous_ms: int | None, clock_ms: int, interval_ms: int) -> int:
    """The instant a tick evaluates the rules at: its predecessor's plus one interval while the
    ticks keep to their schedule, as Prometheus evaluates a rule group at the instants of its
    schedule rather than whenever the evaluation happens to start. So the next tick's instant
    is known in advance and the idle time before it can evaluate what depends only on the
    instant and the state (Engine.prepare). The clock's time when the two are more than half
    an interval apart: after a stall, skipped ticks or a step of the clock."""
    if previous_ms is not None:
        following = previous_ms + interval_ms
        if abs(clock_ms - following) * 2 <= interval_ms:
            return following
    return clock_ms


def next_tick_at(scheduled_at: float, now: float, interval: float) -> float:
    """When the tick after the one scheduled at `scheduled_at` starts: an interval later, so
    the schedule does not drift; or now, when that time has already passed (the tick, or a
    pause of the whole process, overran). The ticks missed meanwhile are skipped rather than
    run back to back: each evaluates the fleet as it is now, so a burst would only repeat the
    same work while ingest and scrapes wait for the CPU."""
    following = scheduled_at + interval
    if following >= now:
        return following
    missed = int((now - following) // interval) + 1
    if missed > 1:
        logger.warning(
            "evaluation fell %.1f s behind its %g s interval; %d ticks skipped", now - following, interval, missed - 1
        )
    return now


LOGGED_TRANSITIONS = 20  # per tick, one line each; beyond that a count per alert and transition


def _log_transitions(result: TickResult) -> None:
    """One line per transition, up to LOGGED_TRANSITIONS; then counts. Runs on the event loop,
    and a fleet-wide condition can fire thousands of alerts in one tick."""
    changes = result.changes
    if changes.is_empty() or not logger.isEnabledFor(logging.INFO):
        return
    head = changes.head(LOGGED_TRANSITIONS)
    described = result.with_details(head) if "labels" not in head.columns else head
    for name, transition, labels in described.select("alertname", "transition", "labels").iter_rows():
        identity = {k: v for k, v in json.loads(labels or "{}").items() if k not in ("alertname", "severity", "service")}
        logger.info("alert %s %s %s", name, transition, identity)
    if changes.height > LOGGED_TRANSITIONS:
        counts = changes.slice(LOGGED_TRANSITIONS).group_by("alertname", "transition").len().sort("alertname", "transition")
        summary = ", ".join(f"{name} {transition} {n}" for name, transition, n in counts.iter_rows())
        logger.info("and %d more alert transitions: %s", changes.height - LOGGED_TRANSITIONS, summary)
