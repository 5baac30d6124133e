"""Kafka consumer-group source (aiokafka).

What happens to a record, in order:
  1. a fetch task calls `getmany` (what aiokafka fetched, waiting at most the poll timeout) and
     queues the records as batches of one stream and at most `max_batch_records` records, each
     carrying the next offset of every partition it covers;
  2. the pipeline takes a batch (`batches()`), decodes it off the event loop, shows the decoded
     rows to `before_apply` (which notes the instances of each partition and holds those of
     partitions being rebuilt), applies them, hands the rejects to the dead-letter sink;
  3. `commit(batch)` commits the batch's positions (at-least-once; the engine ignores repeated
     event ids). A commit refused after a rebalance (`CommitFailedError`) is logged, not raised:
     the new owner reads those records again.

Consumer group: the three topics are co-partitioned by `cluster_id` (same partition count), and
the range assignor gives a member the same partition numbers of every topic, so a member owns
whole Azure Local instances. On a rebalance (aiokafka's protocol is eager: every partition is
revoked, then the new assignment is handed out):
  - revoke: undelivered batches are discarded (re-read from the committed offsets), delivered
    ones are waited for until applied and committed;
  - assign: instances of partitions this member lost are dropped (their series vanish); the
    partitions it gained are rebuilt by replaying `replay_window_ms` of them (`offsets_for_times`
    + `seek`) up to the group's committed offset, their instances held until that replay is
    applied, so a hand-over neither invents nor loses an alert. Positions below the committed
    offset are never committed again (that would move the group backwards).

Backpressure: at most `max_in_flight_batches` batches are queued or being applied. When that
many are, the fetch task holds back the batches of its last `getmany` that did not fit and
stops draining aiokafka (whose prefetch holds at most one fetch per partition), and the queued
batches are handed over merged, as one larger batch, so a pipeline that fell behind catches up
in fewer, larger applies. If it stays that far behind for PAUSE_AFTER_S, every assigned
partition is paused and `getmany` keeps being called (it then waits its timeout and returns
nothing), so the member stays in the group however long the pipeline needs; they are resumed as
soon as there is room. Memory stays bounded by the in-flight batches, one `getmany` held back
and aiokafka's fetch buffers, whatever the input rate.

Broker trouble: aiokafka reconnects by itself and `getmany` returns quietly (and empty) while
the broker is away (aiokafka #992), so `up` is not inferred from silence: a probe task asks for
cluster metadata (`topics()`) whenever no record arrived for a second, backing off to every
8 s while the broker is unreachable. A consumer that cannot start is retried with backoff.

Values are never deserialized by aiokafka, so a poison record cannot wedge the consumer (a
raising `value_deserializer` re-raises on the same record forever, aiokafka #744): the
consumer's deserializer is `lean_records.CHUNKS`, a marker that makes aiokafka hand over each
record batch's offsets and values instead of building a `ConsumerRecord` per record (its
costliest step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.conn import create_conn
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

from ingest import lean_records
from ingest.contracts import Stream
from ingest.partitions import PartitionOwnership, TopicPartitionKey
from ingest.source import Batch, InstanceState

logger = logging.getLogger(__name__)
lean_records.install()

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
PROBE_INTERVAL_S = 1.0
PROBE_MAX_INTERVAL_S = 8.0
PROBE_TIMEOUT_S = 5.0
PAUSE_AFTER_S = 2.0

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    group_id: str
    topics: dict[Stream, str]
    client_id: str = "rpowatch"
    max_batch_records: int = 10_000
    poll_timeout_ms: int = 200
    auto_offset_reset: str = "earliest"
    # Connection arguments shared with producers (TLS, SASL, timeouts): see `client_security`.
    # Secrets stay `SecretStr` in here and are unwrapped only when a client is built.
    security: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    # How far back a newly assigned partition is replayed (by record timestamp) to rebuild the
    # state of its instances. 0 turns rebuilding off.
    replay_window_ms: int = 2 * 3600 * 1000
    max_in_flight_batches: int = 8
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # Revoking waits for the batches being applied; the group waits this long for members.
    rebalance_timeout_ms: int = 60_000
    # More topics, as (topic, stream, format): a format other than "canonical" is read by an
    # adapter (ingest/adapters), and the stream is where records it cannot read count.
    extra_topics: tuple[tuple[str, Stream, str], ...] = ()


def client_security(
    *,
    security_protocol: SecurityProtocol = "PLAINTEXT",
    ssl_ca_file: Path | None = None,
    ssl_cert_file: Path | None = None,
    ssl_key_file: Path | None = None,
    ssl_key_password: SecretStr | None = None,
    sasl_mechanism: SaslMechanism | None = None,
    sasl_username: str | None = None,
    sasl_password: SecretStr | None = None,
    request_timeout_ms: int | None = None,
    metadata_max_age_ms: int | None = None,
    connections_max_idle_ms: int | None = None,
) -> tuple[tuple[str, Any], ...]:
    """aiokafka client arguments common to consumers and producers.

    TLS (`SSL`, `SASL_SSL`) verifies the broker against `ssl_ca_file`, or the system's CAs
    without one (Azure Event Hubs), and checks its host name; `ssl_cert_file`/`ssl_key_file` add a
    client certificate. SASL PLAIN and SCRAM both take `sasl_username`/`sasl_password`."""
    out: list[tuple[str, Any]] = [("security_protocol", security_protocol)]
    if security_protocol in ("SSL", "SASL_SSL"):
        password = ssl_key_password.get_secret_value() if ssl_key_password is not None else None
        context = create_ssl_context(
            cafile=str(ssl_ca_file) if ssl_ca_file else None,
            certfile=str(ssl_cert_file) if ssl_cert_file else None,
            keyfile=str(ssl_key_file) if ssl_key_file else None,
            password=password,
        )
        out.append(("ssl_context", context))
    if security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        out.append(("sasl_mechanism", sasl_mechanism or "PLAIN"))
        out.append(("sasl_plain_username", sasl_username))
        out.append(("sasl_plain_password", sasl_password))
    for name, value in (
        ("request_timeout_ms", request_timeout_ms),
        ("metadata_max_age_ms", metadata_max_age_ms),
        ("connections_max_idle_ms", connections_max_idle_ms),
    ):
        if value is not None:
            out.append((name, value))
    return tuple(out)


def _client_kwargs(security: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in security}


@dataclass
class _Rebuild:
    """A partition whose instances' state is being rebuilt by a replay."""

    target: int  # caught up once applied up to here (the group's committed offset, or the end)
    commit_floor: int  # positions at or below this are not committed (-1: commit everything)
    release_after: int | None = None  # set once fetched to `target`: the last batch that may hold replayed records
    applied_to: int = 0  # next offset after what has been applied: where a kept partition resumes


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, source: KafkaSource, consumer: AIOKafkaConsumer) -> None:
        self._source = source
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._partitions_revoked(self._consumer, set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._source._partitions_assigned(self._consumer, set(assigned))


class KafkaSource:
    """Implements `ingest.source.Source` and `ingest.source.PartitionedSource`."""

    def __init__(self, settings: KafkaSettings, name: str = "kafka") -> None:
        self.name = name
        self._settings = settings
        self._stream_of = {topic: stream for stream, topic in settings.topics.items()}
        self._stream_of.update({topic: stream for topic, stream, _ in settings.extra_topics})
        self._format_of = {topic: fmt for topic, _, fmt in settings.extra_topics}
        self._consumer: AIOKafkaConsumer | None = None
        self._up = False
        self._state: InstanceState | None = None
        self._fetcher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        # Batches fetched but not yet handed over, as (generation, sequence, batch); a revoke
        # bumps the generation, so nothing fetched under the old assignment is handed over.
        self._queue: deque[tuple[int, int, Batch]] = deque()
        # Batches of the last getmany that did not fit in flight yet (same tuples); no getmany
        # is made while any wait, so they add at most one fetch response per partition.
        self._fetched: deque[tuple[int, int, Batch]] = deque()
        self._has_batches = asyncio.Event()
        self._generation = 0
        self._next_seq = 1
        self._seq_of: dict[int, int] = {}  # id(batch) -> sequence, while delivered
        self._delivered: deque[Batch] = deque()  # handed over, not yet committed
        self._drained = asyncio.Event()
        self._drained.set()
        self._room = asyncio.Event()  # set whenever a batch leaves the queue or is committed
        self._applied_seq = 0  # highest sequence committed
        self._owned: set[TopicPartition] = set()
        self._rebuilding: dict[TopicPartition, _Rebuild] = {}
        # Instances held while rebuilding, by partition number: the topics are co-partitioned, so
        # partition N of every topic carries the same instances, and an instance is complete only
        # once partition N of every topic is rebuilt.
        self._held: dict[int, set[str]] = {}
        self._setting_up: set[TopicPartition] = set()  # gained, starting offsets not known yet
        self._ownership = PartitionOwnership()
        self._last_records = 0.0  # monotonic time records last arrived
        # Observable counters (tests, logs).
        self.pauses = 0
        self.rebalances = 0
        self.replays = 0

    # --- Source ----------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    @property
    def rebuilding(self) -> bool:
        return bool(self._rebuilding)

    @property
    def owned_partitions(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self._owned}

    def attach(self, state: InstanceState) -> None:
        self._state = state

    async def batches(self) -> AsyncIterator[Batch]:
        self._start_tasks()
        while True:
            while not self._queue:
                self._has_batches.clear()
                await self._has_batches.wait()
            generation, seq, batch = self._queue.popleft()
            if generation != self._generation:
                continue
            # The pipeline fell behind: hand over what queued up behind this batch (same stream
            # and format) as one larger batch. Applying costs about as much per batch as per
            # record, so larger batches are how it catches up.
            limit = self._settings.max_batch_records * self._settings.max_in_flight_batches
            while self._queue and _mergeable(batch, self._queue[0], generation, limit):
                _, seq, following = self._queue.popleft()
                batch = _merge(batch, following)
            self._room.set()
            self._seq_of[id(batch)] = seq
            self._delivered.append(batch)
            self._drained.clear()
            yield batch

    async def before_apply(self, batch: Batch, valid: pl.DataFrame, rejects: pl.DataFrame) -> None:
        if batch.source != self.name or valid.is_empty():
            return
        try:
            seen = self._ownership.observe(batch, valid, rejects)
        except ValueError:
            # A decoder whose valid rows do not map back to inputs one to one (an adapter):
            # credit each instance to every partition of the batch. On a revoke that keeps an
            # instance whenever one of those partitions stays here — stale rather than lost.
            fallback = valid.select("cluster_id").unique()
            parts = {(t, p) for t, p in zip(batch.topics, batch.partitions, strict=True)}
            seen = pl.concat(
                [
                    fallback.select(
                        pl.lit(t, pl.String).alias("topic"), pl.lit(p, pl.Int32).alias("partition"), "cluster_id"
                    )
                    for t, p in sorted(parts)
                ]
            )
            self._ownership.frame = pl.concat([self._ownership.frame, seen]).unique()
        if not self._rebuilding or self._state is None:
            return
        to_hold: set[str] = set()
        for number in {tp.partition for tp in self._rebuilding}:
            ids = set(seen.filter(pl.col("partition") == number).get_column("cluster_id").to_list())
            new = ids - self._held.get(number, set())
            if new:
                self._held.setdefault(number, set()).update(new)
                to_hold |= new
        if to_hold:
            await self._state.hold_instances(sorted(to_hold))

    async def commit(self, batch: Batch) -> None:
        seq = self._seq_of.pop(id(batch), None)
        for i, delivered in enumerate(self._delivered):
            if delivered is batch:
                del self._delivered[i]
                break
        if seq is not None:
            self._applied_seq = max(self._applied_seq, seq)
        self._room.set()
        for (topic, partition), position in batch.positions.items():
            if (rebuild := self._rebuilding.get(TopicPartition(topic, partition))) is not None:
                rebuild.applied_to = max(rebuild.applied_to, position)
        try:
            await self._commit_positions(batch)
            await self._release_caught_up()
        finally:
            if not self._delivered:
                self._drained.set()

    async def close(self) -> None:
        for task in (self._prober, self._fetcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._prober = self._fetcher = None
        if self._consumer is not None:
            await _stop_quietly(self._consumer)
            self._consumer = None
        self._up = False

    # --- fetching --------------------------------------------------------------------------------

    def _start_tasks(self) -> None:
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = asyncio.create_task(self._fetch_forever(), name=f"{self.name}-fetch")
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_forever(), name=f"{self.name}-probe")

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            # Same partition numbers of every topic to one member: it owns whole instances.
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            value_deserializer=lean_records.CHUNKS,
            **_client_kwargs(s.security),
        )
        topics = [*s.topics.values(), *(topic for topic, _, _ in s.extra_topics)]
        consumer.subscribe(topics, listener=_Rebalance(self, consumer))
        return consumer

    async def _connect(self) -> AIOKafkaConsumer:
        """Start a consumer, retrying with exponential backoff while the broker is away."""
        s = self._settings
        delay = BACKOFF_INITIAL_S
        while True:
            consumer = self._new_consumer()
            try:
                await consumer.start()
            except KafkaError as exc:
                failure = exc
            else:
                logger.info("kafka: connected to %s as group %s", s.bootstrap_servers, s.group_id)
                self._up = True
                return consumer
            self._up = False
            await _stop_quietly(consumer)
            logger.error(
                "kafka: cannot connect to %s: %s; retrying in %.1f s",
                s.bootstrap_servers,
                await diagnose(s.bootstrap_servers, s.client_id, s.security, failure),
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _fetch_forever(self) -> None:
        s = self._settings
        while True:
            if self._consumer is None:
                self._consumer = await self._connect()
            consumer = self._consumer
            if not await self._wait_for_room(consumer):
                continue
            if self._fetched:  # what the last getmany returned beyond the room there was
                self._hand_over_fetched()
                continue
            try:
                # Everything fetched (at most one fetch response per partition): max_records
                # would count record batches, not records; _to_batches cuts it into batches.
                polled = await consumer.getmany(timeout_ms=s.poll_timeout_ms)
            except KafkaError as exc:
                # aiokafka retries transient errors itself; what reaches us needs a new consumer.
                logger.warning("kafka: fetch failed (%s); reconnecting", describe_error(exc))
                self._up = False
                self._consumer = None
                self._queue.clear()
                self._fetched.clear()
                self._generation += 1
                await _stop_quietly(consumer)
                await asyncio.sleep(BACKOFF_INITIAL_S)
                continue
            self._keep(polled)
            if self._rebuilding:
                await self._note_replay_progress(consumer)

    def _keep(self, polled: dict[TopicPartition, list[Any]]) -> None:
        """Take what a getmany returned: as batches, queued while there is room, held back in
        order after that. Nothing aiokafka returned is ever dropped: its position has moved."""
        if not polled:
            return
        self._last_records = time.monotonic()
        self._up = True
        for batch in self._to_batches(polled):
            self._fetched.append((self._generation, self._next_seq, batch))
            self._next_seq += 1
        self._hand_over_fetched()

    def _in_flight(self) -> int:
        return len(self._queue) + len(self._delivered)

    def _hand_over_fetched(self) -> None:
        """Queue fetched batches while fewer than `max_in_flight_batches` are in flight."""
        moved = False
        while self._fetched and self._in_flight() < self._settings.max_in_flight_batches:
            self._queue.append(self._fetched.popleft())
            moved = True
        if moved:
            self._has_batches.set()

    async def _wait_for_room(self, consumer: AIOKafkaConsumer) -> bool:
        """True when fewer than `max_in_flight_batches` batches are queued or being applied (the
        partitions resumed if they were paused). Meanwhile nothing is drained from aiokafka, whose
        prefetch holds at most one fetch per partition. If the pipeline stays that far behind
        for PAUSE_AFTER_S, every partition is paused and one empty poll made (False): the member
        keeps polling, so it stays in the group however long the pipeline needs."""
        if self._in_flight() < self._settings.max_in_flight_batches:
            if paused := consumer.paused() - self._setting_up:
                consumer.resume(*paused)
                logger.debug("kafka: pipeline caught up; resumed %d partitions", len(paused))
            return True
        self._room.clear()
        try:
            await asyncio.wait_for(self._room.wait(), PAUSE_AFTER_S)
            return True
        except TimeoutError:
            pass
        if unpaused := consumer.assignment() - consumer.paused():
            consumer.pause(*unpaused)
            self.pauses += 1
            logger.info("kafka: %d batches in flight for %.0f s; paused %d partitions", self._in_flight(), PAUSE_AFTER_S, len(unpaused))
        try:
            # Returns nothing while every partition is paused; but a partition assigned meanwhile
            # is resumed once its starting offsets are known, and what it returns is kept.
            self._keep(await consumer.getmany(timeout_ms=self._settings.poll_timeout_ms))
        except KafkaError:
            pass  # the next round trip reports it
        return False

    def _to_batches(self, polled: dict[TopicPartition, list[Any]]) -> list[Batch]:
        """What one `getmany` returned, as batches of one stream (and format) each, of at most
        `max_batch_records` records."""
        received = int(time.time() * 1000)
        by_stream: dict[tuple[Stream, str], list[tuple[TopicPartition, list[int], list[bytes]]]] = defaultdict(list)
        for tp, records in polled.items():
            if records:
                offsets, values = lean_records.offsets_and_values(records)
                by_stream[(self._stream_of[tp.topic], self._format_of.get(tp.topic, "canonical"))].append(
                    (tp, offsets, values)
                )
        limit = self._settings.max_batch_records
        batches = []
        for (stream, fmt), parts in by_stream.items():
            batch = Batch(self.name, stream, [], [], [], [], received, {}, fmt)
            for tp, offsets, values in parts:
                start = 0
                while start < len(values):
                    end = min(len(values), start + limit - len(batch))
                    batch.payloads.extend(values[start:end])
                    batch.offsets.extend(offsets[start:end])
                    batch.topics.extend([tp.topic] * (end - start))
                    batch.partitions.extend([tp.partition] * (end - start))
                    batch.positions[(tp.topic, tp.partition)] = offsets[end - 1] + 1
                    start = end
                    if len(batch) == limit:
                        batches.append(batch)
                        batch = Batch(self.name, stream, [], [], [], [], received, {}, fmt)
            if len(batch):
                batches.append(batch)
        return batches

    async def _probe_forever(self) -> None:
        interval = PROBE_INTERVAL_S
        while True:
            await asyncio.sleep(interval)
            consumer = self._consumer
            if consumer is None:
                continue  # _connect keeps `up` false and logs
            if time.monotonic() - self._last_records < interval:
                ok = True
            else:
                try:
                    await asyncio.wait_for(consumer.topics(), PROBE_TIMEOUT_S)
                    ok = True
                except (KafkaError, TimeoutError) as exc:
                    ok = False
                    if self._up:
                        logger.warning(
                            "kafka: %s unreachable (%s); serving what is known, retrying",
                            self._settings.bootstrap_servers,
                            describe_error(exc),
                        )
            if ok and not self._up:
                logger.info("kafka: %s reachable again", self._settings.bootstrap_servers)
            self._up = ok
            interval = PROBE_INTERVAL_S if ok else min(interval * 2, PROBE_MAX_INTERVAL_S)

    # --- commits ---------------------------------------------------------------------------------

    async def _commit_positions(self, batch: Batch) -> None:
        consumer = self._consumer
        if consumer is None or not batch.positions:
            return
        assigned = consumer.assignment()
        offsets: dict[TopicPartition, int] = {}
        for (topic, partition), position in batch.positions.items():
            tp = TopicPartition(topic, partition)
            rebuild = self._rebuilding.get(tp)
            if tp in assigned and (rebuild is None or position > rebuild.commit_floor):
                offsets[tp] = position
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except CommitFailedError as exc:
            # The partitions moved to another member during the batch; it will re-read them.
            logger.info("kafka: commit refused after a rebalance (%s); records will be redelivered", exc)
        except IllegalStateError as exc:
            logger.info("kafka: commit skipped, partitions no longer assigned (%s)", exc)
        except KafkaError as exc:
            logger.warning("kafka: commit failed (%s); records since the last commit will be redelivered", exc)

    # --- rebalancing -----------------------------------------------------------------------------

    async def _partitions_revoked(self, consumer: AIOKafkaConsumer, revoked: set[TopicPartition]) -> None:
        """Before the group rebalances: nothing fetched under this assignment is handed over any
        more, and what was handed over is applied and committed (or given up on after half the
        rebalance timeout, to stay in the group)."""
        self.rebalances += 1
        self._generation += 1
        self._queue.clear()
        self._fetched.clear()
        self._room.set()
        for rebuild in self._rebuilding.values():
            rebuild.release_after = None  # the batches it counted on may just have been discarded
        if self._delivered:
            timeout = self._settings.rebalance_timeout_ms / 2000
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                logger.warning(
                    "kafka: %d batches still being applied after %.0f s; rebalancing without them",
                    len(self._delivered),
                    timeout,
                )
        logger.info("kafka: partitions revoked for a rebalance: %s", _names(revoked))

    async def _partitions_assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        lost, fresh = self._owned - assigned, assigned - self._owned
        # Fetching resumes as soon as aiokafka has set the assignment, concurrently with this
        # callback: until their starting offsets are known, gained partitions stay paused (or
        # their records would be applied, and then replayed again). Nothing above awaits.
        if fresh:
            consumer.pause(*fresh)
            self._setting_up |= fresh
        # A kept partition whose rebuild the rebalance interrupted goes on from what was applied
        # (the eager protocol reset it to the group's committed offset, which a replay stays
        # below).
        for tp in assigned & self._owned:
            if (rebuild := self._rebuilding.get(tp)) is not None and rebuild.target >= 0:
                consumer.seek(tp, rebuild.applied_to)
        self._owned = set(assigned)
        try:
            if lost:
                ids = self._ownership.forget(_keys(lost))
                for tp in lost:
                    self._rebuilding.pop(tp, None)
                for number in {tp.partition for tp in lost} - {tp.partition for tp in self._rebuilding}:
                    self._held.pop(number, None)  # dropped instances are no longer held
                if ids and self._state is not None:
                    await self._state.drop_instances(ids)
                logger.info("kafka: lost %s; dropped the state of %d instances", _names(lost), len(ids))
            if fresh:
                await self._begin_rebuild(consumer, fresh)
            logger.info("kafka: assigned %s", _names(assigned))
        except Exception:  # aiokafka would only log it; say what it means here
            logger.exception("kafka: handling the new assignment failed; state may be incomplete")
        finally:
            self._setting_up -= fresh
            if resumable := fresh & consumer.assignment():
                consumer.resume(*resumable)

    async def _begin_rebuild(self, consumer: AIOKafkaConsumer, fresh: set[TopicPartition]) -> None:
        s = self._settings
        tps = sorted(fresh)
        now_ms = int(time.time() * 1000)
        if s.replay_window_ms <= 0:  # rebuilding turned off: consume from the committed offsets
            for tp in tps:
                self._rebuilding[tp] = _Rebuild(target=-1, commit_floor=-1, release_after=0)
            await self._release_caught_up()
            return
        try:
            committed = {tp: await consumer.committed(tp) for tp in tps}
            begins = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            by_time = await consumer.offsets_for_times({tp: max(0, now_ms - s.replay_window_ms) for tp in tps})
        except KafkaError as exc:
            logger.error(
                "kafka: cannot look up where to replay %s from (%s); they continue from their "
                "committed offsets without rebuilding their state",
                _names(fresh),
                describe_error(exc),
            )
            for tp in tps:
                self._rebuilding[tp] = _Rebuild(target=-1, commit_floor=-1, release_after=0)
            await self._release_caught_up()
            return
        for tp in tps:
            last = committed[tp]
            live = last if last is not None else (begins[tp] if s.auto_offset_reset == "earliest" else ends[tp])
            target = last if last is not None else ends[tp]
            found = by_time.get(tp)
            start = found.offset if found is not None else ends[tp]
            start = max(begins[tp], min(start, live))
            if start < target:
                consumer.seek(tp, start)
                self._rebuilding[tp] = _Rebuild(
                    target=target, commit_floor=last if last is not None else -1, applied_to=start
                )
                self.replays += 1
                logger.info(
                    "kafka: rebuilding %s:%d from offset %d (replay window %.0f s) up to %d",
                    tp.topic,
                    tp.partition,
                    start,
                    s.replay_window_ms / 1000,
                    target,
                )
            else:
                consumer.seek(tp, live)
                # Nothing to replay: done at once (releasing what an interrupted rebuild held).
                self._rebuilding[tp] = _Rebuild(target=-1, commit_floor=-1, release_after=0)
        await self._release_caught_up()

    async def _note_replay_progress(self, consumer: AIOKafkaConsumer) -> None:
        for tp, rebuild in list(self._rebuilding.items()):
            if rebuild.release_after is not None:
                continue
            try:
                position = await consumer.position(tp)
            except (IllegalStateError, KafkaError):
                continue
            if position >= rebuild.target:
                rebuild.release_after = self._next_seq - 1
        await self._release_caught_up()

    async def _release_caught_up(self) -> None:
        done = [
            tp
            for tp, rebuild in self._rebuilding.items()
            if rebuild.release_after is not None and rebuild.release_after <= self._applied_seq
        ]
        for tp in done:
            del self._rebuilding[tp]
        ids: set[str] = set()
        for number in {tp.partition for tp in done} - {tp.partition for tp in self._rebuilding}:
            ids |= self._held.pop(number, set())
        if done:
            logger.info("kafka: rebuilt %s (%d instances)", _names(done), len(ids))
        if ids and self._state is not None:
            await self._state.release_instances(sorted(ids))


async def diagnose(
    bootstrap_servers: str, client_id: str, security: Iterable[tuple[str, Any]], error: BaseException
) -> str:
    """Why a client could not start, as one line with a hint. aiokafka only says "Unable to
    bootstrap" and logs the cause (TLS, SASL) at a level the CLI silences, so open one connection
    to the first bootstrap server with the same settings and report what that says."""
    kwargs = _client_kwargs(security)
    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host or "localhost",
                int(port or 9092),
                client_id=client_id,
                request_timeout_ms=kwargs.get("request_timeout_ms", 10_000),
                ssl_context=kwargs.get("ssl_context"),
                security_protocol=kwargs.get("security_protocol", "PLAINTEXT"),
                sasl_mechanism=kwargs.get("sasl_mechanism"),
                sasl_plain_username=kwargs.get("sasl_plain_username"),
                sasl_plain_password=kwargs.get("sasl_plain_password"),
            ),
            PROBE_TIMEOUT_S * 2,
        )
    except (OSError, KafkaError, TimeoutError, ValueError) as exc:
        described = describe_error(exc)
        return f"{_hint(exc, described, kwargs)}{described}"
    conn.close()
    return describe_error(error)


