"""Kafka records as chunks (ingest/lean_records.py), over record batches built by aiokafka's own
builders: the offsets and values of every record at or after the fetch position, nothing else;
the position advanced as aiokafka advances it; every other consumer unchanged. And what the
Kafka source does with a getmany's records: batches of at most `max_batch_records` records,
none dropped, not even those a poll made while paused returns."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord

from ingest import lean_records
from ingest.contracts import Stream
from ingest.kafka import KafkaSettings, KafkaSource
from ingest.lean_records import CHUNKS, Chunk, offsets_and_values

TP = TopicPartition("t", 0)
READ_UNCOMMITTED = 0


def v2_batch(base: int, records: list[tuple[int, bytes | None]], *, control: bool = False) -> bytes:
    """A v2 record batch at `base` holding (offset delta, value) records."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=int(control), producer_id=7 if control else -1,
        producer_epoch=0 if control else -1, base_sequence=-1, batch_size=1 << 20,
    )
    for delta, value in records:
        builder.append(delta, timestamp=1_700_000_000_000, key=b"k", value=value, headers=[])
    buf = bytearray(builder.build())
    buf[0:8] = struct.pack(">q", base)
    if control:  # attributes (int16 at byte 21): bit 5 marks a control batch
        (attributes,) = struct.unpack_from(">h", buf, 21)
        struct.pack_into(">h", buf, 21, attributes | 0x20)
    return bytes(buf)


def unpack(data: bytes, fetch_offset: int, deserializer: Any = CHUNKS, check_crcs: bool = False) -> tuple[list[Any], int]:
    """What aiokafka's fetcher makes of one fetched partition, and the position after it."""
    assert lean_records.install()
    records = fetcher.PartitionRecords(
        TP, MemoryRecords(data), [], fetch_offset, None, deserializer, check_crcs, READ_UNCOMMITTED
    )
    items = list(records)
    return items, records.next_fetch_offset


def test_batches_become_one_chunk_each_with_their_offsets_as_a_range() -> None:
    data = v2_batch(0, [(i, b"a%d" % i) for i in range(3)]) + v2_batch(3, [(i, b"b%d" % i) for i in range(2)])
    items, position = unpack(data, 0)
    assert items == [Chunk(range(0, 3), [b"a0", b"a1", b"a2"]), Chunk(range(3, 5), [b"b0", b"b1"])]
    assert position == 5
    assert offsets_and_values(items) == ([0, 1, 2, 3, 4], [b"a0", b"a1", b"a2", b"b0", b"b1"])


def test_records_before_the_fetch_position_are_left_out() -> None:
    # A fetch returns the whole batch that holds its offset: records 10 and 11 were consumed.
    items, position = unpack(v2_batch(10, [(i, b"v%d" % i) for i in range(4)]), 12)
    assert offsets_and_values(items) == ([12, 13], [b"v2", b"v3"])
    assert position == 14


def test_a_compacted_batch_keeps_its_true_offsets() -> None:
    items, position = unpack(v2_batch(100, [(0, b"x"), (3, b"y"), (4, b"z")]), 100)
    assert offsets_and_values(items) == ([100, 103, 104], [b"x", b"y", b"z"])
    assert position == 105


def test_control_batches_are_skipped_and_tombstones_become_empty_payloads() -> None:
    data = v2_batch(0, [(0, b"\x00\x00\x00\x00\x00\x00")], control=True) + v2_batch(1, [(0, None), (1, b"{}")])
    items, position = unpack(data, 0)
    assert offsets_and_values(items) == ([1, 2], [b"", b"{}"])
    assert position == 3


def test_legacy_batches_are_read_record_by_record() -> None:
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    for offset in (5, 6, 7):
        builder.append(offset, timestamp=1_700_000_000_000, key=None, value=b"m%d" % offset)
    items, position = unpack(bytes(builder.build()), 6)
    assert offsets_and_values(items) == ([6, 7], [b"m6", b"m7"])
    assert position == 8


def test_a_corrupt_batch_raises_as_aiokafka_does_when_crcs_are_checked() -> None:
    data = bytearray(v2_batch(0, [(0, b"payload")]))
    data[-3] ^= 0xFF  # inside the record, covered by the CRC
    with pytest.raises(CorruptRecordException):
        unpack(bytes(data), 0, check_crcs=True)


def test_other_consumers_still_get_consumer_records() -> None:
    items, position = unpack(v2_batch(0, [(0, b"p"), (1, None)]), 0, deserializer=None)
    assert all(type(item) is ConsumerRecord for item in items)
    assert [(r.offset, r.value, r.key, r.topic) for r in items] == [(0, b"p", b"k", "t"), (1, None, b"k", "t")]
    assert position == 2
    assert offsets_and_values(items) == ([0, 1], [b"p", b""])


def test_one_getmany_is_cut_into_batches_of_at_most_max_batch_records() -> None:
    source = KafkaSource(KafkaSettings("localhost:9", "g", {Stream.REPLICATION: "rep", Stream.BACKUP: "bak"}, max_batch_records=3))
    rep0, rep1, bak0 = TopicPartition("rep", 0), TopicPartition("rep", 1), TopicPartition("bak", 0)
    polled = {
        rep0: [Chunk(range(10, 14), [b"a", b"b", b"c", b"d"])],
        rep1: [Chunk([20, 22], [b"e", b"f"])],
        bak0: [Chunk(range(0, 1), [b"g"])],
    }
    batches = source._to_batches(polled)
    got = [(b.stream, b.payloads, b.offsets, b.partitions, b.positions) for b in batches]
    assert got == [
        (Stream.REPLICATION, [b"a", b"b", b"c"], [10, 11, 12], [0, 0, 0], {("rep", 0): 13}),
        (Stream.REPLICATION, [b"d", b"e", b"f"], [13, 20, 22], [0, 1, 1], {("rep", 0): 14, ("rep", 1): 23}),
        (Stream.BACKUP, [b"g"], [0], [0], {("bak", 0): 1}),
    ]
    assert all(b.topics == ["rep"] * len(b) for b in batches[:2])


class PausedConsumer:
    """What the fetch task sees while the pipeline is full: every partition gets paused, but one
    assigned meanwhile has been resumed (its starting offsets became known) and returns records."""

    def __init__(self) -> None:
        self.assigned = {TopicPartition("rep", 0)}
        self.paused_tps: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps -= set(tps)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Chunk]]:
        return {TopicPartition("rep", 1): [Chunk(range(5, 7), [b"x", b"y"])]}


async def test_records_returned_by_the_paused_poll_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest import kafka
    from ingest.source import Batch

    monkeypatch.setattr(kafka, "PAUSE_AFTER_S", 0.01)
    source = KafkaSource(KafkaSettings("localhost:9", "g", {Stream.REPLICATION: "rep"}, max_in_flight_batches=1))
    source._delivered.append(Batch("kafka", Stream.REPLICATION, [b"a"], ["rep"], [0], [0], 0, {("rep", 0): 1}))
    consumer = PausedConsumer()
    assert await source._wait_for_room(consumer) is False  # type: ignore[arg-type]
    assert consumer.paused() == {TopicPartition("rep", 0)} and source.pauses == 1
    # Held back (the pipeline is still full), in order, not dropped: aiokafka's position moved.
    [(_, _, kept)] = source._fetched
    assert (kept.payloads, kept.offsets, kept.positions) == ([b"x", b"y"], [5, 6], {("rep", 1): 7})
    assert not source._queue
