"""Entity views: the state tables seen at one instant, with the derived columns rules test.

A view is what a rule's condition is written against (`lag_seconds > rpo_target_seconds`) and
what the metrics exporter reads. Column names are the rule-pack vocabulary, so renaming one is a
breaking change for users' packs; label columns use the Prometheus label names of
contracts.md §3.

Prediction (`time_to_breach_seconds`) combines two signals, each giving "seconds until lag
exceeds the RPO" or +Inf:
- the lag trend: once a cycle is overdue (lag > 1.5 × interval) nothing resets the lag, so it
  reaches the RPO in `rpo − lag` seconds;
- the backlog against the link: the next cycle must send the pending bytes plus one interval of
  churn at the throughput this VM can get on its link (its churn plus the link's spare capacity,
  or its fair share `capacity × churn ÷ needed` when the link is saturated). If the lag at that
  completion, `max(lag, interval) + transfer time`, exceeds the RPO, the breach comes in
  `rpo − lag` seconds. A saturated link therefore raises at-risk before the breach.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal, cast

import polars as pl

from rules.state import TIERS, FleetState, identity_hash

INF = float("inf")
# Row number within an entity view, the same for every query of one `Views` (rules use it to
# come back for the labels of the few rows that need them).
ROW = "__row"
# The hash of an entity's identity labels (`identity`): alert ids are made from it.
IDENTITY = "__identity"
DAY_S = 86_400.0


@dataclass(frozen=True)
class Entity:
    name: str
    labels: tuple[str, ...]  # identity: become alert and metric labels
    doc: str


ENTITIES: dict[str, Entity] = {
    e.name: e
    for e in (
        Entity("vm_replication", ("vm", "hci_cluster", "target", "technology"), "one replicated VM"),
        Entity("vm_backup", ("vm", "hci_cluster"), "one backed-up VM"),
        Entity("vm", ("vm", "hci_cluster"), "one VM, replica and backup together"),
        Entity("node", ("hci_cluster", "node"), "one physical node"),
        Entity("link", ("hci_cluster", "target"), "replication link: source instance to target"),
        Entity("cluster", ("hci_cluster",), "one Azure Local instance"),
        Entity("service_group", ("service_group", "hci_cluster"), "the VMs of one application"),
        Entity("storage_path", ("hci_cluster", "storage_path"), "one storage path (volume) of an instance"),
        Entity("source", ("source",), "one ingest source (Kafka, MQTT)"),
        Entity("source_stream", ("source", "stream"), "one stream of one source"),
        Entity("source_partition", ("source", "stream", "partition"), "one partition of a stream (Kafka)"),
    )
}

# What the service tells the engine about its sources at each tick.
SOURCES_SCHEMA = pl.Schema(
    {
        "source": pl.String(),
        "stream": pl.String(),
        "partition": pl.Int32(),  # null for sources without partitions
        "up": pl.Boolean(),
        "last_event_ms": pl.Int64(),
        "accepted_recent": pl.Int64(),
        "rejected_recent": pl.Int64(),
    }
)


@dataclass(frozen=True)
class ViewParams:
    heartbeat_timeout_s: float = 30.0
    at_risk_ratio: float = 0.8
    lookahead_s: float = 300.0
    monitoring_window_s: float = 3600.0
    ingest_stall_s: float = 60.0
    resync_pending_ratio: float = 0.5  # Hyper-V Replica: log above 50 % of the VHD size
    # Declared link capacities (bytes/s) by (hci_cluster, target), when heartbeats carry none.
    link_capacity_bytes_per_s: tuple[tuple[str, str, float], ...] = ()


def _numbered(frame: pl.DataFrame, rows: pl.Series | None, reads: list[pl.Expr] | None = None) -> pl.LazyFrame:
    """`frame` with its row numbers (`ROW`); only the rows numbered `rows` if given, taken by
    position (a few rows out of a million: no pass over the others), and of those only the
    columns `reads` (expressions over the frame, if given) read."""
    if rows is None:
        return frame.lazy().with_row_index(ROW)
    positions = rows.cast(pl.UInt32).alias(ROW)
    if reads is not None:
        # Taking a column costs per row, most for strings: ~7 ms for every column of 15,000
        # VMs, which a tick evaluating only the rows written since it was prepared would pay.
        read = {name for expr in reads for name in expr.meta.root_names()}
        frame = frame.select([name for name in frame.columns if name in read])
    # Taken eagerly: measured 6× cheaper than a gather inside the query.
    return frame[positions].lazy().with_columns(positions)


def _seconds_since(now_ms: int, column: str | pl.Expr) -> pl.Expr:
    expr = pl.col(column) if isinstance(column, str) else column
    return (pl.lit(now_ms) - expr).cast(pl.Float64) / 1000.0


def _epoch_seconds(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Float64) / 1000.0


def _window_count(now_ms: int, window_ms: int, cur: str, prev: str) -> pl.Expr:
    """The sliding-window estimate of state.WindowCounters at `now_ms`."""
    bucket_now = now_ms // window_ms
    inside = 1.0 - (now_ms - bucket_now * window_ms) / window_ms
    b = pl.col("window_bucket")
    current = pl.when(b == bucket_now).then(pl.col(cur)).otherwise(0)
    previous = (
        pl.when(b == bucket_now).then(pl.col(prev)).when(b == bucket_now - 1).then(pl.col(cur)).otherwise(0)
    )
    return current.cast(pl.Float64) + previous.cast(pl.Float64) * inside


# A view's columns, each built only when asked for: a query reading three columns of a view
# does not pay for building (and planning) the thirty others.
_Columns = dict[str, Callable[[], pl.Expr]]


def _selected(columns: _Columns, wanted: Collection[str] | None) -> list[pl.Expr]:
    """The expressions of the `wanted` columns (all if None), in the view's order, with `ROW`
    and `IDENTITY` always."""
    return [build() for name, build in columns.items() if wanted is None or name in wanted or name in (ROW, IDENTITY)]


def _column(name: str) -> Callable[[], pl.Expr]:
    return lambda: pl.col(name)


def _replication_base(
    state: FleetState,
    now_ms: int,
    params: ViewParams,
    rows: pl.Series | None = None,
    wanted: Collection[str] | None = None,
) -> pl.LazyFrame:
    """Every VM's replication columns that need no other table (only the `wanted` ones, if
    given), with its row number (`ROW`); only the rows numbered `rows`, if given."""
    window_ms = int(params.monitoring_window_s * 1000)

    def expected() -> pl.Expr:
        observed_s = pl.min_horizontal(pl.lit(params.monitoring_window_s), _seconds_since(now_ms, "first_seen_ms"))
        return observed_s / pl.col("frequency_s").cast(pl.Float64)

    def missed_ratio() -> pl.Expr:
        completed = _window_count(now_ms, window_ms, "completed_cur", "completed_prev")
        missed = _window_count(now_ms, window_ms, "missed_cur", "missed_prev")
        # A cycle counts as missed when no log was sent within the interval (Hyper-V Replica).
        ratio = pl.max_horizontal(1.0 - completed / expected(), missed / expected()).clip(0.0, 1.0)
        return pl.when(expected() >= 1).then(ratio).otherwise(0.0)

    def resync_needed() -> pl.Expr:
        pending = pl.col("pending_bytes").cast(pl.Float64)
        over = (pending > params.resync_pending_ratio * pl.col("vhd_bytes").cast(pl.Float64)).fill_null(False)
        return (pl.col("status") == "resync_required") | over

    columns: _Columns = {
        ROW: lambda: pl.col(ROW),
        IDENTITY: lambda: pl.col("identity_key").alias(IDENTITY),
        "vm": lambda: pl.col("vm_id").alias("vm"),
        "hci_cluster": lambda: pl.col("cluster_id").alias("hci_cluster"),
        "target": lambda: pl.col("target_id").alias("target"),
        "link_key": lambda: pl.col("link_key"),
        "technology": lambda: pl.col("technology"),
        "service_group": lambda: pl.col("service_group"),
        "storage_path": lambda: pl.col("storage_path_id").alias("storage_path"),
        "status": lambda: pl.col("status"),
        "frequency_s": lambda: pl.col("frequency_s"),
        "last_recovery_point_seconds": lambda: _epoch_seconds("last_recovery_point_ms").alias(
            "last_recovery_point_seconds"
        ),
        # A VM that never completed a cycle is unrecoverable since we first heard of it.
        "lag_seconds": lambda: _seconds_since(now_ms, pl.coalesce("last_recovery_point_ms", "first_seen_ms")).alias(
            "lag_seconds"
        ),
        "rpo_target_seconds": lambda: pl.col("rpo_target_s").alias("rpo_target_seconds"),
        "pending_bytes": lambda: pl.col("pending_bytes"),
        "vhd_bytes": lambda: pl.col("vhd_bytes"),
        "churn_bytes_per_s": lambda: pl.col("churn_bytes_per_s"),
        "status_age_seconds": lambda: _seconds_since(now_ms, "status_since_ms").alias("status_age_seconds"),
        "last_failover_test_seconds": lambda: _epoch_seconds("last_failover_test_ms").alias(
            "last_failover_test_seconds"
        ),
        "failover_test_age_seconds": lambda: _seconds_since(
            now_ms, pl.coalesce("last_failover_test_ms", "first_seen_ms")
        ).alias("failover_test_age_seconds"),
        "failover_test_max_age_seconds": lambda: pl.col("failover_test_max_age_s").alias(
            "failover_test_max_age_seconds"
        ),
        "missed_cycles_ratio": lambda: missed_ratio().alias("missed_cycles_ratio"),
        "expected_cycles": lambda: expected().alias("expected_cycles"),
        "resync_needed": lambda: resync_needed().alias("resync_needed"),
    }
    selected = _selected(columns, wanted)
    return _numbered(state.replication, rows, selected).select(selected)


# What `vm_replication` reads of its link: the prediction needs the first two.
_LINK_FIGURES = ("needed_bytes_per_s", "capacity_bytes_per_s", "saturation_ratio")


def _link_columns(
    links: pl.DataFrame, link_rows: pl.Series, columns: Collection[str] | None, memo: GatherMemo | None = None
) -> pl.LazyFrame:
    """Each VM's link figures, row for row with the base, taken by the VM's link row: a gather
    from a table of a few thousand links instead of a join over every VM. The saturation only
    if the query reads it (the prediction needs the other two). With a `memo`, the last gather
    is reused while the links' figures and the VMs' link rows are those it was made from."""
    saturation = columns is None or "link_saturation_ratio" in columns
    wanted = list(_LINK_FIGURES if saturation else _LINK_FIGURES[:2])
    values = links.select(wanted)
    if memo is not None:
        return memo.gathered(values, link_rows).lazy()
    return values.select(pl.all().gather(link_rows)).lazy()


class GatherMemo:
    """The last full gather of link figures per VM (~4 ms a tick at a million VMs), kept with
    the aggregates: between two refreshes the links' figures seldom change (the sums are
    refreshed every few seconds, capacities follow node heartbeats), so most ticks reuse it.
    Checking costs two comparisons: the links' figures (thousands of rows) and the VMs' link
    rows (one integer per VM)."""

    def __init__(self) -> None:
        self._last: tuple[pl.DataFrame, pl.Series, pl.DataFrame] | None = None
        self._lock = threading.Lock()

    def gathered(self, values: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
        last = self._last
        if (
            last is not None
            and last[0].columns == values.columns
            and last[0].equals(values, null_equal=True)
            and (last[1] is rows or last[1].equals(rows, null_equal=True))
        ):
            return last[2]
        frame = values.select(pl.all().gather(rows))
        with self._lock:
            self._last = (values, rows, frame)
        return frame


class JoinMemo:
    """The row pairs of the last join of each small-table join of the views (instances with
    their replicas and clock skew, storage paths reported with those VMs name), kept with the
    aggregates. The values of those tables change at every heartbeat; their keys (which
    instances, which paths) seldom do. A join on string keys costs 0.8–4.4 ms at 10,000–30,000
    rows, comparing the keys with the last ones 0.1–0.2 ms, so most ticks gather by position."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]] = {}
        self._lock = threading.Lock()

    def rows(self, name: str, left: pl.DataFrame, right: pl.DataFrame, how: Literal["left", "full"]) -> pl.DataFrame:
        """The join of `left` and `right`, two frames of the same key columns: the keys (coalesced)
        and each side's row position, `__left` and `__right` (null where that side has none). A
        left join keeps the order of `left`."""
        last = self._last.get(name)
        if last is not None and last[0].equals(left, null_equal=True) and last[1].equals(right, null_equal=True):
            return last[2]
        keys = left.columns
        pairs = left.with_row_index("__left").join(
            right.with_row_index("__right"),
            on=keys,
            how=how,
            coalesce=True,
            maintain_order="left" if how == "left" else "none",
        ).select(*keys, "__left", "__right")
        with self._lock:
            self._last[name] = (left, right, pairs)
        return pairs


