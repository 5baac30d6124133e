"""What a source hands to the pipeline, and the contracts of sources and dead-letter sinks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
    # How the payloads are written: "canonical" (contracts.md §1), or a real telemetry format
    # that an adapter (ingest/adapters) turns into canonical events; then `stream` is only the
    # stream under which records the adapter cannot read at all are counted.
    format: str = "canonical"

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


class InstanceState(Protocol):
    """What a partitioned source asks of the pipeline's state when its partitions move (the
    service implements it over the rule engine). Each call returns once done; all are
    idempotent and never raise on unknown ids."""

    async def drop_instances(self, cluster_ids: Collection[str]) -> None:
        """Forget these Azure Local instances: another consumer owns them now."""

    async def hold_instances(self, cluster_ids: Collection[str]) -> None:
        """Freeze their alerts (nothing fires or resolves) while their state is rebuilt."""

    async def release_instances(self, cluster_ids: Collection[str]) -> None:
        """Their state is rebuilt: evaluate them again."""


@runtime_checkable
class PartitionedSource(Protocol):
    """A source whose records are split across the members of a consumer group (Kafka), each
    member owning the instances of its partitions. Besides `Source`:

    `attach(state)` is called once, before `batches()`. On a rebalance the source calls
    `state.drop_instances` for the instances of partitions it lost, and rebuilds the state of
    partitions it gained by replaying a window of them, holding their instances until the
    replayed records are applied. `before_apply(batch, valid, rejects)` is called with each
    decoded batch before its valid rows are applied (so it can hold instances first); it must
    not raise. `rebuilding` is true while any partition's state is being rebuilt.
    """

    def attach(self, state: InstanceState) -> None: ...

    async def before_apply(self, batch: Batch, valid: pl.DataFrame, rejects: pl.DataFrame) -> None: ...

    @property
    def rebuilding(self) -> bool: ...
