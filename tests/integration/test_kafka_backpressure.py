"""Backpressure against a real broker: a pipeline that does not keep up bounds what is in flight,
gets its partitions paused (still a group member), and catches up — resumed, with queued batches
merged — once it goes on; nothing is lost or handed over twice."""

from __future__ import annotations

import asyncio

import pytest

from ingest.contracts import Stream
from ingest.kafka import PAUSE_AFTER_S, KafkaSettings, KafkaSource, start_producer
from ingest.source import Batch
from tests.harness import KafkaBroker

pytestmark = pytest.mark.integration

RECORDS = 3_000


async def test_a_stalled_pipeline_pauses_the_partitions_and_catches_up(kafka: KafkaBroker, unique_name: str) -> None:
    topic = f"{unique_name}.replication"
    await kafka.acreate_topic(topic, partitions=2)
    producer = await start_producer(kafka.bootstrap, "backpressure")
    try:
        for i in range(RECORDS):
            await producer.send(topic, b'{"n": %d}' % i, key=b"hci-%d" % (i % 5))
        await producer.flush()
    finally:
        await producer.stop()

    source = KafkaSource(KafkaSettings(kafka.bootstrap, unique_name, {Stream.REPLICATION: topic},
                                       max_batch_records=100, poll_timeout_ms=50, max_in_flight_batches=3,
                                       replay_window_ms=0))
    batches = aiter(source.batches())
    try:
        # Take one batch and sit on it, as a stuck pipeline would.
        held = [await anext(batches)]
        async with asyncio.timeout(PAUSE_AFTER_S + 10):
            while not (source._consumer and source._consumer.paused()):
                assert source._in_flight() <= 3  # never more than max_in_flight_batches
                await asyncio.sleep(0.05)
        assert source.pauses >= 1
        assert source._consumer.assignment() == source._consumer.paused()
        await asyncio.sleep(1.0)
        assert source._in_flight() <= 3 and len(source._queue) <= 2
        assert source.owned_partitions  # still a member of the group while paused

        # The pipeline goes on: the queued batches come merged, the partitions resume.
        for batch in held:
            await source.commit(batch)
        seen: list[Batch] = list(held)
        merged = await anext(batches)
        assert len(merged) > 100  # several fetched batches handed over as one
        seen.append(merged)
        await source.commit(merged)
        async with asyncio.timeout(30):
            while sum(len(b) for b in seen) < RECORDS:
                batch = await anext(batches)
                seen.append(batch)
                await source.commit(batch)
        # Resumed once there is room again: at the fetch task's next turn (the last records may
        # have been fetched before the pause and handed over from what it held back).
        async with asyncio.timeout(PAUSE_AFTER_S + 5):
            while source._consumer.paused():
                await asyncio.sleep(0.05)
    finally:
        await source.close()
    payloads = [p for b in seen for p in b.payloads]
    assert len(payloads) == RECORDS and len(set(payloads)) == RECORDS  # nothing lost, nothing twice
    positions = {tp: pos for b in seen for tp, pos in b.positions.items()}
    assert sum(positions.values()) == RECORDS