def _gathered(frame: pl.DataFrame, rows: pl.Series, *exprs: pl.Expr | str) -> list[pl.Series]:
    """`exprs` over `frame`, taken at `rows` (null rows give nulls)."""
    return frame.select(exprs).select(pl.all().gather(rows)).get_columns()


def _with_prediction(base: pl.LazyFrame, link_columns: pl.LazyFrame, params: ViewParams) -> pl.LazyFrame:
    """The base plus what needs the VM's link: the prediction and the health state."""
    lag = pl.col("lag_seconds")
    rpo = pl.col("rpo_target_seconds")
    frequency = pl.col("frequency_s").cast(pl.Float64)
    churn = pl.col("churn_bytes_per_s").fill_null(0.0)
    needed = pl.col("needed_bytes_per_s")
    capacity = pl.col("capacity_bytes_per_s")
    achievable = (
        pl.when(needed <= capacity).then(capacity - needed + churn).otherwise(capacity * churn / needed)
    )
    to_send = pl.col("pending_bytes").fill_null(0).cast(pl.Float64) + churn * frequency
    transfer_s = pl.when(achievable > 0).then(to_send / achievable).otherwise(pl.lit(None, dtype=pl.Float64))
    until_rpo = pl.max_horizontal(rpo - lag, pl.lit(0.0))
    by_trend = pl.when(lag > frequency * 1.5).then(until_rpo).otherwise(pl.lit(INF))
    by_backlog = (
        pl.when((pl.max_horizontal(lag, frequency) + transfer_s > rpo).fill_null(False))
        .then(until_rpo)
        .otherwise(pl.lit(INF))
    )
    time_to_breach = pl.min_horizontal(by_trend, by_backlog)
    critical = (
        (lag > rpo) | pl.col("status").is_in(["failed", "resync_required"]).fill_null(False) | pl.col("resync_needed")
    )
    warning = (
        (lag > params.at_risk_ratio * rpo)
        | (pl.col("time_to_breach_seconds") <= params.lookahead_s)
        | pl.col("status").is_in(["paused", "initial_replication"]).fill_null(False)
        | (pl.col("missed_cycles_ratio") >= 0.2)
    )
    return (
        pl.concat([base, link_columns], how="horizontal")
        .with_columns(
            time_to_breach.alias("time_to_breach_seconds"),
            transfer_s.alias("next_transfer_seconds"),
            pl.lit(params.lookahead_s).alias("lookahead_seconds"),
            (params.at_risk_ratio * rpo).alias("at_risk_seconds"),
        )
        .with_columns(
            pl.when(critical)
            .then(pl.lit("critical"))
            .when(warning)
            .then(pl.lit("warning"))
            .otherwise(pl.lit("normal"))
            .alias("health_state")
        )
        .drop("needed_bytes_per_s", "capacity_bytes_per_s", "link_key")
        .rename({"saturation_ratio": "link_saturation_ratio"}, strict=False)
    )


