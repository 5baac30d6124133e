"""Benchmark of ingestion from a real Kafka topic: consume + decode + state update, against the raw
aiokafka `getmany` rate on the same topic in the same run.

    python3 -m bench.ingest [--records 1000000] [--vms 100000] [--rounds 2]

Starts a private single-node Kafka (tests/harness), produces `--records` realistic replication
records (about 300 bytes: the contract's required fields plus recovery point, bytes and pending
bytes; `--vms` VMs on 100-VM Azure Local instances, keyed by instance, each VM cycling in time
order) to a `--partitions` topic, then times, interleaved for `--rounds` rounds:

- raw: an `AIOKafkaConsumer` (no group, same fetch settings) calling `getmany(max_records=10000)`
  until every record was returned;
- rpowatch: `ingest.kafka.KafkaSource` (consumer group, fresh each round) feeding
  `rpowatch.service.Service._consume`: the service's own pipeline (decode on its own thread one
  batch ahead, partition bookkeeping, `Engine.apply` onto a fresh engine, `KafkaSource.commit`),
  without the evaluation ticks.

Both clocks start when the first records arrive (group join and metadata excluded) and stop when
the last record is returned (raw) or applied and committed (rpowatch). Prints records/s of each
and the ratio rpowatch / raw (target ≥ 0.8), the process CPU time of each pass, and where
rpowatch's time went (decode and apply overlap, so their times add up to more than the wall
time). `--serial` also times the same steps one batch after the other (decode, apply, commit,
then the next batch): what the pipeline gains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import polars as pl
from aiokafka import AIOKafkaConsumer

from bench._common import machine_line
from ingest.contracts import Stream
from ingest.deadletter import MemoryDeadLetterSink
from ingest.decode import decode_batch
from ingest.kafka import KafkaSettings, KafkaSource, start_producer
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch import service as service_module
from rpowatch.service import Service
from rules import state
from tests.harness import KafkaBroker

SITES = ("sea", "ams", "fra", "lon", "syd", "sin", "tor", "dub")
REGIONS = ("westus2", "westeurope", "germanywestcentral", "uksouth", "australiaeast", "southeastasia")
KINDS = (("cycle_completed", 0.97), ("cycle_failed", 0.015), ("cycle_missed", 0.01), ("paused", 0.005))
MAX_RECORDS = 10_000

T = TypeVar("T")


def rfc3339(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def fleet_records(records: int, vms: int, now_ms: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """(key, value) of `records` replication events of a `vms`-VM fleet, in event-time order: every
    VM reports one cycle per round, rounds one minute apart, ending now."""
    rng = random.Random(seed)
    rounds = -(-records // vms)
    fleet = []
    for v in range(vms):
        c = v // 100
        site = SITES[c % len(SITES)]
        asr = c % 5 == 0
        fleet.append((
            f"hci-{site}-{c + 1:05d}",
            f"vm-{site}{c + 1:05d}-{v % 100 + 1:04d}",
            f"azure:{REGIONS[c % len(REGIONS)]}" if asr else f"hci-{SITES[(c + 1) % 8]}-{c + 2:05d}",
            "asr" if asr else "hyperv_replica",
            rng.choice((30, 30, 300, 300, 900)),
        ))
    out: list[tuple[bytes, bytes]] = []
    kinds, weights = [k for k, _ in KINDS], [w for _, w in KINDS]
    for r in range(rounds):
        base = now_ms - (rounds - r) * 60_000
        for cluster, vm, target, technology, frequency in fleet:
            if len(out) == records:
                return out
            ts = base + rng.randrange(60_000)
            kind = rng.choices(kinds, weights)[0]
            churn = rng.uniform(50e3, 5e6)
            event: dict[str, Any] = {
                "event_id": f"rep-{vm}-{ts}", "ts": rfc3339(ts), "vm_id": vm, "cluster_id": cluster,
                "target_id": target, "technology": technology, "kind": kind, "frequency_s": frequency,
            }
            if kind == "cycle_completed":
                event |= {"recovery_point_ts": rfc3339(ts - rng.randrange(1_000, 3_000)),
                          "bytes": int(churn * frequency), "pending_bytes": int(churn * rng.uniform(0, 2))}
            else:
                event |= {"pending_bytes": int(churn * frequency * 2)}
            out.append((cluster.encode(), json.dumps(event, separators=(",", ":")).encode()))
    return out


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    producer = await start_producer(bootstrap, "bench-ingest")
    started = time.perf_counter()
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def raw_round(bootstrap: str, topic: str, total: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_poll_records=MAX_RECORDS)
    await consumer.start()
    try:
        seen = 0
        started: float | None = None
        while seen < total:
            polled = await consumer.getmany(timeout_ms=1000, max_records=MAX_RECORDS)
            if polled and started is None:
                started = time.perf_counter()
            seen += sum(len(rs) for rs in polled.values())
        assert started is not None
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def unpack_costs(values: list[bytes], repeats: int = 5) -> tuple[float, float]:
    """CPU-µs per record of what aiokafka does with a fetched partition: build a ConsumerRecord
    per record (what the raw pass gets), and build a chunk per record batch (what rpowatch's
    consumer gets, ingest/lean_records.py), over the same record batches of 500 values each, as
    aiokafka's producer would write them (about 160 KB, so ~16 KB batches would give the same
    per-record figures)."""
    from aiokafka.consumer import fetcher
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    from ingest import lean_records

    lean_records.install()
    data = bytearray()
    for start in range(0, len(values), 500):
        builder = DefaultRecordBatchBuilder(
            magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1,
            base_sequence=-1, batch_size=1 << 24,
        )
        for delta, value in enumerate(values[start:start + 500]):
            builder.append(delta, timestamp=0, key=None, value=value, headers=[])
        batch = bytearray(builder.build())
        batch[0:8] = start.to_bytes(8, "big", signed=True)  # base offset
        data += batch
    raw = bytes(data)
    tp = TopicPartition("t", 0)

    def per_record(deserializer: Any) -> float:
        started = time.process_time()
        for _ in range(repeats):
            records = fetcher.PartitionRecords(tp, MemoryRecords(raw), [], 0, None, deserializer, True, 0)
            list(records)
        return (time.process_time() - started) / repeats / len(values) * 1e6

    return per_record(None), per_record(lean_records.CHUNKS)


def cpu_seconds() -> float:
    """CPU time of this process, every thread (polars' pool included), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def time_sync(self, name: str, step: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            self.add(name, time.perf_counter() - t0)

    async def time(self, name: str, step: Callable[[], Awaitable[T]]) -> T:
        t0 = time.perf_counter()
        try:
            return await step()
        finally:
            self.add(name, time.perf_counter() - t0)


async def rpowatch_round(bootstrap: str, topic: str, total: int, group: str) -> tuple[float, Timer, int]:
    settings = Settings(http={"port": 0})
    service = Service(settings, load_rule_packs(settings), [], MemoryDeadLetterSink())
    source = KafkaSource(KafkaSettings(
        bootstrap_servers=bootstrap, group_id=group, topics={Stream.REPLICATION: topic},
        max_batch_records=MAX_RECORDS, poll_timeout_ms=1000, client_id=group,
    ))
    service._partitioned = {source.name: source}  # what Service.start wires for its own sources
    source.attach(service)
    timer = Timer()
    # Where handle's time goes: decoding, apply and the partition bookkeeping timed by wrappers;
    # the rest of handle is hand-offs to the executor thread and counters.
    apply, before_apply = service.engine.apply, source.before_apply
    # Engine.apply's two steps, timed by wrapping the module functions it calls (restored below).
    drop_seen, apply_replication = state.drop_seen, state.apply_replication
    vm_ids: list[pl.Series] = []  # of each applied batch, looked at once the clock has stopped

    def timed_apply(*args: Any) -> int:
        vm_ids.append(args[1].get_column("vm_id"))
        return timer.time_sync("  of which Engine.apply", lambda: apply(*args))

    def timed_drop_seen(*args: Any, **kwargs: Any) -> Any:
        return timer.time_sync("    of which state.drop_seen", lambda: drop_seen(*args, **kwargs))

    def timed_apply_replication(*args: Any, **kwargs: Any) -> pl.DataFrame:
        return timer.time_sync("    of which state.apply_replication", lambda: apply_replication(*args, **kwargs))

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        return timer.time_sync("  of which decode_batch", lambda: decode_batch(*args, **kwargs))

    async def timed_before_apply(*args: Any) -> None:
        await timer.time("  of which partition bookkeeping", lambda: before_apply(*args))

    service.engine.apply = timed_apply  # type: ignore[method-assign]
    source.before_apply = timed_before_apply  # type: ignore[method-assign]
    setattr(state, "drop_seen", timed_drop_seen)  # setattr: the wrappers take Any
    setattr(state, "apply_replication", timed_apply_replication)
    setattr(service_module, "decode_batch", timed_decode)  # the name Service.handle calls
    seen = 0
    batch_count = 0
    started: float | None = None
    done = asyncio.Event()
    batches, commit = source.batches, source.commit

    async def timed_batches() -> Any:
        nonlocal started
        async for batch in batches():
            if started is None:
                started = time.perf_counter()  # the group join and first fetch are not timed
            yield batch

    async def counted_commit(batch: Any) -> None:
        nonlocal seen, batch_count
        await timer.time("commit", lambda: commit(batch))
        seen += len(batch)
        batch_count += 1
        if seen >= total:
            done.set()

    source.batches = timed_batches  # type: ignore[method-assign]
    source.commit = counted_commit  # type: ignore[method-assign]
    consuming = asyncio.create_task(service._consume(source))  # the service's own pipeline
    try:
        await asyncio.wait({asyncio.ensure_future(done.wait()), consuming}, return_when=asyncio.FIRST_COMPLETED)
        if consuming.done():
            consuming.result()  # raises what stopped it
        assert started is not None
        elapsed = time.perf_counter() - started
        timer.counts["batches"] = batch_count
        events = sum(ids.len() for ids in vm_ids)
        timer.counts["events per batch"] = events // max(1, len(vm_ids))
        # Events whose VM has another event in the same batch: those take the grouped reduction.
        repeated = sum(int(ids.is_duplicated().sum()) for ids in vm_ids)
        timer.counts["% of events for a VM repeated in its batch"] = round(100 * repeated / max(1, events))
    finally:
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)
        state.drop_seen, state.apply_replication = drop_seen, apply_replication
        setattr(service_module, "decode_batch", decode_batch)
        await source.close()
        service._executor.shutdown(wait=True)
        service._decoder.shutdown(wait=True)
    return elapsed, timer, service.engine.fleet.replication.height


