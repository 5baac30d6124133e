"""What a source hands to the pipeline, and the contracts of sources and dead-letter sinks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import polars as pl

from ingest.contracts import Stream


@dataclass(frozen=True)
class Batch:
    """Raw records of one stream from one source, as they arrived.

    The per-record lists are parallel: `payloads[i]` came from `topics[i]` (Kafka topic or MQTT
    topic), `partitions[i]` and `offsets[i]` (-1 where the transport has none). `positions` are
    what may be committed once the batch has been applied: for Kafka, partition → next offset.
    """

    source: str
    stream: Stream
    payloads: list[bytes]
    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    received_at_ms: int
    positions: dict[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.payloads)


class Source(Protocol):
    """A transport that delivers batches.

    `batches()` is iterated by exactly one task. It may wait for records (it never busy-loops)
    and it reconnects by itself: transport errors are logged and retried with backoff, never
    raised to the caller, and `up` says whether the transport is connected right now.
    `commit(batch)` is called after the batch's state change is applied and its dead letters are
    handed over; it must not raise when the commit is refused (after a rebalance the records
    are delivered again to their new owner, and applying them twice changes nothing).
    """

    name: str

    @property
    def up(self) -> bool: ...

    def batches(self) -> AsyncIterator[Batch]: ...

    async def commit(self, batch: Batch) -> None: ...

    async def close(self) -> None: ...


class DeadLetterSink(Protocol):
    """Where rejected records go, byte for byte, with why. `send` returns once the records are
    handed over durably enough to commit past them; it raises if they could not be."""

    async def send(self, batch: Batch, rejects: pl.DataFrame) -> None: ...

    async def close(self) -> None: ...
