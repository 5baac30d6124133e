"""Entity state tables and how a decoded batch updates them.

Every update is one vectorized pass: the batch is reduced to one row per entity, then joined
with the table. Updates are order-insensitive where the contract demands it: a recovery point
only moves forward (max), status fields follow the newest event time, and events already seen
(same `event_id` within the dedupe window) are dropped before they count.

Tables are never mutated in place: each update returns new DataFrames, so a snapshot handed to
a scrape stays consistent while the next batch is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import polars as pl

from rules.policy import DEFAULT_POLICY, Policy, resolve

MS = pl.Int64

# Replication kind → the replication status it leaves the VM in (kinds absent: no change).
REPLICATION_STATUS = {
    "cycle_completed": "replicating",
    "resumed": "replicating",
    "resync_completed": "replicating",
    "initial_replication_completed": "replicating",
    "failback_completed": "replicating",
    "reverse_replication_started": "replicating",
    "cycle_failed": "failed",
    "paused": "paused",
    "resync_required": "resync_required",
    "initial_replication_started": "initial_replication",
    "planned_failover": "failed_over",
    "unplanned_failover": "failed_over",
}

REPLICATION_SCHEMA = pl.Schema(
    {
        "vm_id": pl.String(),
        "cluster_id": pl.String(),
        "target_id": pl.String(),
        "technology": pl.String(),
        "frequency_s": MS(),
        "first_seen_ms": MS(),
        "last_event_ms": MS(),
        "last_recovery_point_ms": MS(),
        "last_failover_test_ms": MS(),
        "status": pl.String(),
        "status_since_ms": MS(),
        "pending_bytes": MS(),
        "vhd_bytes": MS(),
        "churn_bytes_per_s": pl.Float64(),
        "storage_path_id": pl.String(),
        "service_group": pl.String(),
        "rpo_target_s": pl.Float64(),
        "failover_test_max_age_s": pl.Float64(),
    }
)

BACKUP_SCHEMA = pl.Schema(
    {
        "vm_id": pl.String(),
        "cluster_id": pl.String(),
        "first_seen_ms": MS(),
        "last_event_ms": MS(),
        "last_success_ms": MS(),
        "last_restore_test_ms": MS(),
        "consecutive_failures": MS(),
        "backup_rpo_s": pl.Float64(),
        "restore_test_max_age_s": pl.Float64(),
    }
)

NODE_SCHEMA = pl.Schema(
    {
        "cluster_id": pl.String(),
        "node_id": pl.String(),
        "last_heartbeat_ms": MS(),
        "state": pl.String(),
        "memory_bytes": MS(),
        "memory_used_bytes": MS(),
        "net_capacity_bytes_per_s": pl.Float64(),
        "net_replication_bytes_per_s": pl.Float64(),
        "iops_capacity": pl.Float64(),
        "iops_used": pl.Float64(),
    }
)

SEEN_SCHEMA = pl.Schema({"event_id": pl.String(), "seen_ms": MS()})


def _empty(schema: pl.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass(frozen=True)
class FleetState:
    """All entity tables at one moment. Immutable: updates return a new FleetState."""

    replication: pl.DataFrame = field(default_factory=lambda: _empty(REPLICATION_SCHEMA))
    backup: pl.DataFrame = field(default_factory=lambda: _empty(BACKUP_SCHEMA))
    nodes: pl.DataFrame = field(default_factory=lambda: _empty(NODE_SCHEMA))
    seen: dict[str, pl.DataFrame] = field(default_factory=dict)


def _ms(column: str) -> pl.Expr:
    return pl.col(column).dt.epoch("ms")


def _last_non_null(column: str) -> pl.Expr:
    """Within a group sorted by event time: the newest non-null value."""
    return pl.col(column).drop_nulls().last()


def _newer(column: str) -> pl.Expr:
    """After joining batch (suffix `_new`) to table: the batch's value when the batch has one
    and it is at least as new as the table's, else the table's."""
    new = pl.col(f"{column}_new")
    newer = pl.col("last_event_ms_new") >= pl.col("last_event_ms").fill_null(-(2**62))
    return pl.when(new.is_not_null() & newer.fill_null(False)).then(new).otherwise(pl.col(column)).alias(column)


def _max_of(column: str) -> pl.Expr:
    return pl.max_horizontal(pl.col(column), pl.col(f"{column}_new")).alias(column)


def _min_of(column: str) -> pl.Expr:
    return pl.min_horizontal(pl.col(column), pl.col(f"{column}_new")).alias(column)


def drop_seen(
    state: FleetState, stream: str, events: pl.DataFrame, now_ms: int, window_ms: int
) -> tuple[FleetState, pl.DataFrame]:
    """Remove events whose `event_id` was already applied within the window (and duplicates
    inside the batch), and remember the new ones."""
    seen = state.seen.get(stream, _empty(SEEN_SCHEMA))
    fresh = events.unique(subset="event_id", keep="first", maintain_order=True).join(
        seen, on="event_id", how="anti"
    )
    remembered = pl.concat(
        [
            seen.filter(pl.col("seen_ms") > now_ms - window_ms),
            fresh.select("event_id", pl.lit(now_ms, dtype=MS).alias("seen_ms")),
        ]
    )
    return replace(state, seen={**state.seen, stream: remembered}), fresh


def drop_clusters(fleet: FleetState, cluster_ids: list[str]) -> FleetState:
    """The fleet without the entities of these instances."""
    keep = ~pl.col("cluster_id").is_in(cluster_ids).fill_null(False)
    return replace(
        fleet,
        replication=fleet.replication.filter(keep),
        backup=fleet.backup.filter(keep),
        nodes=fleet.nodes.filter(keep),
    )


def apply_replication(
    table: pl.DataFrame, events: pl.DataFrame, policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
) -> pl.DataFrame:
    if events.is_empty():
        return table
    kind = pl.col("kind").cast(pl.String)
    reduced = (
        events.sort("ts")
        .with_columns(kind.replace_strict(REPLICATION_STATUS, default=None).alias("status"))
        .group_by("vm_id")
        .agg(
            pl.col("cluster_id").last(),
            pl.col("target_id").last(),
            pl.col("technology").cast(pl.String).last(),
            pl.col("frequency_s").last(),
            _ms("ts").min().alias("first_seen_ms"),
            _ms("ts").max().alias("last_event_ms"),
            _ms("recovery_point_ts").filter(kind == "cycle_completed").max().alias("last_recovery_point_ms"),
            _ms("ts").filter(kind == "test_failover_completed").max().alias("last_failover_test_ms"),
            _last_non_null("status"),
            _ms("ts").filter(pl.col("status").is_not_null()).last().alias("status_since_ms"),
            _last_non_null("pending_bytes"),
            _last_non_null("vhd_bytes"),
            _last_non_null("churn_bytes_per_s"),
            _last_non_null("storage_path_id"),
            _last_non_null("service_group"),
        )
    )
    joined = table.join(reduced, on="vm_id", how="full", coalesce=True, suffix="_new")
    status_changed = pl.col("status_new").is_not_null() & (
        pl.col("status_new") != pl.col("status").fill_null("")
    )
    merged = joined.with_columns(
        _newer("cluster_id"),
        _newer("target_id"),
        _newer("technology"),
        _newer("frequency_s"),
        _min_of("first_seen_ms"),
        _max_of("last_recovery_point_ms"),
        _max_of("last_failover_test_ms"),
        _newer("status"),
        pl.when(status_changed & (pl.col("last_event_ms_new") >= pl.col("last_event_ms").fill_null(0)))
        .then(pl.col("status_since_ms_new"))
        .otherwise(pl.col("status_since_ms"))
        .alias("status_since_ms"),
        _newer("pending_bytes"),
        _newer("vhd_bytes"),
        _newer("churn_bytes_per_s"),
        _newer("storage_path_id"),
        _newer("service_group"),
    ).with_columns(_max_of("last_event_ms"))
    columns = set(merged.columns)
    twice_interval = pl.col("frequency_s").cast(pl.Float64) * 2
    return merged.with_columns(
        resolve(policies, columns, "replication_rpo_seconds", twice_interval).alias("rpo_target_s"),
        resolve(
            policies, columns, "failover_test_max_age_seconds", pl.lit(DEFAULT_POLICY.failover_test_max_age_seconds)
        ).alias("failover_test_max_age_s"),
    ).select(REPLICATION_SCHEMA.names())


def apply_backup(
    table: pl.DataFrame, events: pl.DataFrame, policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
) -> pl.DataFrame:
    if events.is_empty():
        return table
    kind = pl.col("kind").cast(pl.String)
    success = kind.is_in(["succeeded", "warning"])
    ts = _ms("ts")
    batch_success = pl.when(success).then(ts).max().over("vm_id")
    reduced = (
        events.with_columns(batch_success.alias("last_success_job_ms"))
        .group_by("vm_id")
        .agg(
            pl.col("cluster_id").sort_by("ts").last(),
            ts.min().alias("first_seen_ms"),
            ts.max().alias("last_event_ms"),
            _ms("recovery_point_ts").filter(success).max().alias("last_success_ms"),
            ts.filter(kind == "restore_test_succeeded").max().alias("last_restore_test_ms"),
            pl.col("last_success_job_ms").first(),
            # Failed jobs after this batch's newest success (all of them if it has none).
            ((kind == "failed") & (ts > pl.col("last_success_job_ms").fill_null(-(2**62))))
            .sum()
            .cast(MS)
            .alias("failures"),
        )
    )
    joined = table.join(reduced, on="vm_id", how="full", coalesce=True, suffix="_new")
    merged = joined.with_columns(
        _newer("cluster_id"),
        _min_of("first_seen_ms"),
        _max_of("last_success_ms"),
        _max_of("last_restore_test_ms"),
        pl.when(pl.col("last_success_job_ms").is_not_null())
        .then(pl.col("failures"))
        .otherwise(pl.col("consecutive_failures").fill_null(0) + pl.col("failures").fill_null(0))
        .alias("consecutive_failures"),
    ).with_columns(_max_of("last_event_ms"))
    columns = set(merged.columns)
    return merged.with_columns(
        resolve(policies, columns, "backup_rpo_seconds", pl.lit(DEFAULT_POLICY.backup_rpo_seconds)).alias(
            "backup_rpo_s"
        ),
        resolve(
            policies, columns, "restore_test_max_age_seconds", pl.lit(DEFAULT_POLICY.restore_test_max_age_seconds)
        ).alias("restore_test_max_age_s"),
    ).select(BACKUP_SCHEMA.names())


def apply_heartbeats(table: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    if events.is_empty():
        return table
    reduced = (
        events.sort("ts")
        .group_by("cluster_id", "node_id")
        .agg(
            _ms("ts").max().alias("last_event_ms"),
            pl.col("state").cast(pl.String).last(),
            *[
                _last_non_null(c)
                for c in (
                    "memory_bytes",
                    "memory_used_bytes",
                    "net_capacity_bytes_per_s",
                    "net_replication_bytes_per_s",
                    "iops_capacity",
                    "iops_used",
                )
            ],
        )
    )
    table = table.rename({"last_heartbeat_ms": "last_event_ms"})
    joined = table.join(reduced, on=["cluster_id", "node_id"], how="full", coalesce=True, suffix="_new")
    merged = joined.with_columns(
        *[
            _newer(c)
            for c in (
                "state",
                "memory_bytes",
                "memory_used_bytes",
                "net_capacity_bytes_per_s",
                "net_replication_bytes_per_s",
                "iops_capacity",
                "iops_used",
            )
        ]
    ).with_columns(_max_of("last_event_ms"))
    return merged.rename({"last_event_ms": "last_heartbeat_ms"}).select(NODE_SCHEMA.names())