def _backup(
    state: FleetState, now_ms: int, rows: pl.Series | None = None, wanted: Collection[str] | None = None
) -> pl.LazyFrame:
    def retention_compliant() -> pl.Expr:
        age_days = (_seconds_since(now_ms, "first_seen_ms") / DAY_S).floor()
        # A tier can only hold as many points as the VM has been protected for.
        reachable = {"daily": age_days, "weekly": (age_days / 7).floor(), "monthly": (age_days / 30).floor(),
                     "yearly": (age_days / 365).floor()}
        shortfall = [
            (pl.col(f"{t}_points") < pl.min_horizontal(pl.col(f"retention_{t}"), reachable[t])).fill_null(False)
            for t in TIERS
        ]
        return ~pl.col("tiers_reported") | ~pl.any_horizontal(shortfall)

    columns: _Columns = {
        ROW: lambda: pl.col(ROW),
        IDENTITY: lambda: pl.col("identity_key").alias(IDENTITY),
        "vm": lambda: pl.col("vm_id").alias("vm"),
        "hci_cluster": lambda: pl.col("cluster_id").alias("hci_cluster"),
        "last_success_seconds": lambda: _epoch_seconds("last_success_ms").alias("last_success_seconds"),
        "backup_age_seconds": lambda: _seconds_since(now_ms, pl.coalesce("last_success_ms", "first_seen_ms")).alias(
            "backup_age_seconds"
        ),
        "backup_rpo_target_seconds": lambda: pl.col("backup_rpo_s").alias("backup_rpo_target_seconds"),
        "consecutive_failures": lambda: pl.col("consecutive_failures"),
        "last_restore_test_seconds": lambda: _epoch_seconds("last_restore_test_ms").alias(
            "last_restore_test_seconds"
        ),
        "restore_test_age_seconds": lambda: _seconds_since(
            now_ms, pl.coalesce("last_restore_test_ms", "first_seen_ms")
        ).alias("restore_test_age_seconds"),
        "restore_test_max_age_seconds": lambda: pl.col("restore_test_max_age_s").alias("restore_test_max_age_seconds"),
        **{f"{t}_points": _column(f"{t}_points") for t in TIERS},
        "retention_compliant": lambda: retention_compliant().alias("retention_compliant"),
    }
    selected = _selected(columns, wanted)
    return _numbered(state.backup, rows, selected).select(selected)


