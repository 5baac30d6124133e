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

# Events with the same timestamp are ordered by how grave the status they report is, so the
# outcome never depends on arrival order: the graver status wins a tie.
STATUS_RANK = {
    "replicating": 0,
    "initial_replication": 1,
    "paused": 2,
    "failed": 3,
    "resync_required": 4,
    "failed_over": 5,
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
        "status_event_ms": MS(),  # time of the newest event that reported a status
        "status_since_ms": MS(),
        "pending_bytes": MS(),
        "vhd_bytes": MS(),
        "churn_bytes_per_s": pl.Float64(),
        "storage_path_id": pl.String(),
        "service_group": pl.String(),
        "rpo_target_s": pl.Float64(),
        "failover_test_max_age_s": pl.Float64(),
        # Hash of (cluster_id, target_id): joins and groups per link on an integer, not strings.
        "link_key": pl.UInt64(),
        # Sliding-window cycle counters (see WindowCounters): index of the current window
        # bucket, and completed / missed cycles in it and in the one before.
        "window_bucket": MS(),
        "completed_cur": MS(),
        "completed_prev": MS(),
        "missed_cur": MS(),
        "missed_prev": MS(),
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
        "last_success_job_ms": MS(),
        # Times of failed jobs after the newest successful one (at most MAX_FAILURES_KEPT):
        # kept as a set so that any order of arrival gives the same count.
        "failure_ts": pl.List(MS()),
        "consecutive_failures": MS(),
        "backup_rpo_s": pl.Float64(),
        "restore_test_max_age_s": pl.Float64(),
        # Recovery points held per retention tier: created minus expired, from events that
        # carry a tier. `tiers_reported` is false for products that never say.
        "daily_points": MS(),
        "weekly_points": MS(),
        "monthly_points": MS(),
        "yearly_points": MS(),
        "tiers_reported": pl.Boolean(),
        "retention_daily": pl.Float64(),
        "retention_weekly": pl.Float64(),
        "retention_monthly": pl.Float64(),
        "retention_yearly": pl.Float64(),
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
        # Exponentially weighted averages over `rolling_window_s` (throughput and IOPS are
        # judged over minutes, not single samples).
        "net_replication_avg": pl.Float64(),
        "iops_used_avg": pl.Float64(),
        "source": pl.String(),  # the source its heartbeats arrive through
    }
)

# Per instance: how far event time is from arrival time, smoothed (heartbeats only: they are
# samples of "now", unlike replayed or restated events).
CLUSTER_SCHEMA = pl.Schema(
    {
        "cluster_id": pl.String(),
        "clock_skew_s": pl.Float64(),
        "skew_updated_ms": MS(),
    }
)

TIERS = ("daily", "weekly", "monthly", "yearly")
MAX_FAILURES_KEPT = 20

# Event ids applied recently, with their instance so that a hand-over can forget them.
SEEN_SCHEMA = pl.Schema({"event_id": pl.String(), "cluster_id": pl.String(), "seen_ms": MS()})


def _empty(schema: pl.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass(frozen=True)
class FleetState:
    """All entity tables at one moment. Immutable: updates return a new FleetState."""

    replication: pl.DataFrame = field(default_factory=lambda: _empty(REPLICATION_SCHEMA))
    backup: pl.DataFrame = field(default_factory=lambda: _empty(BACKUP_SCHEMA))
    nodes: pl.DataFrame = field(default_factory=lambda: _empty(NODE_SCHEMA))
    clusters: pl.DataFrame = field(default_factory=lambda: _empty(CLUSTER_SCHEMA))
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
            fresh.select("event_id", "cluster_id", pl.lit(now_ms, dtype=MS).alias("seen_ms")),
        ]
    )
    return replace(state, seen={**state.seen, stream: remembered}), fresh


def link_key() -> pl.Expr:
    return pl.concat_str([pl.col("cluster_id"), pl.col("target_id")], separator="\x1f").hash()


def drop_clusters(fleet: FleetState, cluster_ids: list[str]) -> FleetState:
    """The fleet without the entities of these instances."""
    keep = ~pl.col("cluster_id").is_in(cluster_ids).fill_null(False)
    return replace(
        fleet,
        replication=fleet.replication.filter(keep),
        backup=fleet.backup.filter(keep),
        nodes=fleet.nodes.filter(keep),
        clusters=fleet.clusters.filter(keep),
        # The ids too: if the instance comes back, its replayed events must apply again.
        seen={stream: seen.filter(keep) for stream, seen in fleet.seen.items()},
    )


