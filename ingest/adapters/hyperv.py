"""Hyper-V Replica: `Measure-VMReplication` / `Get-VMReplication` piped through `ConvertTo-Json`.

Input: one message per run of the cmdlet on a host — a single object or an array of them, from
Windows PowerShell 5.1 (dates `\\/Date(ms)\\/`, enums as integers, TimeSpans as objects, arrays
sometimes wrapped as `{"value": [...], "Count": n}`) or PowerShell 7 (ISO dates with an offset,
enums as integers or, with `-EnumsAsStrings`, names). Field names and enum values are those of
`Microsoft.HyperV.PowerShell.VMReplicationHealth` / `VMReplication`; see docs/adapters.md for the
field-by-field table and the sources.

Output: replication events, per source record
- `cycle_completed` when it has a LastReplicationTime: ts = recovery point = LastReplicationTime
  (the newest change set the replica holds; LastAppliedLogTime lags it — docs/adapters.md),
  event_id from the VM and that time, so every later sample of the same cycle is a duplicate;
- a state event when ReplicationState says more than "replicating" (paused, failed,
  resync_required, initial replication, failover), dated at the sample time and keyed by the
  VM, the state and the last replication time, so one episode is one event;
- `test_failover_completed` at LastTestFailoverInitiatedTime.
Records reported from the replica side (ReplicationMode other than Primary) are ignored unless
they report a failover: the primary reports the relationship.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from ingest.adapters.base import DEFAULT_MAX_MESSAGE_BYTES, Adapted, AdapterResult, locate_records
from ingest.adapters.common import (
    INDEX,
    ITEM,
    event_id,
    first_failure,
    identity_checks,
    parse_enum,
    parse_timespan_ms,
    parse_timestamp_ms,
    quoted,
    read_records,
    rejects_frame,
    text_fields,
)
from ingest.adapters.identity import IdentitySettings
from ingest.contracts import FIELDS, Stream
from ingest.decode import BAD_TIMESTAMP, MISSING_FIELD, UNKNOWN_ENUM, WRONG_TYPE
from ingest.source import Batch

FORMAT = "hyperv_replica_json"

# Microsoft.HyperV.PowerShell enums, in value order (0, 1, 2, ...).
HEALTH_STATES = ("NotApplicable", "Normal", "Warning", "Critical")
REPLICATION_STATES = (
    "Disabled",
    "ReadyForInitialReplication",
    "InitialReplicationInProgress",
    "WaitingForInitialReplication",
    "Replicating",
    "PreparedForFailover",
    "FailedOverWaitingCompletion",
    "FailedOver",
    "Suspended",
    "Error",
    "WaitingForStartResynchronize",
    "Resynchronizing",
    "ResynchronizeSuspended",
    "RecoveryInProgress",
    "FailbackInProgress",
    "FailbackComplete",
    "WaitingForUpdateCompletion",
    "UpdateError",
    "WaitingForRepurposeCompletion",
    "PreparedForSyncReplication",
    "PreparedForGroupReverseReplication",
    "FiredrillInProgress",
)
REPLICATION_MODES = ("None", "Primary", "Replica", "TestReplica", "ExtendedReplica")
PRIMARY = REPLICATION_MODES.index("Primary")

# ReplicationState → the canonical kind it is reported as (states absent: no state event).
STATE_KINDS: dict[str, str] = {
    "ReadyForInitialReplication": "initial_replication_started",
    "InitialReplicationInProgress": "initial_replication_started",
    "WaitingForInitialReplication": "initial_replication_started",
    "PreparedForFailover": "planned_failover",
    "FailedOverWaitingCompletion": "unplanned_failover",
    "FailedOver": "unplanned_failover",
    "Suspended": "paused",
    "ResynchronizeSuspended": "paused",
    "Error": "cycle_failed",
    "UpdateError": "cycle_failed",
    "WaitingForStartResynchronize": "resync_required",
    "Resynchronizing": "resync_required",
    "FailbackComplete": "failback_completed",
}
FAILOVER_STATES = ("FailedOverWaitingCompletion", "FailedOver")

# The source fields read (as text). `State`/`Health`/`Mode` are the cmdlets' alias properties;
# `SampledAt` is not Hyper-V's: rpowatch's collector adds the time it ran the cmdlet.
SOURCE_FIELDS = (
    "VMName",
    "VMId",
    "PrimaryServerName",
    "ComputerName",
    "ReplicaServerName",
    "CurrentReplicaServerName",
    "ReplicationState",
    "State",
    "ReplicationHealth",
    "Health",
    "ReplicationMode",
    "Mode",
    "LastReplicationTime",
    "LastTestFailoverInitiatedTime",
    "PendingReplicationSize",
    "AverageReplicationSize",
    "AverageReplicationLatency",
    "ReplicationFrequencySec",
    "SampledAt",
)
# Windows PowerShell 5.1 may write an array as {"value": [...], "Count": n}.
READ_FIELDS: dict[str, pl.DataType] = {
    **text_fields(SOURCE_FIELDS),
    "value": pl.List(pl.Struct(text_fields(SOURCE_FIELDS))),
    "Count": pl.String(),
}

REPLICATION_COLUMNS = [spec.name for spec in FIELDS[Stream.REPLICATION]]


@dataclass(frozen=True)
class HyperVSettings:
    """`default_frequency_s`: the replication interval assumed when a record has no
    ReplicationFrequencySec (Measure-VMReplication has none; Hyper-V's default is 300 s); None
    dead-letters such records instead."""

    identity: IdentitySettings = field(default_factory=IdentitySettings)
    default_frequency_s: int | None = 300
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


class HyperVReplicaAdapter:
    format = FORMAT
    default_stream = Stream.REPLICATION

    def __init__(self, settings: HyperVSettings = HyperVSettings()) -> None:
        self._settings = settings

    def locate(self, payload: bytes, items: Sequence[int]) -> list[tuple[bytes, str]]:
        return locate_records(payload, items, None)

    def adapt(self, batch: Batch) -> AdapterResult:
        records = read_records(batch.payloads, "object_or_array", READ_FIELDS, self._settings.max_message_bytes)
        rows = _unwrap_value_arrays(records.frame)
        stream = Stream.REPLICATION.value
        read_rejects = rejects_frame(records.rejects.rename({"index": INDEX, "item": ITEM}), stream)
        if rows.is_empty():
            return AdapterResult(rejects=read_rejects)

        reason, detail = first_failure(self._checks())
        staged = rows.with_columns(self._derived(batch.received_at_ms)).with_columns(
            reason.alias("reason"), detail.alias("detail")
        )
        # The primary reports the relationship; the replica side only matters when it reports a
        # failover. A mode that is not a VMReplicationMode at all is a reject, not ignored.
        mode = pl.col("mode")
        relevant = mode.is_null() | (mode == PRIMARY) | pl.col("state_name").is_in(FAILOVER_STATES).fill_null(False)
        rejected = staged.filter(relevant & pl.col("reason").is_not_null())
        good = staged.filter(relevant & pl.col("reason").is_null())
        events = self._events(good)
        sources = events.select(INDEX, ITEM).unique().height if events.height else 0
        ignored = staged.height - rejected.height - sources
        return AdapterResult(
            adapted={Stream.REPLICATION: Adapted.of(Stream.REPLICATION, events, REPLICATION_COLUMNS)} if events.height else {},
            rejects=pl.concat([read_rejects, rejects_frame(rejected, stream)]),
            ignored=ignored,
        )

    # --- per-record columns ----------------------------------------------------------------

    def _derived(self, received_at_ms: int) -> list[pl.Expr]:
        ident = self._settings.identity
        vm_source = pl.col("VMId") if ident.vm_source == "id" else pl.col("VMName")
        server = pl.coalesce("PrimaryServerName", "ComputerName")
        replica = pl.coalesce("CurrentReplicaServerName", "ReplicaServerName")
        default_frequency = self._settings.default_frequency_s
        return [
            vm_source.alias("vm_key"),
            ident.vm.resolve(vm_source).alias("vm_id"),
            server.alias("server"),
            ident.cluster.resolve(server).alias("cluster_id"),
            replica.alias("replica"),
            ident.target.resolve(replica).alias("target_id"),
            pl.coalesce("ReplicationState", "State").alias("state_raw"),
            parse_enum(pl.coalesce("ReplicationState", "State"), REPLICATION_STATES).alias("state"),
            pl.coalesce("ReplicationHealth", "Health").alias("health_raw"),
            parse_enum(pl.coalesce("ReplicationHealth", "Health"), HEALTH_STATES).alias("health"),
            pl.coalesce("ReplicationMode", "Mode").alias("mode_raw"),
            parse_enum(pl.coalesce("ReplicationMode", "Mode"), REPLICATION_MODES).alias("mode"),
            parse_enum(pl.coalesce("ReplicationState", "State"), REPLICATION_STATES)
            .replace_strict(dict(enumerate(REPLICATION_STATES)), default=None, return_dtype=pl.String)
            .alias("state_name"),
            parse_timestamp_ms(pl.col("LastReplicationTime"), naive_is_utc=False).alias("last_ms"),
            parse_timestamp_ms(pl.col("LastTestFailoverInitiatedTime"), naive_is_utc=False).alias("test_ms"),
            pl.coalesce(
                parse_timestamp_ms(pl.col("SampledAt"), naive_is_utc=False), pl.lit(received_at_ms, dtype=pl.Int64)
            ).alias("sample_ms"),
            parse_timespan_ms(pl.col("AverageReplicationLatency")).alias("latency_ms"),
            pl.coalesce(
                pl.col("ReplicationFrequencySec"),
                pl.lit(None if default_frequency is None else str(default_frequency), dtype=pl.String),
            ).alias("frequency_s"),
        ]

    def _checks(self) -> list[tuple[pl.Expr, pl.Expr]]:
        vm_field = "VMId" if self._settings.identity.vm_source == "id" else "VMName"

        def enum_check(raw: str, parsed: str, name: str, values: tuple[str, ...]) -> tuple[pl.Expr, pl.Expr]:
            text = f"{UNKNOWN_ENUM}: {name}"
            allowed = f" is not one of {', '.join(values)} (0-{len(values) - 1})"
            return (
                pl.col(raw).is_not_null() & pl.col(parsed).is_null(),
                pl.lit(text) + quoted(raw) + pl.lit(allowed),
            )

        def ts_check(raw: str, parsed: str) -> tuple[pl.Expr, pl.Expr]:
            return (
                pl.col(raw).is_not_null() & pl.col(parsed).is_null(),
                pl.lit(f"{BAD_TIMESTAMP}: {raw}") + quoted(raw) + pl.lit(" is neither \\/Date(ms)\\/ nor ISO 8601 with an offset"),
            )

        return [
            *identity_checks("vm_id", "vm_key", vm_field, "vm"),
            *identity_checks("cluster_id", "server", "PrimaryServerName", "cluster"),
            *identity_checks("target_id", "replica", "ReplicaServerName", "target"),
            enum_check("state_raw", "state", "ReplicationState", REPLICATION_STATES),
            enum_check("health_raw", "health", "ReplicationHealth", HEALTH_STATES),
            enum_check("mode_raw", "mode", "ReplicationMode", REPLICATION_MODES),
            ts_check("LastReplicationTime", "last_ms"),
            ts_check("LastTestFailoverInitiatedTime", "test_ms"),
            ts_check("SampledAt", "sample_ms"),
            (
                pl.col("AverageReplicationLatency").is_not_null() & pl.col("latency_ms").is_null(),
                pl.lit(f"{WRONG_TYPE}: AverageReplicationLatency must be a TimeSpan (object with Ticks, or [d.]hh:mm:ss)"),
            ),
            (pl.col("frequency_s").is_null(), pl.lit(f"{MISSING_FIELD}: ReplicationFrequencySec (or set adapters.hyperv.default_frequency_s)")),
        ]

    # --- events ------------------------------------------------------------------------------

    def _events(self, good: pl.DataFrame) -> pl.DataFrame:
        if good.is_empty():
            return pl.DataFrame()
        frequency = pl.col("frequency_s").cast(pl.Float64, strict=False)
        common = [
            pl.col(INDEX),
            pl.col(ITEM),
            pl.col("cluster_id"),
            pl.col("vm_id"),
            pl.col("target_id"),
            pl.lit("hyperv_replica").alias("technology"),
            pl.col("frequency_s"),
        ]
        last = pl.col("last_ms")
        cycles = good.filter(last.is_not_null()).select(
            *common,
            event_id("hvr:c", pl.col("vm_key"), last).alias("event_id"),
            last.alias("ts"),
            pl.lit("cycle_completed").alias("kind"),
            last.alias("recovery_point_ts"),
            pl.col("PendingReplicationSize").alias("pending_bytes"),
            pl.col("latency_ms").round(0).cast(pl.Int64).alias("duration_ms"),
            (pl.col("AverageReplicationSize").cast(pl.Float64, strict=False) / frequency).alias("churn_bytes_per_s"),
        )
        state_kind = pl.col("state_name").replace_strict(STATE_KINDS, default=None, return_dtype=pl.String)
        states = good.filter(state_kind.is_not_null()).select(
            *common,
            event_id("hvr:s", state_kind, pl.col("vm_key"), last.fill_null(0)).alias("event_id"),
            pl.col("sample_ms").alias("ts"),
            state_kind.alias("kind"),
            pl.lit(None, dtype=pl.Int64).alias("recovery_point_ts"),
            pl.col("PendingReplicationSize").alias("pending_bytes"),
            pl.lit(None, dtype=pl.Int64).alias("duration_ms"),
            pl.lit(None, dtype=pl.Float64).alias("churn_bytes_per_s"),
        )
        tests = good.filter(pl.col("test_ms").is_not_null()).select(
            *common,
            event_id("hvr:t", pl.col("vm_key"), pl.col("test_ms")).alias("event_id"),
            pl.col("test_ms").alias("ts"),
            pl.lit("test_failover_completed").alias("kind"),
            pl.lit(None, dtype=pl.Int64).alias("recovery_point_ts"),
            pl.lit(None, dtype=pl.String).alias("pending_bytes"),
            pl.lit(None, dtype=pl.Int64).alias("duration_ms"),
            pl.lit(None, dtype=pl.Float64).alias("churn_bytes_per_s"),
        )
        events = pl.concat([cycles, states, tests], how="vertical_relaxed")
        return events.with_columns(
            pl.lit(None, dtype=pl.Int64).alias("bytes"),
            pl.lit(None, dtype=pl.Int64).alias("vhd_bytes"),
            pl.lit(None, dtype=pl.String).alias("storage_path_id"),
            pl.lit(None, dtype=pl.String).alias("service_group"),
        ).sort(INDEX, ITEM, "ts", maintain_order=True)


def _unwrap_value_arrays(frame: pl.DataFrame) -> pl.DataFrame:
    """Windows PowerShell 5.1 serializes some arrays as `{"value": [...], "Count": n}`; such a
    record is replaced by the records of its `value` (ITEM: the position within `value`)."""
    wrapper = (
        pl.col("value").is_not_null() & pl.col("Count").is_not_null() & pl.col("VMName").is_null() & pl.col("VMId").is_null()
    )
    plain = frame.filter(~wrapper).select(INDEX, ITEM, *SOURCE_FIELDS)
    wrappers = frame.filter(wrapper)
    if wrappers.is_empty():
        return plain
    inner = (
        wrappers.select(INDEX, "value")
        .with_columns(pl.int_ranges(0, pl.col("value").list.len(), dtype=pl.Int64).alias(ITEM))
        .explode("value", ITEM)
        .filter(pl.col("value").is_not_null())
        .unnest("value")
        .select(INDEX, ITEM, *SOURCE_FIELDS)
    )
    return pl.concat([plain, inner])
