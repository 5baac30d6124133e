"""Service._consume: decoding runs a batch ahead, applying and committing stay in order.
Service._tick_loop: ticks keep their schedule, and ticks missed in a stall are skipped."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ingest.contracts import Stream
from ingest.deadletter import MemoryDeadLetterSink
from ingest.source import Batch
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service, evaluation_instant, next_tick_at
from rules.engine import TickResult, empty_result


class ListSource:
    """A source of a fixed list of batches; records what was committed, in order."""

    name = "list"
    up = True

    def __init__(self, count: int) -> None:
        self.sent = [Batch(self.name, Stream.REPLICATION, [f"{n}".encode()], ["t"], [0], [n], 0) for n in range(count)]
        self.committed: list[int] = []
        self.all_committed = asyncio.Event()

    async def batches(self) -> AsyncIterator[Batch]:
        for batch in self.sent:
            yield batch
        await asyncio.Event().wait()  # a source waits for more; it never ends by itself

    async def commit(self, batch: Batch) -> None:
        self.committed.append(batch.offsets[0])
        if len(self.committed) == len(self.sent):
            self.all_committed.set()

    async def close(self) -> None:
        pass


def service() -> Service:
    settings = Settings(http={"port": 0})
    return Service(settings, load_rule_packs(settings), [], MemoryDeadLetterSink())


async def consume_until_committed(
    svc: Service,
    source: ListSource,
    decode: Callable[[Batch], Awaitable[object]],
    apply: Callable[[Batch, object], Awaitable[None]],
) -> None:
    """Run the service's pipeline over `source` with these decode and apply steps until every
    batch is committed, then stop it."""
    svc._decode = decode  # type: ignore[method-assign,assignment]
    svc._apply = apply  # type: ignore[method-assign,assignment]
    consuming = asyncio.create_task(svc._consume(source))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(source.all_committed.wait(), 10)
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)
        svc._executor.shutdown()
        svc._decoder.shutdown()


async def test_batches_are_applied_and_committed_in_order_while_the_next_is_decoded() -> None:
    svc, source = service(), ListSource(12)
    rng = random.Random(3)
    events: list[tuple[str, int]] = []
    decoding = 0
    overlapped = 0

    async def decode(batch: Batch) -> object:
        nonlocal decoding
        decoding += 1
        events.append(("decode", batch.offsets[0]))
        await asyncio.sleep(rng.uniform(0, 0.01))  # later batches may finish decoding first
        decoding -= 1
        return batch.offsets[0]

    async def apply(batch: Batch, decoded: object) -> None:
        nonlocal overlapped
        assert decoded == batch.offsets[0]
        overlapped += decoding > 0  # the next batch is being decoded meanwhile
        events.append(("apply", batch.offsets[0]))
        await asyncio.sleep(rng.uniform(0, 0.01))

    await consume_until_committed(svc, source, decode, apply)
    assert source.committed == list(range(12))
    assert [n for what, n in events if what == "apply"] == list(range(12))
    # Each batch is decoded before it is applied, and at most two batches ahead of the applied ones.
    for n in range(12):
        assert events.index(("decode", n)) < events.index(("apply", n))
        if n >= 3:
            assert events.index(("decode", n)) > events.index(("apply", n - 3))
    assert overlapped > 0


async def test_a_failing_apply_stops_consuming_with_its_error() -> None:
    svc, source = service(), ListSource(5)

    async def decode(batch: Batch) -> object:
        return None

    async def apply(batch: Batch, decoded: object) -> None:
        if batch.offsets[0] == 2:
            raise RuntimeError("engine failed")

    svc._decode = decode  # type: ignore[method-assign]
    svc._apply = apply  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="engine failed"):
            await asyncio.wait_for(svc._consume(source), 10)  # type: ignore[arg-type]
    finally:
        svc._executor.shutdown()
        svc._decoder.shutdown()
    assert source.committed == [0, 1]  # nothing after the failed batch is committed


async def test_a_commit_overlaps_the_next_apply_and_commits_stay_in_order() -> None:
    svc, source = service(), ListSource(10)
    rng = random.Random(5)
    events: list[tuple[str, int]] = []
    applying = False
    overlapped = 0
    commit = source.commit

    async def slow_commit(batch: Batch) -> None:
        nonlocal overlapped
        events.append(("commit", batch.offsets[0]))
        await asyncio.sleep(rng.uniform(0.005, 0.02))  # a round trip to the broker
        overlapped += applying  # the next batch was being applied meanwhile
        await commit(batch)

    async def decode(batch: Batch) -> object:
        return None

    async def apply(batch: Batch, decoded: object) -> None:
        nonlocal applying
        events.append(("apply", batch.offsets[0]))
        applying = True
        await asyncio.sleep(rng.uniform(0.005, 0.02))
        applying = False

    source.commit = slow_commit  # type: ignore[method-assign]
    await consume_until_committed(svc, source, decode, apply)
    assert source.committed == list(range(10))
    for n in range(10):
        assert events.index(("apply", n)) < events.index(("commit", n))  # applied, then committed
        if n:
            assert events.index(("commit", n - 1)) < events.index(("commit", n))
    assert overlapped > 0


def test_the_next_tick_keeps_the_schedule_or_starts_at_once_when_late() -> None:
    assert next_tick_at(10.0, 10.3, 1.0) == 11.0  # on time: one interval later, no drift
    assert next_tick_at(10.0, 11.0, 1.0) == 11.0
    assert next_tick_at(10.0, 11.2, 1.0) == 11.2  # the tick overran: the next starts now
    assert next_tick_at(10.0, 40.0, 1.0) == 40.0  # a 30 s stall: one tick now, not thirty


def test_ticks_evaluate_at_the_instants_of_their_schedule_until_the_clock_drifts_away() -> None:
    assert evaluation_instant(None, 10_007, 1_000) == 10_007  # the first: the clock's
    assert evaluation_instant(10_007, 11_012, 1_000) == 11_007  # on schedule: one interval on
    assert evaluation_instant(10_007, 10_998, 1_000) == 11_007  # a little early too
    assert evaluation_instant(10_007, 11_600, 1_000) == 11_600  # overran: the clock's
    assert evaluation_instant(10_007, 40_000, 1_000) == 40_000  # a stall
    assert evaluation_instant(10_007, 5_000, 1_000) == 5_000  # the clock stepped back


class StallingEngine:
    """Ticks instantly, except the first, which takes `stall_s`; records when each started."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.started: list[float] = []

    def tick(self, now_ms: int, sources: object = None) -> TickResult:
        self.started.append(time.monotonic())
        if len(self.started) == 1:
            time.sleep(self.stall_s)
        return empty_result()

    def prepare(self, now_ms: int, next_tick_in_ms: int) -> bool:
        return False