async def serial_round(bootstrap: str, topic: str, total: int, group: str) -> float:
    """For comparison, not the service's code: the same steps (`Service.handle`: decode, partition
    bookkeeping, `Engine.apply`; then commit) one batch after the other, without decoding the
    next batch while one is applied. What the pipeline in `Service._consume` gains."""
    settings = Settings(http={"port": 0})
    service = Service(settings, load_rule_packs(settings), [], MemoryDeadLetterSink())
    source = KafkaSource(KafkaSettings(
        bootstrap_servers=bootstrap, group_id=group, topics={Stream.REPLICATION: topic},
        max_batch_records=MAX_RECORDS, poll_timeout_ms=1000, client_id=group,
    ))
    service._partitioned = {source.name: source}
    source.attach(service)
    batches = aiter(source.batches())
    seen = 0
    try:
        batch = await anext(batches)
        started = time.perf_counter()
        while True:
            await service.handle(batch)
            await source.commit(batch)
            seen += len(batch)
            if seen >= total:
                return time.perf_counter() - started
            batch = await anext(batches)
    finally:
        await source.close()
        service._executor.shutdown(wait=True)
        service._decoder.shutdown(wait=True)


async def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    now_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    records = fleet_records(args.records, args.vms, now_ms)
    build_s = time.perf_counter() - t0
    mean_bytes = statistics.fmean(len(v) for _, v in records)
    broker = KafkaBroker(num_partitions=args.partitions)
    await asyncio.to_thread(broker.start)
    try:
        topic = "bench.replication"
        await broker.acreate_topic(topic, partitions=args.partitions)
        produce_s = await produce(broker.bootstrap, topic, records)
        consumer_records_us, chunks_us = unpack_costs([value for _, value in records[:200_000]])
        del records
        print(f"# bench.ingest  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {machine_line()}")
        print(f"{args.records:,} replication records, mean {mean_bytes:.0f} B, {args.vms:,} VMs on {args.vms // 100:,} "
              f"instances, topic of {args.partitions} partitions (built in {build_s:.1f} s, produced in {produce_s:.1f} s, "
              f"{args.records / produce_s:,.0f} records/s)")
        print(f"aiokafka's unpacking of fetched records, CPU per record: ConsumerRecords (raw) {consumer_records_us:.2f} µs, "
              f"chunks (rpowatch) {chunks_us:.2f} µs, ratio {chunks_us / consumer_records_us:.2f}")
        raw: list[float] = []
        ours: list[float] = []
        piped: list[float] = []
        for n in range(args.rounds):
            cpu0 = cpu_seconds()
            raw.append(await raw_round(broker.bootstrap, topic, args.records))
            cpu1 = cpu_seconds()
            elapsed, parts, vms = await rpowatch_round(broker.bootstrap, topic, args.records, f"bench-{n}-{time.time_ns()}")
            cpu2 = cpu_seconds()
            ours.append(elapsed)
            print(f"round {n + 1}: raw {args.records / raw[-1]:,.0f} records/s ({raw[-1]:.2f} s, CPU {cpu1 - cpu0:.1f} s), "
                  f"rpowatch {args.records / elapsed:,.0f} records/s ({elapsed:.2f} s, CPU {cpu2 - cpu1:.1f} s), "
                  f"ratio {raw[-1] / elapsed:.2f}; {vms:,} VMs in state; "
                  + ", ".join([*(f"{k} {v:.2f} s" for k, v in parts.seconds.items()),
                               *(f"{k} {v:,}" for k, v in parts.counts.items())]))
            if args.serial:
                cpu3 = cpu_seconds()
                piped.append(await serial_round(broker.bootstrap, topic, args.records, f"bench-s{n}-{time.time_ns()}"))
                print(f"  serial (no decode ahead): {args.records / piped[-1]:,.0f} records/s "
                      f"({piped[-1]:.2f} s, CPU {cpu_seconds() - cpu3:.1f} s), ratio {raw[-1] / piped[-1]:.2f}")
        raw_rate = args.records / statistics.median(raw)
        our_rate = args.records / statistics.median(ours)
        print()
        print("| path | median s | records/s |")
        print("|---|---:|---:|")
        print(f"| raw aiokafka getmany | {statistics.median(raw):.2f} | {raw_rate:,.0f} |")
        print(f"| rpowatch consume + decode + apply + commit | {statistics.median(ours):.2f} | {our_rate:,.0f} |")
        if piped:
            print(f"| for comparison: decode and apply one batch after the other | {statistics.median(piped):.2f} "
                  f"| {args.records / statistics.median(piped):,.0f} |")
        print(f"\nrpowatch / raw = {our_rate / raw_rate:.2f} (target >= 0.80)")
    finally:
        await asyncio.to_thread(broker.close)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.ingest", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--vms", type=int, default=100_000, help="fleet size (100 VMs per instance)")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="raw and rpowatch passes, interleaved")
    parser.add_argument("--serial", action="store_true", help="also time decode and apply without overlap")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