def _hint(exc: BaseException, described: str, kwargs: dict[str, Any]) -> str:
    text = described.lower()
    protocol = kwargs.get("security_protocol", "PLAINTEXT")
    if "authentication" in text or "sasl" in text:
        return "SASL authentication failed (check sasl_mechanism, sasl_username, sasl_password): "
    if "certificate verify failed" in text:
        return "the broker's TLS certificate is not trusted or does not name it (check ssl_ca_file): "
    if "certificate required" in text or ("alert" in text and protocol in ("SSL", "SASL_SSL")):
        return "TLS refused; does the broker require a client certificate (ssl_cert_file, ssl_key_file)? "
    if isinstance(exc, ConnectionRefusedError):
        return "nothing listens there: "
    if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        return f"no answer to {protocol}; does the listener expect TLS (security_protocol)? "
    return ""


def _mergeable(batch: Batch, following: tuple[int, int, Batch], generation: int, limit: int) -> bool:
    gen, _, other = following
    return (
        gen == generation
        and other.stream == batch.stream
        and other.format == batch.format
        and len(batch) + len(other) <= limit
    )


def _merge(first: Batch, second: Batch) -> Batch:
    return Batch(
        first.source,
        first.stream,
        first.payloads + second.payloads,
        first.topics + second.topics,
        first.partitions + second.partitions,
        first.offsets + second.offsets,
        max(first.received_at_ms, second.received_at_ms),
        {**first.positions, **second.positions},  # later batches hold later offsets
        format=first.format,
    )