@dataclass(frozen=True)
class WindowCounters:
    """Counts over a sliding monitoring window in O(1) memory per entity: counts of the current
    and the previous fixed bucket (bucket length = the window), and at evaluation
    `current + previous × (share of the previous bucket still inside the window)`. The classic
    sliding-window-counter approximation; exact when events are spread evenly."""

    window_ms: int

    def bucket(self, ts_ms: pl.Expr) -> pl.Expr:
        return ts_ms // self.window_ms


def apply_replication(
    table: pl.DataFrame,
    events: pl.DataFrame,
    policies: tuple[Policy, ...] = (DEFAULT_POLICY,),
    window: WindowCounters = WindowCounters(3_600_000),
) -> pl.DataFrame:
    if events.is_empty():
        return table
    kind = pl.col("kind").cast(pl.String)
    bucket = window.bucket(_ms("ts"))
    # The bucket the entity's counters will be in after this batch.
    newest_bucket = pl.max_horizontal(pl.col("prev_bucket"), bucket.max().over("vm_id"))
    previous = table.select("vm_id", pl.col("window_bucket").alias("prev_bucket"))
    staged = (
        events.join(previous, on="vm_id", how="left")
        .with_columns(newest_bucket.alias("batch_bucket"), bucket.alias("bucket"))
    )

    def count(which: str, offset: int) -> pl.Expr:
        # Every applied event counts once: duplicates were dropped by `drop_seen`, so the count
        # is the same however the events are ordered or split into batches.
        return ((kind == which) & (pl.col("bucket") == pl.col("batch_bucket") - offset)).sum()

    status = kind.replace_strict(REPLICATION_STATUS, default=None)
    final_status = pl.col("status").drop_nulls().last()
    position = pl.int_range(pl.len())
    last_other = position.filter(pl.col("status").is_not_null() & (pl.col("status") != final_status)).max()
    reduced = (
        staged.with_columns(status.alias("status"))
        .with_columns(pl.col("status").replace_strict(STATUS_RANK, default=None).alias("status_rank"))
        .sort("ts", "status_rank", nulls_last=False)
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
            _ms("ts").filter(pl.col("status").is_not_null()).last().alias("status_event_ms"),
            # Start of the batch's final run of its last status, and whether another status
            # came before it in this batch (then that run, not the table's, is the current one).
            _ms("ts").filter((pl.col("status") == final_status) & (position > last_other.fill_null(-1))).min().alias("status_run_ms"),
            _ms("ts").gather(last_other).first().alias("other_status_ms"),
            pl.col("status_rank").gather(last_other).first().alias("other_status_rank"),
            _last_non_null("pending_bytes"),
            _last_non_null("vhd_bytes"),
            _last_non_null("churn_bytes_per_s"),
            _last_non_null("storage_path_id"),
            _last_non_null("service_group"),
            pl.col("batch_bucket").max().alias("window_bucket"),
            count("cycle_completed", 0).cast(MS).alias("completed_cur"),
            count("cycle_completed", 1).cast(MS).alias("completed_prev"),
            count("cycle_missed", 0).cast(MS).alias("missed_cur"),
            count("cycle_missed", 1).cast(MS).alias("missed_prev"),
        )
    )
    joined = table.join(reduced, on="vm_id", how="full", coalesce=True, suffix="_new")
    rank_new = pl.col("status_new").replace_strict(STATUS_RANK, default=-1)
    rank_old = pl.col("status").replace_strict(STATUS_RANK, default=-1)
    old_event = pl.col("status_event_ms").fill_null(-(2**62))
    new_event = pl.col("status_event_ms_new")
    takes_status = (
        pl.col("status_new").is_not_null() & ((new_event > old_event) | ((new_event == old_event) & (rank_new >= rank_old)))
    ).fill_null(False)
    status_changed = takes_status & (pl.col("status_new") != pl.col("status").fill_null(""))
    # Another status in the batch, later than the table's, ended the table's run.
    other_ms = pl.col("other_status_ms")
    interrupted = (
        (other_ms > old_event) | ((other_ms == old_event) & (pl.col("other_status_rank") > rank_old))
    ).fill_null(False)
    old_bucket = pl.col("window_bucket")
    bucket_now = pl.coalesce("window_bucket_new", "window_bucket")

    def shifted(cur: str, prev: str) -> list[pl.Expr]:
        """Old counters moved into the batch's bucket, plus the batch's counts."""
        old_cur = pl.col(cur).fill_null(0)
        old_prev = pl.col(prev).fill_null(0)
        cur_expr = pl.when(old_bucket == bucket_now).then(old_cur).otherwise(0) + pl.col(f"{cur}_new").fill_null(0)
        prev_expr = (
            pl.when(old_bucket == bucket_now)
            .then(old_prev)
            .when(old_bucket == bucket_now - 1)
            .then(old_cur)
            .otherwise(0)
            + pl.col(f"{prev}_new").fill_null(0)
        )
        return [cur_expr.alias(cur), prev_expr.alias(prev)]

    merged = joined.with_columns(
        _newer("cluster_id"),
        _newer("target_id"),
        _newer("technology"),
        _newer("frequency_s"),
        _min_of("first_seen_ms"),
        _max_of("last_recovery_point_ms"),
        _max_of("last_failover_test_ms"),
        pl.when(takes_status).then(pl.col("status_new")).otherwise(pl.col("status")).alias("status"),
        pl.when(takes_status).then(new_event).otherwise(pl.col("status_event_ms")).alias("status_event_ms"),
        pl.when(status_changed | (takes_status & interrupted) | pl.col("status_since_ms").is_null())
        .then(pl.col("status_run_ms"))
        .when(takes_status)
        .then(pl.min_horizontal("status_since_ms", "status_run_ms"))
        .otherwise(pl.col("status_since_ms"))
        .alias("status_since_ms"),
        _newer("pending_bytes"),
        _newer("vhd_bytes"),
        _newer("churn_bytes_per_s"),
        _newer("storage_path_id"),
        _newer("service_group"),
        *shifted("completed_cur", "completed_prev"),
        *shifted("missed_cur", "missed_prev"),
        bucket_now.alias("window_bucket"),
    ).with_columns(_max_of("last_event_ms"))
    columns = set(merged.columns)
    twice_interval = pl.col("frequency_s").cast(pl.Float64) * 2
    return merged.with_columns(
        link_key().alias("link_key"),
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
    tier = pl.col("retention_tier").cast(pl.String)
    success = kind.is_in(["succeeded", "warning"])
    ts = _ms("ts")

    def tier_delta(name: str) -> pl.Expr:
        created = (success & (tier == name)).sum()
        expired = ((kind == "recovery_point_expired") & (tier == name)).sum()
        return (created.cast(MS) - expired.cast(MS)).alias(f"{name}_points")

    reduced = events.group_by("vm_id").agg(
        pl.col("cluster_id").sort_by("ts").last(),
        ts.min().alias("first_seen_ms"),
        ts.max().alias("last_event_ms"),
        _ms("recovery_point_ts").filter(success).max().alias("last_success_ms"),
        ts.filter(kind == "restore_test_succeeded").max().alias("last_restore_test_ms"),
        ts.filter(success).max().alias("last_success_job_ms"),
        ts.filter(kind == "failed").unique().alias("failure_ts"),
        *[tier_delta(t) for t in TIERS],
        tier.is_not_null().any().alias("tiers_reported"),
    )
    joined = table.join(reduced, on="vm_id", how="full", coalesce=True, suffix="_new")
    last_success = pl.max_horizontal("last_success_job_ms", "last_success_job_ms_new")
    failures = (
        pl.concat_list(
            pl.col("failure_ts").fill_null(pl.lit([], dtype=pl.List(MS()))),
            pl.col("failure_ts_new").fill_null(pl.lit([], dtype=pl.List(MS()))),
        )
        .list.eval(pl.element().unique().sort())
        .list.tail(MAX_FAILURES_KEPT)
    )
    merged = (
        joined.with_columns(
            _newer("cluster_id"),
            _min_of("first_seen_ms"),
            _max_of("last_success_ms"),
            _max_of("last_restore_test_ms"),
            last_success.alias("last_success_job_ms"),
            failures.alias("failure_ts"),
            *[
                (pl.col(f"{t}_points").fill_null(0) + pl.col(f"{t}_points_new").fill_null(0))
                .clip(lower_bound=0)
                .alias(f"{t}_points")
                for t in TIERS
            ],
            (pl.col("tiers_reported").fill_null(False) | pl.col("tiers_reported_new").fill_null(False)).alias(
                "tiers_reported"
            ),
        )
        .pipe(_failures_after_last_success)
        .with_columns(pl.col("failure_ts").list.len().cast(MS).alias("consecutive_failures"), _max_of("last_event_ms"))
    )
    columns = set(merged.columns)
    return merged.with_columns(
        resolve(policies, columns, "backup_rpo_seconds", pl.lit(DEFAULT_POLICY.backup_rpo_seconds)).alias(
            "backup_rpo_s"
        ),
        resolve(
            policies, columns, "restore_test_max_age_seconds", pl.lit(DEFAULT_POLICY.restore_test_max_age_seconds)
        ).alias("restore_test_max_age_s"),
        *[
            resolve(policies, columns, f"retention_{t}", pl.lit(float(getattr(DEFAULT_POLICY, f"retention_{t}")))).alias(
                f"retention_{t}"
            )
            for t in TIERS
        ],
    ).select(BACKUP_SCHEMA.names())


def _failures_after_last_success(frame: pl.DataFrame) -> pl.DataFrame:
    """Only failures after the newest success are consecutive. Done by exploding just the rows
    that have failures (few), since list filters cannot compare with another column."""
    indexed = frame.with_row_index("__row")
    kept = (
        indexed.filter(pl.col("failure_ts").list.len() > 0)
        .select("__row", "failure_ts", "last_success_job_ms")
        .explode("failure_ts")
        .filter(pl.col("failure_ts") > pl.col("last_success_job_ms").fill_null(-(2**62)))
        .group_by("__row")
        .agg(pl.col("failure_ts"))
    )
    empty = pl.lit([], dtype=pl.List(MS()))
    return (
        indexed.drop("failure_ts")
        .join(kept, on="__row", how="left")
        .with_columns(pl.col("failure_ts").fill_null(empty))
        .drop("__row")
    )


_NODE_LAST = (
    "memory_bytes",
    "memory_used_bytes",
    "net_capacity_bytes_per_s",
    "net_replication_bytes_per_s",
    "iops_capacity",
    "iops_used",
)


def _ewma(column: str, sample: str, dt_ms: pl.Expr, tau_ms: float) -> pl.Expr:
    """Exponentially weighted average with time constant tau: a sample `dt` after the previous
    one moves the average by 1 − e^(−dt/τ) of the difference."""
    alpha = 1.0 - (-(dt_ms.cast(pl.Float64).clip(lower_bound=0)) / tau_ms).exp()
    old = pl.col(column)
    new = pl.col(sample)
    return (
        pl.when(old.is_null())
        .then(new)
        .when(new.is_null())
        .then(old)
        .otherwise(old + alpha * (new - old))
        .alias(column)
    )


def apply_heartbeats(
    table: pl.DataFrame, events: pl.DataFrame, source: str = "", rolling_window_s: float = 300.0
) -> pl.DataFrame:
    if events.is_empty():
        return table
    reduced = (
        events.sort("ts")
        .group_by("cluster_id", "node_id")
        .agg(
            _ms("ts").max().alias("last_event_ms"),
            pl.col("state").cast(pl.String).last(),
            *[_last_non_null(c) for c in _NODE_LAST],
        )
        .with_columns(pl.lit(source, dtype=pl.String).alias("source"))
    )
    table = table.rename({"last_heartbeat_ms": "last_event_ms"})
    joined = table.join(reduced, on=["cluster_id", "node_id"], how="full", coalesce=True, suffix="_new")
    newer = pl.col("last_event_ms_new") > pl.col("last_event_ms").fill_null(-(2**62))
    dt = pl.col("last_event_ms_new") - pl.col("last_event_ms")
    tau_ms = rolling_window_s * 1000
    merged = joined.with_columns(
        *[_newer(c) for c in ("state", "source", *_NODE_LAST)],
        # Only newer samples move the averages: a late or repeated heartbeat changes nothing.
        pl.when(newer.fill_null(False))
        .then(_ewma("net_replication_avg", "net_replication_bytes_per_s_new", dt, tau_ms))
        .otherwise(pl.col("net_replication_avg"))
        .alias("net_replication_avg"),
        pl.when(newer.fill_null(False))
        .then(_ewma("iops_used_avg", "iops_used_new", dt, tau_ms))
        .otherwise(pl.col("iops_used_avg"))
        .alias("iops_used_avg"),
    ).with_columns(_max_of("last_event_ms"))
    return merged.rename({"last_event_ms": "last_heartbeat_ms"}).select(NODE_SCHEMA.names())


SKEW_SMOOTHING = 0.3  # weight of a new batch's median skew


def apply_clock_skew(table: pl.DataFrame, heartbeats: pl.DataFrame) -> pl.DataFrame:
    """Per instance, the median of (event time − arrival time) over the batch, smoothed."""
    if heartbeats.is_empty():
        return table
    reduced = heartbeats.group_by("cluster_id").agg(
        ((_ms("ts") - _ms("received_at")).cast(pl.Float64) / 1000).median().alias("clock_skew_s"),
        _ms("received_at").max().alias("skew_updated_ms"),
    )
    joined = table.join(reduced, on="cluster_id", how="full", coalesce=True, suffix="_new")
    old = pl.col("clock_skew_s")
    new = pl.col("clock_skew_s_new")
    return joined.with_columns(
        pl.when(new.is_null())
        .then(old)
        .when(old.is_null())
        .then(new)
        .otherwise(old + SKEW_SMOOTHING * (new - old))
        .alias("clock_skew_s"),
        _max_of("skew_updated_ms"),
    ).select(CLUSTER_SCHEMA.names())
