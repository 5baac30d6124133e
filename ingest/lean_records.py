"""Records in chunks, one per Kafka record batch, for rpowatch's own Kafka consumers.

For every record it returns, aiokafka builds a `ConsumerRecord` (a dataclass of eleven fields,
with the key and value sizes and a tuple of headers) and passes it through two generators:
about 3 CPU-µs per record in bench.ingest's runs (CRCs checked), more than decoding the
record's JSON. rpowatch reads only each record's offset and value (the payload is decoded in
bulk later, the partition is the key of `getmany`'s answer), so its consumers ask for a `Chunk`
per record batch instead: one list comprehension over the batch, and its offsets kept as a range where
they have no gap: about a fifth of that (bench.ingest prints both; bench/RESULTS.md).

How: aiokafka's fetcher builds one `PartitionRecords` per fetched partition, handing it the
consumer's `value_deserializer`. `install()` puts a subclass in its place whose records, when
that deserializer is the marker `CHUNKS`, are chunks. It keeps what aiokafka's unpacking
guarantees: CRCs checked if asked, control batches skipped, records before the fetch position
(a fetch starts at the batch that holds it) left out, and the position advanced past each
chunk before it is handed over. Consumers that read committed transactions only, and every
other consumer whatever its deserializer, get aiokafka's records exactly as before: the choice
is made once per fetched partition, not per record.

`getmany(max_records=N)` counts chunks, not records, for such a consumer, so rpowatch asks for
everything fetched (at most one fetch response per partition) and cuts it into batches itself.

This reaches into aiokafka's fetcher (the same in 0.11 to 0.14). If a release changes it,
`install()` leaves aiokafka alone and logs why, `CHUNKS` is then an ordinary deserializer that
returns the value unchanged, and `offsets_and_values` reads the `ConsumerRecord`s: slower,
never wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class Chunk(NamedTuple):
    """The records of one Kafka record batch from the fetch position on, in offset order."""

    offsets: range | list[int]
    values: list[bytes | None]


def _keep_value(value: bytes | None) -> bytes | None:
    return value


# Pass as `value_deserializer`: the consumer's records are `Chunk`s once `install()` took effect
# (otherwise it keeps each value as it is, and never raises).
CHUNKS = _keep_value

_installed: bool | None = None


def install() -> bool:
    """Teach aiokafka's fetcher to build chunks for consumers whose deserializer is `CHUNKS`.
    Idempotent. Returns whether it is in place."""
    global _installed
    if _installed is None:
        _installed = _install()
    return _installed


def _install() -> bool:
    try:
        from aiokafka.consumer import fetcher
        from aiokafka.errors import CorruptRecordException
    except ImportError as exc:  # pragma: no cover - aiokafka is a dependency
        logger.warning("kafka: records stay ConsumerRecords (%s)", exc)
        return False
    base = getattr(fetcher, "PartitionRecords", None)
    read_committed = getattr(fetcher, "READ_COMMITTED", None)
    if base is None or read_committed is None or not callable(getattr(base, "_unpack_records", None)):
        logger.warning("kafka: this aiokafka's fetcher is not the one expected; records stay ConsumerRecords")
        return False

    class PartitionRecords(base):  # type: ignore[misc,valid-type]  # aiokafka is untyped
        # Called once, by the base's __init__, for the iterator its records come from.
        def _unpack_records(self) -> Iterator[Any]:
            if self._value_deserializer is CHUNKS and self._isolation_level != read_committed:
                return self._unpack_chunks()
            return super()._unpack_records()  # type: ignore[no-any-return]

        def _unpack_chunks(self) -> Iterator[Chunk]:
            records = self._records
            while records.has_next():
                batch = records.next_batch()
                if self._check_crcs and not batch.validate_crc():
                    raise CorruptRecordException(f"Invalid CRC - {self._tp}")
                if batch.is_control_batch:
                    self.next_fetch_offset = batch.next_offset
                    continue
                chunk = _chunk(batch, self.next_fetch_offset)
                # Before handing it over: getmany may stop after any chunk, and the partition's
                # position is where the next getmany starts.
                self.next_fetch_offset = batch.next_offset
                if chunk.values:
                    yield chunk

    fetcher.PartitionRecords = PartitionRecords
    return True


_OFFSET, _VALUE = attrgetter("offset"), attrgetter("value")
_FIRST, _SECOND = itemgetter(0), itemgetter(1)


def _chunk(batch: Any, position: int) -> Chunk:
    """The records of `batch` at or after `position`."""
    pairs = [(record.offset, record.value) for record in batch]
    if not pairs:
        return Chunk([], [])
    first, last = pairs[0][0], pairs[-1][0]
    # Offsets rise within a batch: as many records as offsets from the first to the last means
    # no gap (nothing compacted away), so they are that range.
    if first >= position and len(pairs) == last - first + 1:
        return Chunk(range(first, last + 1), list(map(_SECOND, pairs)))
    kept = [pair for pair in pairs if pair[0] >= position]
    return Chunk(list(map(_FIRST, kept)), list(map(_SECOND, kept)))


def offsets_and_values(items: Sequence[Any]) -> tuple[list[int], list[bytes]]:
    """The offsets and values of one partition's records from `getmany`: chunks, or
    `ConsumerRecord`s where `install()` could not take effect. A tombstone (no value) becomes
    an empty payload, which decoding dead-letters as not JSON."""
    offsets: list[int] = []
    values: list[Any] = []
    if items and type(items[0]) is Chunk:
        for chunk in items:
            offsets.extend(chunk.offsets)
            values.extend(chunk.values)
    else:
        offsets, values = list(map(_OFFSET, items)), list(map(_VALUE, items))
    if None in values:
        values = [v if v is not None else b"" for v in values]
    return offsets, values