def source_views(
    sources: pl.DataFrame, now_ms: int, params: ViewParams
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Per source, per stream of a source, and per partition of a stream (`sources` has a row per
    partition; sources without partitions have one row per stream, partition null)."""

    def rejected_ratio(accepted: pl.Expr, rejected: pl.Expr) -> pl.Expr:
        return (rejected / (accepted + rejected)).fill_nan(0.0).fill_null(0.0).alias("rejected_ratio")

    # Each view is one polars call (the frame has a few rows: the calls are the cost).
    since = _seconds_since(now_ms, "last_event_ms").alias("seconds_since_last_event")
    per_partition = sources.select(
        "source",
        "stream",
        "partition",
        # How an operator names the feed: "kafka replication partition 3", "mqtt heartbeat".
        pl.concat_str(
            "source",
            pl.lit(" "),
            "stream",
            pl.lit(" partition ") + pl.col("partition").cast(pl.String),  # null without one
            ignore_nulls=True,
        ).alias("feed"),
        "up",
        since,
        "accepted_recent",
        "rejected_recent",
        rejected_ratio(pl.col("accepted_recent"), pl.col("rejected_recent")),
    )
    per_stream = sources.group_by("source", "stream", maintain_order=True).agg(
        pl.col("up").all(),
        _seconds_since(now_ms, pl.col("last_event_ms").max()).alias("seconds_since_last_event"),
        pl.col("accepted_recent").sum(),
        pl.col("rejected_recent").sum(),
        rejected_ratio(pl.col("accepted_recent").sum(), pl.col("rejected_recent").sum()),
    )
    per_source = sources.group_by("source").agg(
        pl.col("up").all().alias("up"),
        _seconds_since(now_ms, pl.col("last_event_ms").max()).alias("seconds_since_last_event"),
        pl.lit(params.ingest_stall_s).alias("ingest_stall_seconds"),
    )
    return per_source, per_stream, per_partition


def node_view(state: FleetState, now_ms: int, params: ViewParams, stalled_sources: list[str]) -> pl.DataFrame:
    age = _seconds_since(now_ms, "last_heartbeat_ms")
    return state.nodes.select(
        pl.col("cluster_id").alias("hci_cluster"),
        pl.col("node_id").alias("node"),
        pl.col("state"),
        pl.col("source"),
        _epoch_seconds("last_heartbeat_ms").alias("last_heartbeat_seconds"),
        age.alias("heartbeat_age_seconds"),
        pl.lit(params.heartbeat_timeout_s).alias("heartbeat_timeout_seconds"),
        ((pl.col("state") == "up") & (age <= params.heartbeat_timeout_s)).cast(pl.Int8).alias("up"),
        # While the source carrying its heartbeats is stalled, silence says nothing about the node.
        pl.col("source").is_in(stalled_sources).fill_null(False).alias("source_stalled"),
        pl.col("memory_bytes"),
        pl.col("memory_used_bytes"),
        pl.col("net_capacity_bytes_per_s"),
        pl.col("net_replication_avg").alias("net_replication_bytes_per_s"),
        pl.col("iops_capacity"),
        pl.col("iops_used_avg").alias("iops_used"),
    )


def cluster_view(nodes: pl.DataFrame, state: FleetState, aggregates: Aggregates) -> pl.DataFrame:
    """Per instance: IOPS headroom, N+1 memory capacity, replication throughput, clock skew.
    The sums are over the nodes that are up (null when none is)."""
    up = pl.col("up") == 1

    def of_up(column: str) -> pl.Expr:
        return pl.when(up).then(pl.col(column))

    free = of_up("memory_bytes") - of_up("memory_used_bytes")
    largest = of_up("memory_used_bytes").arg_max()  # among the nodes up; null when none is
    figures = {
        "iops_headroom_ratio": 1.0 - of_up("iops_used").sum() / of_up("iops_capacity").sum(),
        # If the node running the most memory fails, the others' free memory must take it.
        "failover_capacity_ratio": (free.sum() - free.get(largest)).cast(pl.Float64)
        / of_up("memory_used_bytes").get(largest).cast(pl.Float64),
        "net_capacity_bytes_per_s": of_up("net_capacity_bytes_per_s").sum(),
        "replication_bytes_per_s": of_up("net_replication_bytes_per_s").sum(),
    }
    # One group-by over every node: the nodes up are picked inside it. In the nodes' order, so
    # that the instances come in the same order tick after tick (what the join memo checks).
    per_cluster = nodes.group_by("hci_cluster", maintain_order=True).agg(
        pl.len().alias("nodes"),
        up.sum().cast(pl.UInt32).alias("nodes_up"),
        *[value.alias(name) for name, value in figures.items()],
    )
    # Both joins by position from the memo: the instances seldom change, their figures always.
    memo, keys = aggregates.join_memo, per_cluster.select("hci_cluster")
    replicas = aggregates.replica_vms
    with_replicas = memo.rows("cluster.replicas", keys, replicas.select("hci_cluster"), "left")
    (replica_vms,) = _gathered(replicas, with_replicas.get_column("__right"), "replica_vms")
    skews = state.clusters
    pairs = memo.rows("cluster.skew", keys, skews.select(pl.col("cluster_id").alias("hci_cluster")), "full")
    (skew,) = _gathered(skews, pairs.get_column("__right"), pl.col("clock_skew_s").alias("clock_skew_seconds"))
    own = per_cluster.with_columns(replica_vms).select(
        pl.col("nodes"),
        *[pl.when(pl.col("nodes_up") > 0).then(pl.col(name)).alias(name) for name in figures],
        pl.col("nodes_up"),
        pl.col("replica_vms"),
    )
    figures_of = _gathered(own, pairs.get_column("__left"), pl.all())
    return pl.DataFrame([pairs.get_column("hci_cluster"), *figures_of, skew]).with_columns(
        pl.col("nodes", "nodes_up", "replica_vms").fill_null(0)
    )


def storage_path_view(state: FleetState, now_ms: int, aggregates: Aggregates) -> pl.DataFrame:
    """Per storage path: what its nodes last reported (capacity, free space, IOPS, online) and
    how many replicated VMs keep their disks there. Paths only VMs name (no node reports them)
    are listed too, with nulls for what a report would say."""
    paths = state.storage_paths
    named = aggregates.storage_vms
    pairs = aggregates.join_memo.rows(
        "storage_path",
        paths.select(pl.col("cluster_id").alias("hci_cluster"), pl.col("path_id").alias("storage_path")),
        named.select("hci_cluster", "storage_path"),
        "full",
    )
    reported = _gathered(
        paths,
        pairs.get_column("__left"),
        pl.col("node_id").alias("reported_by"),
        _seconds_since(now_ms, "last_report_ms").alias("report_age_seconds"),
        "capacity_bytes",
        "free_bytes",
        (pl.col("free_bytes") / pl.col("capacity_bytes")).alias("free_ratio"),
        "iops_capacity",
        "iops_used",
        (1.0 - pl.col("iops_used") / pl.col("iops_capacity")).alias("iops_headroom_ratio"),
        "online",
    )
    (vms,) = _gathered(named, pairs.get_column("__right"), "vms")
    return pl.DataFrame([*pairs.select("hci_cluster", "storage_path").get_columns(), *reported, vms.fill_null(0)])


@dataclass(frozen=True, eq=False)
class Pairing:
    """Which row of the backup table holds the same VM as each row of the replication table,
    and the other way round (null: the VM has none), as of the versions of the two tables it
    was made from.

    Rows keep their positions as the state changes (apply rewrites rows in place and appends
    new VMs; dropping an instance resets the aggregates that hold this), so it stays true for
    later versions of the tables for the rows it covers. Rows appended since, and partners that
    may have been appended since, are looked up (`partners`)."""

    backup_row: pl.Series  # UInt32 per replication row
    replication_row: pl.Series  # UInt32 per backup row
    # The tables' `vm_key` columns it was made from: what tells a later version of the same
    # tables (the same VMs at these positions) from other tables.
    replication_keys: pl.Series
    backup_keys: pl.Series

    @staticmethod
    def of(replication: pl.DataFrame, backup: pl.DataFrame) -> Pairing:
        pairs = _pairs(replication, backup)
        return Pairing(
            _scattered(replication.height, pairs.get_column("r"), pairs.get_column("b")),
            _scattered(backup.height, pairs.get_column("b"), pairs.get_column("r")),
            replication.get_column("vm_key"),
            backup.get_column("vm_key"),
        )

    def reusable(self, replication: pl.DataFrame, backup: pl.DataFrame) -> bool:
        """Whether it still holds for these versions of the tables (every row it covers holds
        the same VM) and they gained few enough rows since that looking those up at every
        tick costs less than pairing again."""
        for table, keys in ((replication, self.replication_keys), (backup, self.backup_keys)):
            if table.height < keys.len() or table.height - keys.len() > _PAIRING_STALE_SHARE * table.height:
                return False
            if not table.get_column("vm_key").head(keys.len()).equals(keys):
                return False
        return True

    def partners(self, rows: pl.Series, table: pl.DataFrame, other: pl.DataFrame, *, of_replication: bool) -> pl.Series:
        """For `rows` of `table` (the replication table if `of_replication`, else the backup
        table), the row of the same VM in `other` or null, aligned with `rows`."""
        paired, other_covered = (
            (self.backup_row, self.replication_row.len())
            if of_replication
            else (self.replication_row, self.backup_row.len())
        )
        highest = rows.max()
        if other.height == other_covered and (highest is None or cast(int, highest) < paired.len()):
            # The usual case: every row was paired, and the other table gained no row since.
            return paired.gather(rows)
        covered = rows < paired.len()
        if paired.len():
            found = paired.gather(rows.clip(upper_bound=paired.len() - 1)).zip_with(covered, _nulls(rows.len()))
        else:
            found = _nulls(rows.len())
        # Rows added since the pairing was made are looked up in the whole other table; rows
        # without a partner, among the rows the other table has gained since. Usually neither.
        lookups = [(~covered, other, 0)]
        if other.height > other_covered:
            lookups.append((found.is_null(), other.slice(other_covered), other_covered))
        for unsure, searched, offset in lookups:
            if unsure.any():
                hits = _pairs(table[rows.filter(unsure)], searched)
                at = pl.int_range(rows.len(), dtype=pl.UInt32, eager=True).filter(unsure).gather(hits.get_column("r"))
                found = found.scatter(at, hits.get_column("b") + offset) if at.len() else found
        return found


def _pairs(table: pl.DataFrame, other: pl.DataFrame) -> pl.DataFrame:
    """`r`, `b`: row positions of the same VM in `table` and in `other` (matched on the hash
    `vm_key`, then checked on `vm_id`: a hash collision pairs nothing)."""
    position = pl.int_range(pl.len(), dtype=pl.UInt32)
    pairs = table.lazy().select("vm_key", position.alias("r")).join(
        other.lazy().select("vm_key", position.alias("b")), on="vm_key"
    ).collect()
    ids = table.get_column("vm_id").gather(pairs.get_column("r"))
    same = ids == other.get_column("vm_id").gather(pairs.get_column("b"))
    return pairs.filter(same).select("r", "b")


def _nulls(length: int) -> pl.Series:
    return pl.repeat(None, length, dtype=pl.UInt32, eager=True)


def _scattered(length: int, at: pl.Series, values: pl.Series) -> pl.Series:
    return _nulls(length).scatter(at, values) if at.len() else _nulls(length)


@dataclass(frozen=True, eq=False)
class Aggregates:
    """Per-link, per-service-group and per-storage-path sums over the replication table, and
    the pairing of the two VM tables' rows.

    They depend on the state alone (not on the clock), cost a group-by over every VM, and feed
    conditions that move over minutes (link saturation, storage-path concentration), so the
    engine computes them once per state and, while ingest keeps changing the state, at most
    every `aggregate_refresh_s` (EngineSettings) instead of at every tick."""

    table: pl.DataFrame  # the replication table they were computed from
    computed_ms: int
    links: pl.DataFrame  # link_key, hci_cluster, target, needed_bytes_per_s, pending_bytes, vms
    service_groups: pl.DataFrame  # service_group, hci_cluster, vms, single_storage_path, storage_path
    storage_vms: pl.DataFrame  # hci_cluster, storage_path, vms (replicated VMs whose disks are there)
    # Per VM row of `table`: its link's row in `links`. Rows keep their positions as the state
    # changes (apply appends new VMs and rewrites rows in place), so a later table reuses it
    # wherever its link key is still the one seen here (see `link_rows`).
    link_row: pl.Series
    pairing: Pairing
    # Per target instance: the replicated VMs whose replicas it holds (hci_cluster, replica_vms).
    replica_vms: pl.DataFrame
    gather_memo: GatherMemo = field(default_factory=GatherMemo, compare=False)
    join_memo: JoinMemo = field(default_factory=JoinMemo, compare=False)

    def summarises(self, table: pl.DataFrame) -> bool:
        return self.table is table

    def link_rows(self, table: pl.DataFrame) -> pl.Series:
        """For each row of `table` (this or a later state), the row of its link in `links`
        (null for a link born since). Positions still holding the link key they held when
        these sums were made take the stored row; the few others are looked up."""
        known = min(table.height, self.table.height)
        keys = table.get_column("link_key")
        if known == table.height and self.summarises(table):
            return self.link_row
        same = keys.head(known) == self.table.get_column("link_key").head(known)
        if known == table.height and same.all():
            return self.link_row.head(known)
        looked_up = (
            keys.to_frame()
            .join(self.links.select("link_key").with_row_index("link_row"), on="link_key", how="left", maintain_order="left")
            .get_column("link_row")
        )
        stored = self.link_row.head(known).zip_with(same.fill_null(False), looked_up.head(known))
        return stored.append(looked_up.tail(table.height - known))


# Columns the per-service-group and per-storage-path sums depend on (besides the row count).
_PLACEMENT = ("cluster_id", "service_group", "storage_path_id")
# A pairing is recomputed once this share of either table's rows was added since it was made:
# `Pairing.partners` looks those rows up at every tick.
_PAIRING_STALE_SHARE = 0.01


def summarise(state: FleetState, now_ms: int, previous: Aggregates | None = None) -> Aggregates:
    """The aggregates of `state`. Given the `previous` ones, computed from an earlier version
    of the same tables (rows only rewritten in place or appended since: the engine drops them
    when rows are removed), what did not change is reused: at a million VMs a refresh is a
    group-by over the links (~10 ms) instead of ~185 ms, because between refreshes ingest
    rewrites lags, pending bytes and churn, rarely where a VM lives."""
    replication = state.replication
    links_frame = (
        replication.lazy()
        .group_by("link_key")
        .agg(
            pl.col("cluster_id").first().alias("hci_cluster"),
            pl.col("target_id").first().alias("target"),
            pl.col("churn_bytes_per_s").sum().alias("needed_bytes_per_s"),
            pl.col("pending_bytes").sum().alias("pending_bytes"),
            pl.len().alias("vms"),
        )
        .collect()
    )
    link_row: pl.Series | None = None
    if previous is not None and _same_column(replication, previous.table, "link_key"):
        # Same link per row: the links in the previous order keep `link_row` valid.
        reordered = previous.links.select("link_key").join(links_frame, on="link_key", how="left", maintain_order="left")
        if reordered.height == links_frame.height:
            links_frame, link_row = reordered, previous.link_row
    if link_row is None:
        link_row = (
            replication.select("link_key")
            .join(links_frame.select("link_key").with_row_index("link_row"), on="link_key", how="left", maintain_order="left")
            .get_column("link_row")
        )
    if previous is not None and all(_same_column(replication, previous.table, c) for c in _PLACEMENT):
        groups_frame, storage_frame = previous.service_groups, previous.storage_vms
    else:
        groups_frame, storage_frame = _placement(replication)
    pairing = previous.pairing if previous is not None else None
    if pairing is None or not pairing.reusable(replication, state.backup):
        pairing = Pairing.of(replication, state.backup)
    replica_vms = links_frame.group_by(pl.col("target").alias("hci_cluster"), maintain_order=True).agg(
        pl.col("vms").sum().alias("replica_vms")
    )
    # The memo of the small joins holds for any tables whose keys it checks: it outlives a refresh.
    joins = previous.join_memo if previous is not None else JoinMemo()
    return Aggregates(
        replication, now_ms, links_frame, groups_frame, storage_frame, link_row, pairing, replica_vms, join_memo=joins
    )


def _same_column(table: pl.DataFrame, earlier: pl.DataFrame, name: str) -> bool:
    """Whether `table` holds the same values as `earlier` in column `name`, row for row (a
    comparison, ~4 ms for a million strings, against ~100 ms of group-by it can save)."""
    return table.height == earlier.height and table.get_column(name).equals(earlier.get_column(name))


def _placement(replication: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per service group (VMs, and whether all are on one storage path) and per storage path
    (VMs whose disks are there)."""
    # Grouped on hashes (integers) rather than strings, and "one path for all" as min == max
    # of the path's hash, because a fleet has as many service groups as a fifth of its VMs.
    path_key = pl.col("storage_path_id").hash()
    groups = (
        replication.lazy()
        .filter(pl.col("service_group").is_not_null())
        .group_by(pl.col("service_group").hash().alias("sg_key"))
        .agg(
            pl.col("service_group").first(),
            pl.col("cluster_id").first().alias("hci_cluster"),
            pl.len().alias("vms"),
            ((path_key.min() == path_key.max()) & pl.col("storage_path_id").null_count().eq(0)).alias(
                "single_storage_path"
            ),
            pl.col("storage_path_id").first().alias("storage_path"),
        )
        .drop("sg_key")
    )
    storage = (
        replication.lazy()
        .filter(pl.col("storage_path_id").is_not_null())
        .group_by(pl.col("cluster_id").alias("hci_cluster"), pl.col("storage_path_id").alias("storage_path"))
        .agg(pl.len().alias("vms"))
    )
    groups_frame, storage_frame = pl.collect_all([groups, storage])
    return groups_frame, storage_frame


def _links(aggregates: Aggregates, clusters: pl.DataFrame, params: ViewParams) -> pl.DataFrame:
    """Per replication link: the throughput its VMs need to keep up, against its capacity."""
    links = aggregates.links.lazy()
    if params.link_capacity_bytes_per_s:
        declared = pl.DataFrame(
            list(params.link_capacity_bytes_per_s),
            schema={"hci_cluster": pl.String, "target": pl.String, "declared_capacity": pl.Float64},
            orient="row",
        )
        links = links.join(declared.lazy(), on=["hci_cluster", "target"], how="left", maintain_order="left")
    else:  # the usual case: no join of every link with an empty table at every tick
        links = links.with_columns(pl.lit(None, dtype=pl.Float64).alias("declared_capacity"))
    capacity = pl.coalesce("declared_capacity", "net_capacity_bytes_per_s")
    # Each link's source instance, by position (row for row with `aggregates.links`: `link_row`
    # indexes both).
    pairs = aggregates.join_memo.rows(
        "link.cluster", aggregates.links.select("hci_cluster"), clusters.select("hci_cluster"), "left"
    )
    instance = _gathered(clusters, pairs.get_column("__right"), "net_capacity_bytes_per_s", "replication_bytes_per_s")
    return (
        links.with_columns(instance)
        .select(
            "link_key",
            "hci_cluster",
            "target",
            "needed_bytes_per_s",
            capacity.alias("capacity_bytes_per_s"),
            (pl.col("needed_bytes_per_s") / capacity).alias("saturation_ratio"),
            pl.col("replication_bytes_per_s").alias("instance_replication_bytes_per_s"),
            "pending_bytes",
            "vms",
        )
        .collect()
    )


LateRows = tuple[pl.Series, pl.Series]  # rows of the replication and of the backup table


def late_rows(state: FleetState, now_ms: int, among: LateRows | None = None) -> LateRows:
    """The rows of the replication and backup tables out of policy at `now_ms` (a recovery
    point older than the RPO; without one, first seen longer ago than that), in ascending
    order; only those among the rows numbered `among` (per table), if given."""
    replica_late = pl.coalesce("last_recovery_point_ms", "first_seen_ms") < now_ms - pl.col("rpo_target_s") * 1000
    backup_late = pl.coalesce("last_success_ms", "first_seen_ms") < now_ms - pl.col("backup_rpo_s") * 1000
    queries = []
    for k, (table, late) in enumerate(((state.replication, replica_late), (state.backup, backup_late))):
        if among is None:
            queries.append(table.lazy().select(pl.arg_where(late.fill_null(False)).cast(pl.UInt32).alias("row")))
        else:
            rows = among[k].cast(pl.UInt32).sort()
            taken = table.select(late.meta.root_names())[rows].with_columns(rows.alias("row"))
            queries.append(taken.lazy().filter(late.fill_null(False)).select("row"))
    replicas, backups = (frame.get_column("row") for frame in pl.collect_all(queries))
    return replicas, backups


def late_rows_since(
    earlier: LateRows,
    state: FleetState,
    now_ms: int,
    written: LateRows,
    masks: tuple[pl.Series | None, pl.Series | None],
) -> LateRows:
    """`late_rows(state, now_ms)` from `earlier`, the late rows at `now_ms` of an earlier
    version of `state` that differs from it only in the rows `written` (per table; `masks`:
    `written_mask` of them) since: those are evaluated again, the others are taken as they were."""
    fresh = late_rows(state, now_ms, written)
    out = []
    for before, found, mask in zip(earlier, fresh, masks):
        out.append(before if mask is None else pl.concat([before.filter(~mask.gather(before)), found]).sort())
    return out[0], out[1]


def written_mask(height: int, rows: pl.Series) -> pl.Series | None:
    """A flag per row of a table of `height` rows: whether it is one of `rows` (None: none is)."""
    if rows.is_empty():
        return None
    return pl.repeat(False, height, eager=True).scatter(rows, True)


def _vm(state: FleetState, now_ms: int, aggregates: Aggregates, late: LateRows | None = None) -> pl.DataFrame:
    """VMs with at least one kind of protection out of policy (the others are protected and
    cannot raise a VM-level alert), with both kinds side by side. Found from the few rows out
    of policy (`late`: `late_rows`, computed if not given), each paired with the other
    table's row of the same VM through the pairing kept with the aggregates, never by joining
    or scanning whole tables."""
    replication, backup = state.replication, state.backup
    late_replicas, late_backups = late if late is not None else late_rows(state, now_ms)
    # Rows whose policy is unknown (a null RPO) are neither late nor within it. Usually none:
    # a null count is known without a pass.
    unknown_replicas, unknown_backups = (
        table.select(pl.arg_where(pl.col(rpo).is_null()).cast(pl.UInt32)).to_series()
        if table.get_column(rpo).null_count()
        else pl.Series(dtype=pl.UInt32)
        for table, rpo in ((replication, "rpo_target_s"), (backup, "backup_rpo_s"))
    )
    pairing = aggregates.pairing
    # The VMs with a late replica (their backup row, if any), then those with a late backup
    # and no late replica (their replication row, if any): each VM once, found on positions.
    backup_of_late = pairing.partners(late_replicas, replication, backup, of_replication=True)
    replica_of_late = pairing.partners(late_backups, backup, replication, of_replication=False)
    only_backup_late = ~_among(replica_of_late, late_replicas)
    r = pl.concat([late_replicas, replica_of_late.filter(only_backup_late)])
    b = pl.concat([backup_of_late, late_backups.filter(only_backup_late)])
    first = late_replicas.len()
    replica_is_late = pl.int_range(r.len(), dtype=pl.UInt32, eager=True) < first  # the first ones
    # A partner found for a late backup is not late itself (else the VM is among the first).
    replica_within = ~replica_is_late & r.is_not_null() & ~_among(r, unknown_replicas)
    backup_within = replica_is_late & b.is_not_null() & ~_among(b, pl.concat([late_backups, unknown_backups]))
    # Only the labels are gathered, at the few rows (a null row gives nulls).
    replica = replication.select(pl.col("vm_id", "cluster_id").gather(r))
    backups = backup.select(pl.col("vm_id", "cluster_id").gather(b))
    return pl.DataFrame(
        {
            "vm": replica.get_column("vm_id").fill_null(backups.get_column("vm_id")),
            "hci_cluster": replica.get_column("cluster_id").fill_null(backups.get_column("cluster_id")),
            "replica_within_rpo": replica_within,
            "backup_within_rpo": backup_within,
            "replicated": r.is_not_null(),
            "backed_up": b.is_not_null(),
        }
    )


def _among(rows: pl.Series, others: pl.Series) -> pl.Series:
    """Whether each of `rows` (null: no) is one of `others`; without a membership test when
    `others` is empty (the rows of unknown policy usually are: ~0.4 ms saved per test)."""
    if others.is_empty():
        return pl.repeat(False, rows.len(), eager=True)
    return rows.is_in(others.implode()).fill_null(False)


def identity(entity: str) -> pl.Expr:
    """The hash of an entity's identity labels, over its view (`lazy`). The per-VM views carry
    it (`IDENTITY`, kept in the state per row): a tick finding 200,000 VMs out of policy hashes
    no strings. The other views are small and hash their label columns."""
    if entity in PER_VM:
        return pl.col(IDENTITY)
    return identity_hash([pl.col(c) for c in ENTITIES[entity].labels])


# Columns of the replication base that `_with_prediction` reads.
_PREDICTION_READS = frozenset(
    {"lag_seconds", "rpo_target_seconds", "frequency_s", "churn_bytes_per_s", "pending_bytes", "status",
     "resync_needed", "missed_cycles_ratio", "link_key"}
)
# Columns of `vm_replication` that need the VM's link (a join); queries that use none skip it.
NEEDS_LINK = frozenset({"time_to_breach_seconds", "next_transfer_seconds", "link_saturation_ratio", "health_state"})
PER_VM = ("vm_replication", "vm_backup")
_SOURCE_VIEWS = ("source", "source_stream", "source_partition")


class Views:
    """Everything rules and exporters see at `now_ms`, built lazily.

    The per-VM views (a million rows) are polars queries over the state: a rule's condition
    reads only its columns, and the full frame is built only when something asks for it (a
    scrape, the history writer), once per tick, memoised. Per-entity views of the small tables
    (nodes, instances, links, service groups, sources) are built on first use too. Immutable
    as seen from outside: the state and the aggregates it reads never change."""

    def __init__(
        self,
        now_ms: int,
        state: FleetState,
        params: ViewParams,
        aggregates: Aggregates,
        sources: pl.DataFrame,
        frames: dict[str, pl.DataFrame] | None = None,
        late: Callable[[], LateRows] | None = None,
    ) -> None:
        self.now_ms = now_ms
        self._late = late  # the rows out of policy (`late_rows`), if known another way
        self._state = state
        self._params = params
        self._aggregates = aggregates
        self._sources = sources
        # Materialised views. A view built twice by two threads at once is built the same way
        # twice: the later assignment wins and both callers see equal frames.
        self._frames: dict[str, pl.DataFrame] = dict(frames or {})
        self._given = frozenset(self._frames)
        self._link_row_cache: pl.Series | None = None
        self._lock = threading.Lock()

    # -- lazily built entity views -------------------------------------------------------------

    def lazy(
        self, entity: str, columns: Collection[str] | None = None, rows: pl.Series | None = None
    ) -> pl.LazyFrame:
        """The view of `entity` as a query with a `ROW` column. `columns` (the ones a query
        reads, None for all) lets it skip work it does not need; `rows` restricts it to those
        row numbers, filtered before anything is computed."""
        # A per-VM view is a query over the state even once `of` has materialised it (a scrape,
        # the history writer): the query reads only the columns and rows asked for, where the
        # frame would be gathered whole and its labels hashed. Frames given to `replace` win.
        given = self._frames.get(entity) if entity in self._given else None
        if given is not None or entity not in PER_VM:
            frame = given if given is not None else self.of(entity)
            numbered = _numbered(frame, rows)
            if entity in PER_VM and IDENTITY not in frame.columns:
                # A given view has no stored hash: its labels are hashed, for the rows asked.
                return numbered.with_columns(identity_hash([pl.col(c) for c in ENTITIES[entity].labels]).alias(IDENTITY))
            return numbered
        if entity == "vm_backup":
            return _backup(self._state, self.now_ms, rows, columns)
        if columns is not None and not NEEDS_LINK & set(columns):
            return _replication_base(self._state, self.now_ms, self._params, rows, columns)
        wanted = None if columns is None else {*columns, *_PREDICTION_READS}
        base = _replication_base(self._state, self.now_ms, self._params, rows, wanted)
        link_rows = self._link_rows()
        if rows is not None:
            link_rows = link_rows.gather(rows)
        memo = self._aggregates.gather_memo if rows is None else None  # a few rows: gathered as asked
        return _with_prediction(base, _link_columns(self.of("link"), link_rows, columns, memo), self._params)

    @property
    def aggregates(self) -> Aggregates:
        return self._aggregates

    def link_figures(self) -> pl.DataFrame:
        """The link columns `vm_replication` takes from each VM's link (`_link_columns`)."""
        return self.of("link").select(_LINK_FIGURES)

    def _link_rows(self) -> pl.Series:
        rows = self._link_row_cache
        if rows is None:
            rows = self._link_row_cache = self._aggregates.link_rows(self._state.replication)
        return rows

    def of(self, entity: str) -> pl.DataFrame:
        if entity not in ENTITIES:
            raise KeyError(entity)
        frame = self._frames.get(entity)
        if frame is None:
            frame = self._build(entity)
            with self._lock:
                self._frames[entity] = frame
        return frame

    def _build(self, entity: str) -> pl.DataFrame:
        params, now_ms = self._params, self.now_ms
        if entity in PER_VM:
            return self.lazy(entity).drop(ROW, IDENTITY).collect(engine="streaming")
        if entity in _SOURCE_VIEWS:
            # The three come from one frame: built together, kept together.
            built = dict(zip(_SOURCE_VIEWS, source_views(self._sources, now_ms, params)))
            with self._lock:
                for name, frame in built.items():
                    self._frames.setdefault(name, frame)
            return built[entity]
        if entity == "node":
            stalled = self.of("source").filter(pl.col("seconds_since_last_event") > params.ingest_stall_s)
            return node_view(self._state, now_ms, params, stalled.get_column("source").to_list())
        if entity == "cluster":
            return cluster_view(self.of("node"), self._state, self._aggregates)
        if entity == "link":
            return _links(self._aggregates, self.of("cluster"), params)
        if entity == "service_group":
            return self._aggregates.service_groups
        if entity == "storage_path":
            return storage_path_view(self._state, now_ms, self._aggregates)
        if entity == "vm":
            return _vm(self._state, now_ms, self._aggregates, self._late() if self._late is not None else None)
        raise KeyError(entity)

    def replace(self, now_ms: int | None = None, **frames: pl.DataFrame) -> Views:
        """These views, materialised, with some entity frames replaced and the clock moved (if
        given): like `dataclasses.replace` on a record of frames, for tests and tools."""
        unknown = set(frames) - set(ENTITIES)
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        every = {entity: frames[entity] if entity in frames else self.of(entity) for entity in ENTITIES}
        return Views(
            self.now_ms if now_ms is None else now_ms,
            self._state,
            self._params,
            self._aggregates,
            self._sources,
            every,
        )

    @property
    def vm_replication(self) -> pl.DataFrame:
        return self.of("vm_replication")

    @property
    def vm_backup(self) -> pl.DataFrame:
        return self.of("vm_backup")

    @property
    def vm(self) -> pl.DataFrame:
        return self.of("vm")

    @property
    def node(self) -> pl.DataFrame:
        return self.of("node")

    @property
    def link(self) -> pl.DataFrame:
        return self.of("link")

    @property
    def cluster(self) -> pl.DataFrame:
        return self.of("cluster")

    @property
    def service_group(self) -> pl.DataFrame:
        return self.of("service_group")

    @property
    def storage_path(self) -> pl.DataFrame:
        return self.of("storage_path")

    @property
    def source(self) -> pl.DataFrame:
        return self.of("source")

    @property
    def source_stream(self) -> pl.DataFrame:
        return self.of("source_stream")

    @property
    def source_partition(self) -> pl.DataFrame:
        return self.of("source_partition")


def build_views(
    state: FleetState,
    now_ms: int,
    params: ViewParams,
    sources: pl.DataFrame | None = None,
    aggregates: Aggregates | None = None,
    late: Callable[[], LateRows] | None = None,
) -> Views:
    """The views of `state` at `now_ms`. `aggregates` of an earlier state may be passed to
    reuse them (see `Aggregates`); by default they are computed from this state. `late` gives
    `late_rows(state, now_ms)` when the caller can find them cheaper."""
    return Views(
        now_ms,
        state,
        params,
        aggregates if aggregates is not None else summarise(state, now_ms),
        sources if sources is not None else pl.DataFrame(schema=SOURCES_SCHEMA),
        late=late,
    )


def empty_views() -> Views:
    return build_views(FleetState(), 0, ViewParams())
