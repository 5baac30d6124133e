"""The event contracts of contracts.md §1: pydantic models and the matching polars schemas.

The pydantic models describe one record and are what producers (the simulator, adapters, tests)
build events with. The bulk decoder never calls them on the hot path; it validates whole batches
with the field table below (`FIELDS`), which a test keeps in step with the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Literal

import polars as pl
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class Stream(StrEnum):
    REPLICATION = "replication"
    BACKUP = "backup"
    HEARTBEAT = "heartbeat"


REPLICATION_KINDS = (
    "cycle_completed",
    "cycle_failed",
    "cycle_missed",
    "paused",
    "resumed",
    "resync_required",
    "resync_completed",
    "initial_replication_started",
    "initial_replication_completed",
    "test_failover_completed",
    "planned_failover",
    "unplanned_failover",
    "failback_completed",
    "reverse_replication_started",
)
TECHNOLOGIES = ("hyperv_replica", "asr")
FREQUENCIES_S = (30, 300, 900)
BACKUP_PRODUCTS = ("mabs", "azure_backup", "veeam", "commvault", "rubrik", "cohesity", "other")
BACKUP_LEVELS = ("host", "guest")
BACKUP_KINDS = (
    "started",
    "succeeded",
    "failed",
    "warning",
    "restore_test_succeeded",
    "restore_test_failed",
    "recovery_point_expired",
)
BACKUP_TYPES = ("full", "incremental")
RETENTION_TIERS = ("daily", "weekly", "monthly", "yearly")
BACKUP_LOCATIONS = ("local", "azure", "other")
NODE_STATES = ("up", "down", "maintenance", "draining")

EVENT_ID_MAX_CHARS = 128

# Kinds that must carry the recovery point they created (contracts.md §1).
REPLICATION_KINDS_WITH_RECOVERY_POINT = ("cycle_completed",)
BACKUP_KINDS_WITH_RECOVERY_POINT = ("succeeded", "warning", "recovery_point_expired")


# --- pydantic models: one record ------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp needs an offset (RFC 3339) or epoch milliseconds")
    return value.astimezone(timezone.utc)


def _epoch_ms_or_rfc3339(value: object) -> object:
    # Integer epoch milliseconds are part of the contract; pydantic would read them as seconds.
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
    return value


Timestamp = Annotated[datetime, BeforeValidator(_epoch_ms_or_rfc3339), AfterValidator(_utc)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
NonNegFloat = Annotated[float, Field(ge=0)]
EventId = Annotated[str, Field(min_length=1, max_length=EVENT_ID_MAX_CHARS)]
Id = Annotated[str, Field(min_length=1)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: EventId
    ts: Timestamp
    cluster_id: Id


class ReplicationEvent(_Event):
    vm_id: Id
    target_id: Id
    technology: Literal["hyperv_replica", "asr"]
    kind: Literal[
        "cycle_completed",
        "cycle_failed",
        "cycle_missed",
        "paused",
        "resumed",
        "resync_required",
        "resync_completed",
        "initial_replication_started",
        "initial_replication_completed",
        "test_failover_completed",
        "planned_failover",
        "unplanned_failover",
        "failback_completed",
        "reverse_replication_started",
    ]
    frequency_s: Literal[30, 300, 900]
    recovery_point_ts: Timestamp | None = None
    bytes: NonNegInt | None = None
    pending_bytes: NonNegInt | None = None
    vhd_bytes: NonNegInt | None = None
    churn_bytes_per_s: NonNegFloat | None = None
    duration_ms: NonNegInt | None = None
    storage_path_id: str | None = None
    service_group: str | None = None

    @model_validator(mode="after")
    def _recovery_point_when_required(self) -> "ReplicationEvent":
        if self.kind in REPLICATION_KINDS_WITH_RECOVERY_POINT and self.recovery_point_ts is None:
            raise ValueError(f"recovery_point_ts is required for kind {self.kind}")
        return self


class BackupEvent(_Event):
    vm_id: Id
    job_id: Id
    product: Literal["mabs", "azure_backup", "veeam", "commvault", "rubrik", "cohesity", "other"]
    level: Literal["host", "guest"]
    kind: Literal[
        "started",
        "succeeded",
        "failed",
        "warning",
        "restore_test_succeeded",
        "restore_test_failed",
        "recovery_point_expired",
    ]
    backup_type: Literal["full", "incremental"] | None = None
    recovery_point_ts: Timestamp | None = None
    retention_tier: Literal["daily", "weekly", "monthly", "yearly"] | None = None
    location: Literal["local", "azure", "other"] | None = None
    bytes: NonNegInt | None = None
    error_code: str | None = None
    error_message: str | None = None

    @model_validator(mode="after")
    def _recovery_point_when_required(self) -> "BackupEvent":
        if self.kind in BACKUP_KINDS_WITH_RECOVERY_POINT and self.recovery_point_ts is None:
            raise ValueError(f"recovery_point_ts is required for kind {self.kind}")
        return self


class StoragePath(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    path_id: Id
    capacity_bytes: NonNegInt | None = None
    free_bytes: NonNegInt | None = None
    iops_capacity: NonNegFloat | None = None
    iops_used: NonNegFloat | None = None
    online: bool | None = None


class HeartbeatEvent(_Event):
    node_id: Id
    state: Literal["up", "down", "maintenance", "draining"]
    memory_bytes: NonNegInt | None = None
    memory_used_bytes: NonNegInt | None = None
    cpu_cores: NonNegFloat | None = None
    cpu_used_ratio: NonNegFloat | None = None
    iops_capacity: NonNegFloat | None = None
    iops_used: NonNegFloat | None = None
    net_capacity_bytes_per_s: NonNegFloat | None = None
    net_replication_bytes_per_s: NonNegFloat | None = None
    storage: list[StoragePath] | None = None


MODELS: dict[Stream, type[_Event]] = {
    Stream.REPLICATION: ReplicationEvent,
    Stream.BACKUP: BackupEvent,
    Stream.HEARTBEAT: HeartbeatEvent,
}


# --- field table: what the bulk decoder validates ----------------------------------------------

FieldKind = Literal["id", "str", "ts", "int", "float", "enum", "storage"]


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: FieldKind
    required: bool = False
    choices: tuple[str, ...] = ()
    # For fields required only for some values of `kind` (recovery points).
    required_for_kinds: tuple[str, ...] = ()


def _common() -> list[FieldSpec]:
    return [
        FieldSpec("event_id", "id", required=True),
        FieldSpec("ts", "ts", required=True),
        FieldSpec("cluster_id", "id", required=True),
    ]


FIELDS: dict[Stream, tuple[FieldSpec, ...]] = {
    Stream.REPLICATION: (
        *_common(),
        FieldSpec("vm_id", "id", required=True),
        FieldSpec("target_id", "id", required=True),
        FieldSpec("technology", "enum", required=True, choices=TECHNOLOGIES),
        FieldSpec("kind", "enum", required=True, choices=REPLICATION_KINDS),
        FieldSpec("frequency_s", "enum", required=True, choices=tuple(str(f) for f in FREQUENCIES_S)),
        FieldSpec(
            "recovery_point_ts", "ts", required_for_kinds=REPLICATION_KINDS_WITH_RECOVERY_POINT
        ),
        FieldSpec("bytes", "int"),
        FieldSpec("pending_bytes", "int"),
        FieldSpec("vhd_bytes", "int"),
        FieldSpec("churn_bytes_per_s", "float"),
        FieldSpec("duration_ms", "int"),
        FieldSpec("storage_path_id", "str"),
        FieldSpec("service_group", "str"),
    ),
    Stream.BACKUP: (
        *_common(),
        FieldSpec("vm_id", "id", required=True),
        FieldSpec("job_id", "id", required=True),
        FieldSpec("product", "enum", required=True, choices=BACKUP_PRODUCTS),
        FieldSpec("level", "enum", required=True, choices=BACKUP_LEVELS),
        FieldSpec("kind", "enum", required=True, choices=BACKUP_KINDS),
        FieldSpec("backup_type", "enum", choices=BACKUP_TYPES),
        FieldSpec("recovery_point_ts", "ts", required_for_kinds=BACKUP_KINDS_WITH_RECOVERY_POINT),
        FieldSpec("retention_tier", "enum", choices=RETENTION_TIERS),
        FieldSpec("location", "enum", choices=BACKUP_LOCATIONS),
        FieldSpec("bytes", "int"),
        FieldSpec("error_code", "str"),
        FieldSpec("error_message", "str"),
    ),
    Stream.HEARTBEAT: (
        *_common(),
        FieldSpec("node_id", "id", required=True),
        FieldSpec("state", "enum", required=True, choices=NODE_STATES),
        FieldSpec("memory_bytes", "int"),
        FieldSpec("memory_used_bytes", "int"),
        FieldSpec("cpu_cores", "float"),
        FieldSpec("cpu_used_ratio", "float"),
        FieldSpec("iops_capacity", "float"),
        FieldSpec("iops_used", "float"),
        FieldSpec("net_capacity_bytes_per_s", "float"),
        FieldSpec("net_replication_bytes_per_s", "float"),
        FieldSpec("storage", "storage"),
    ),
}

TIMESTAMP = pl.Datetime("ms", "UTC")
STORAGE_DTYPE = pl.List(
    pl.Struct(
        {
            "path_id": pl.String,
            "capacity_bytes": pl.Int64,
            "free_bytes": pl.Int64,
            "iops_capacity": pl.Float64,
            "iops_used": pl.Float64,
            "online": pl.Boolean,
        }
    )
)

_DTYPES: dict[FieldKind, pl.DataType] = {
    "id": pl.String(),
    "str": pl.String(),
    "ts": TIMESTAMP,
    "int": pl.Int64(),
    "float": pl.Float64(),
}


def _dtype(spec: FieldSpec) -> pl.DataType:
    if spec.kind == "enum":
        # frequency_s is an enum of integers on the wire and a number in state.
        return pl.Int64() if spec.name == "frequency_s" else pl.Enum(list(spec.choices))
    if spec.kind == "storage":
        return STORAGE_DTYPE
    return _DTYPES[spec.kind]


def schema(stream: Stream) -> pl.Schema:
    """The polars schema of a decoded, valid batch of `stream` (plus `received_at`)."""
    cols = {spec.name: _dtype(spec) for spec in FIELDS[stream]}
    cols["received_at"] = TIMESTAMP
    return pl.Schema(cols)


SCHEMAS: dict[Stream, pl.Schema] = {stream: schema(stream) for stream in Stream}

# Rejected records: the position in the batch and why. `reason` is a short, bounded label value
# for metrics; `detail` names the field and what was wrong, for the dead-letter headers.
REJECT_SCHEMA = pl.Schema({"index": pl.Int64(), "reason": pl.String(), "detail": pl.String()})