def describe_error(exc: BaseException) -> str:
    """An aiokafka error as one line an operator can act on (aiokafka's own texts are terse and
    the cause is often chained)."""
    parts = [f"{type(exc).__name__}: {exc}".rstrip(": ")]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(parts) < 4:
        parts.append(f"{type(cause).__name__}: {cause}".rstrip(": "))
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts)


def _keys(tps: Iterable[TopicPartition]) -> list[TopicPartitionKey]:
    return [(tp.topic, tp.partition) for tp in tps]


def _names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(tps)) or "none"


async def _stop_quietly(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    try:
        await client.stop()
    except Exception:  # stopping a half-started client may raise anything; nothing to do
        logger.debug("kafka: error while stopping a client", exc_info=True)


async def start_producer(
    bootstrap_servers: str,
    client_id: str,
    security: tuple[tuple[str, Any], ...] = (),
    *,
    max_request_size: int | None = None,
) -> AIOKafkaProducer:
    """An idempotent producer (acks=all), for dead letters, the bridge and the simulator."""
    extra: dict[str, Any] = {"max_request_size": max_request_size} if max_request_size else {}
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        **extra,
        **_client_kwargs(security),
    )
    try:
        await producer.start()
    except BaseException:
        await _stop_quietly(producer)
        raise
    return producer