class RecordingEngine:
    """Records the instant of each tick and the instant each prepare is for."""

    def __init__(self) -> None:
        self.ticks: list[int] = []
        self.prepared: list[int] = []

    def tick(self, now_ms: int, sources: object = None) -> TickResult:
        self.ticks.append(now_ms)
        return empty_result()

    def prepare(self, now_ms: int, next_tick_in_ms: int) -> bool:
        self.prepared.append(now_ms + next_tick_in_ms)
        return False


async def run_tick_loop(engine: object, interval: float, seconds: float) -> Service:
    """The service's tick loop over `engine` for `seconds`; returns the service."""
    settings = Settings(http={"port": 0}, evaluation={"interval": interval})
    svc = Service(settings, load_rule_packs(settings), [], MemoryDeadLetterSink())
    svc.engine = engine  # type: ignore[assignment]
    loop_task = asyncio.create_task(svc._tick_loop())
    try:
        await asyncio.sleep(seconds)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        svc._executor.shutdown()
        svc._decoder.shutdown()
    return svc


async def test_each_tick_is_prepared_for_the_instant_it_evaluates() -> None:
    engine = RecordingEngine()
    svc = await run_tick_loop(engine, interval=0.05, seconds=0.6)
    prepared = svc.registry.get_sample_value("rpowatch_evaluation_prepare_duration_seconds_count")
    # Each preparation timed (the last may be cut short by the cancellation).
    assert prepared is not None and len(engine.prepared) - 1 <= prepared <= len(engine.prepared)
    assert len(engine.prepared) >= 5
    ticks = engine.ticks
    assert len(ticks) >= 5, ticks
    on_schedule = [b - a == 50 for a, b in zip(ticks, ticks[1:])]
    # Exactly one interval apart, whatever the event loop's delays, unless it fell half an
    # interval behind (then the clock's instant, which nothing was prepared for).
    assert sum(on_schedule) >= len(on_schedule) / 2, ticks
    for k, kept in enumerate(on_schedule):
        if kept:
            assert engine.prepared[k] == ticks[k + 1]


class FailingEngine(RecordingEngine):
    """Fails its first two ticks and its first preparation."""

    def tick(self, now_ms: int, sources: object = None) -> TickResult:
        result = super().tick(now_ms, sources)
        if len(self.ticks) <= 2:
            raise RuntimeError(f"tick {len(self.ticks)} broke")
        return result

    def prepare(self, now_ms: int, next_tick_in_ms: int) -> bool:
        super().prepare(now_ms, next_tick_in_ms)
        if len(self.prepared) == 1:
            raise RuntimeError("prepare broke")
        return False


async def test_a_failed_tick_or_preparation_is_logged_and_evaluation_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    engine = FailingEngine()
    with caplog.at_level(logging.ERROR, logger="rpowatch.service"):
        svc = await run_tick_loop(engine, interval=0.05, seconds=0.5)
    assert len(engine.ticks) >= 6, engine.ticks  # it went on ticking
    assert len(engine.prepared) >= 2  # and preparing, after the failed one
    assert svc._ticked  # the ticks after the failures produced results
    failures = [r for r in caplog.records if "evaluation failed" in r.getMessage()]
    # Three failures within a minute: the first logged with its traceback, the others held back.
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "tick 1 broke" in caplog.text


async def test_ticks_missed_during_a_stall_are_skipped_not_run_back_to_back() -> None:
    interval = 0.05
    engine = StallingEngine(stall_s=0.6)  # twelve intervals
    await run_tick_loop(engine, interval, seconds=1.0)
    after_stall = engine.started[1:]
    assert len(after_stall) >= 4, engine.started
    gaps = [b - a for a, b in zip(after_stall, after_stall[1:])]
    # Run back to back, the eleven missed ticks would start within a few milliseconds of each
    # other (measured: a dozen gaps of a few ms); on schedule, a gap is an interval give or take
    # the event loop's delays.
    assert sum(gap < interval / 5 for gap in gaps) <= 1, gaps
    assert len(after_stall) <= 0.4 / interval + 3, len(after_stall)
