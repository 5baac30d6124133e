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

from dataclasses import dataclass

import polars as pl

from rules.state import TIERS, FleetState

INF = float("inf")
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
        Entity("source", ("source",), "one ingest source (Kafka, MQTT)"),
        Entity("source_stream", ("source", "stream"), "one stream of one source"),
    )
}

# What the service tells the engine about its sources at each tick.
SOURCES_SCHEMA = pl.Schema(
    {
        "source": pl.String(),
        "stream": pl.String(),
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


def _replication_base(state: FleetState, now_ms: int, params: ViewParams) -> pl.LazyFrame:
    window_ms = int(params.monitoring_window_s * 1000)
    frequency = pl.col("frequency_s").cast(pl.Float64)
    observed_s = pl.min_horizontal(pl.lit(params.monitoring_window_s), _seconds_since(now_ms, "first_seen_ms"))
    expected = observed_s / frequency
    completed = _window_count(now_ms, window_ms, "completed_cur", "completed_prev")
    missed = _window_count(now_ms, window_ms, "missed_cur", "missed_prev")
    # A cycle counts as missed when no log was sent within the interval (Hyper-V Replica).
    missed_ratio = pl.max_horizontal(1.0 - completed / expected, missed / expected).clip(0.0, 1.0)
    return (
        state.replication.lazy()
        .with_columns(pl.coalesce("last_recovery_point_ms", "first_seen_ms").alias("lag_from_ms"))
        .select(
            pl.col("vm_id").alias("vm"),
            pl.col("cluster_id").alias("hci_cluster"),
            pl.col("target_id").alias("target"),
            pl.col("link_key"),
            pl.col("technology"),
            pl.col("service_group"),
            pl.col("storage_path_id").alias("storage_path"),
            pl.col("status"),
            pl.col("frequency_s"),
            _epoch_seconds("last_recovery_point_ms").alias("last_recovery_point_seconds"),
            # A VM that never completed a cycle is unrecoverable since we first heard of it.
            _seconds_since(now_ms, "lag_from_ms").alias("lag_seconds"),
            pl.col("rpo_target_s").alias("rpo_target_seconds"),
            pl.col("pending_bytes"),
            pl.col("vhd_bytes"),
            pl.col("churn_bytes_per_s"),
            _seconds_since(now_ms, "status_since_ms").alias("status_age_seconds"),
            _epoch_seconds("last_failover_test_ms").alias("last_failover_test_seconds"),
            _seconds_since(now_ms, pl.coalesce("last_failover_test_ms", "first_seen_ms")).alias(
                "failover_test_age_seconds"
            ),
            pl.col("failover_test_max_age_s").alias("failover_test_max_age_seconds"),
            pl.when(expected >= 1).then(missed_ratio).otherwise(0.0).alias("missed_cycles_ratio"),
            expected.alias("expected_cycles"),
            (
                (pl.col("status") == "resync_required")
                | (
                    pl.col("pending_bytes").cast(pl.Float64)
                    > params.resync_pending_ratio * pl.col("vhd_bytes").cast(pl.Float64)
                ).fill_null(False)
            ).alias("resync_needed"),
        )
    )


def _links(base: pl.LazyFrame, clusters: pl.DataFrame, params: ViewParams) -> pl.DataFrame:
    """Per replication link: the throughput its VMs need to keep up, against its capacity."""
    declared = pl.LazyFrame(
        list(params.link_capacity_bytes_per_s),
        schema={"hci_cluster": pl.String, "target": pl.String, "declared_capacity": pl.Float64},
        orient="row",
    )
    capacity = pl.coalesce("declared_capacity", "net_capacity_bytes_per_s")
    return (
        base.group_by("link_key")
        .agg(
            pl.col("hci_cluster").first(),
            pl.col("target").first(),
            pl.col("churn_bytes_per_s").sum().alias("needed_bytes_per_s"),
            pl.col("pending_bytes").sum().alias("pending_bytes"),
            pl.len().alias("vms"),
        )
        .join(declared, on=["hci_cluster", "target"], how="left")
        .join(
            clusters.lazy().select("hci_cluster", "net_capacity_bytes_per_s", "replication_bytes_per_s"),
            on="hci_cluster",
            how="left",
        )
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


def replication_view(base: pl.LazyFrame, links: pl.DataFrame, params: ViewParams) -> pl.DataFrame:
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
        base.join(
            links.lazy().select("link_key", "needed_bytes_per_s", "capacity_bytes_per_s", "saturation_ratio"),
            on="link_key",
            how="left",
        )
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
        .rename({"saturation_ratio": "link_saturation_ratio"})
        .collect()
    )


def backup_view(state: FleetState, now_ms: int, params: ViewParams) -> pl.DataFrame:
    age_days = (_seconds_since(now_ms, "first_seen_ms") / DAY_S).floor()
    # A tier can only hold as many points as the VM has been protected for.
    reachable = {"daily": age_days, "weekly": (age_days / 7).floor(), "monthly": (age_days / 30).floor(),
                 "yearly": (age_days / 365).floor()}
    shortfall = [
        (pl.col(f"{t}_points") < pl.min_horizontal(pl.col(f"retention_{t}"), reachable[t])).fill_null(False)
        for t in TIERS
    ]
    return state.backup.select(
        pl.col("vm_id").alias("vm"),
        pl.col("cluster_id").alias("hci_cluster"),
        _epoch_seconds("last_success_ms").alias("last_success_seconds"),
        _seconds_since(now_ms, pl.coalesce("last_success_ms", "first_seen_ms")).alias("backup_age_seconds"),
        pl.col("backup_rpo_s").alias("backup_rpo_target_seconds"),
        pl.col("consecutive_failures"),
        _epoch_seconds("last_restore_test_ms").alias("last_restore_test_seconds"),
        _seconds_since(now_ms, pl.coalesce("last_restore_test_ms", "first_seen_ms")).alias(
            "restore_test_age_seconds"
        ),
        pl.col("restore_test_max_age_s").alias("restore_test_max_age_seconds"),
        *[pl.col(f"{t}_points") for t in TIERS],
        (~pl.col("tiers_reported") | ~pl.any_horizontal(shortfall)).alias("retention_compliant"),
    )


def vm_view(replication: pl.DataFrame, backup: pl.DataFrame) -> pl.DataFrame:
    """VMs with at least one kind of protection out of policy (the others are protected and
    cannot raise a VM-level alert), with both kinds side by side."""
    replica_ok = pl.col("lag_seconds") <= pl.col("rpo_target_seconds")
    backup_ok = pl.col("backup_age_seconds") <= pl.col("backup_rpo_target_seconds")
    candidates = pl.concat(
        [replication.filter(~replica_ok).select("vm"), backup.filter(~backup_ok).select("vm")]
    ).unique()
    replica = replication.join(candidates, on="vm", how="semi").select(
        "vm", "hci_cluster", replica_ok.alias("replica_within_rpo")
    )
    backups = backup.join(candidates, on="vm", how="semi").select(
        "vm", pl.col("hci_cluster").alias("backup_hci_cluster"), backup_ok.alias("backup_within_rpo")
    )
    return replica.join(backups, on="vm", how="full", coalesce=True).select(
        "vm",
        pl.coalesce("hci_cluster", "backup_hci_cluster").alias("hci_cluster"),
        pl.col("replica_within_rpo").fill_null(False),
        pl.col("backup_within_rpo").fill_null(False),
        pl.col("replica_within_rpo").is_not_null().alias("replicated"),
        pl.col("backup_within_rpo").is_not_null().alias("backed_up"),
    )


def source_views(sources: pl.DataFrame, now_ms: int, params: ViewParams) -> tuple[pl.DataFrame, pl.DataFrame]:
    per_stream = sources.select(
        "source",
        "stream",
        "up",
        _seconds_since(now_ms, "last_event_ms").alias("seconds_since_last_event"),
        "accepted_recent",
        "rejected_recent",
        (pl.col("rejected_recent") / (pl.col("accepted_recent") + pl.col("rejected_recent")))
        .fill_nan(0.0)
        .fill_null(0.0)
        .alias("rejected_ratio"),
    )
    per_source = sources.group_by("source").agg(
        pl.col("up").all().alias("up"),
        _seconds_since(now_ms, pl.col("last_event_ms").max()).alias("seconds_since_last_event"),
        pl.lit(params.ingest_stall_s).alias("ingest_stall_seconds"),
    )
    return per_source, per_stream


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


def cluster_view(nodes: pl.DataFrame, state: FleetState) -> pl.DataFrame:
    """Per instance: IOPS headroom, N+1 memory capacity, replication throughput, clock skew."""
    up = nodes.filter(pl.col("up") == 1)
    free = (pl.col("memory_bytes") - pl.col("memory_used_bytes")).cast(pl.Float64)
    largest = pl.col("memory_used_bytes").arg_max()
    per_cluster = up.group_by("hci_cluster").agg(
        (1.0 - pl.col("iops_used").sum() / pl.col("iops_capacity").sum()).alias("iops_headroom_ratio"),
        # If the node running the most memory fails, the others' free memory must take it.
        ((free.sum() - free.get(largest)) / pl.col("memory_used_bytes").get(largest).cast(pl.Float64)).alias(
            "failover_capacity_ratio"
        ),
        pl.col("net_capacity_bytes_per_s").sum().alias("net_capacity_bytes_per_s"),
        pl.col("net_replication_bytes_per_s").sum().alias("replication_bytes_per_s"),
        pl.len().alias("nodes_up"),
    )
    known = nodes.group_by("hci_cluster").agg(pl.len().alias("nodes"))
    replica_load = state.replication.group_by("target_id").agg(pl.len().alias("replica_vms"))
    skew = state.clusters.select(pl.col("cluster_id").alias("hci_cluster"), pl.col("clock_skew_s").alias("clock_skew_seconds"))
    return (
        known.join(per_cluster, on="hci_cluster", how="left")
        .join(replica_load.rename({"target_id": "hci_cluster"}), on="hci_cluster", how="left")
        .join(skew, on="hci_cluster", how="full", coalesce=True)
        .with_columns(pl.col("replica_vms").fill_null(0), pl.col("nodes_up").fill_null(0), pl.col("nodes").fill_null(0))
    )


def service_group_view(replication: pl.DataFrame) -> pl.DataFrame:
    # Grouped on hashes (integers) rather than strings, and "one path for all" as min == max
    # of the path's hash, because a fleet has as many service groups as a fifth of its VMs.
    path_key = pl.col("storage_path").hash()
    return (
        replication.lazy()
        .filter(pl.col("service_group").is_not_null())
        .with_columns(pl.col("service_group").hash().alias("sg_key"), path_key.alias("path_key"))
        .group_by("sg_key")
        .agg(
            pl.col("service_group").first(),
            pl.col("hci_cluster").first(),
            pl.len().alias("vms"),
            ((pl.col("path_key").min() == pl.col("path_key").max()) & pl.col("storage_path").null_count().eq(0)).alias(
                "single_storage_path"
            ),
            pl.col("storage_path").first(),
        )
        .drop("sg_key")
        .collect()
    )


@dataclass(frozen=True)
class Views:
    """Everything rules and exporters see at `now_ms`."""

    now_ms: int
    vm_replication: pl.DataFrame
    vm_backup: pl.DataFrame
    vm: pl.DataFrame
    node: pl.DataFrame
    link: pl.DataFrame
    cluster: pl.DataFrame
    service_group: pl.DataFrame
    source: pl.DataFrame
    source_stream: pl.DataFrame

    def of(self, entity: str) -> pl.DataFrame:
        frame: pl.DataFrame = getattr(self, entity)
        return frame


def build_views(
    state: FleetState, now_ms: int, params: ViewParams, sources: pl.DataFrame | None = None
) -> Views:
    per_source, per_stream = source_views(
        sources if sources is not None else pl.DataFrame(schema=SOURCES_SCHEMA), now_ms, params
    )
    stalled = per_source.filter(pl.col("seconds_since_last_event") > params.ingest_stall_s).get_column("source")
    nodes = node_view(state, now_ms, params, stalled.to_list())
    clusters = cluster_view(nodes, state)
    base = _replication_base(state, now_ms, params)
    links = _links(base, clusters, params)
    replication = replication_view(base, links, params)
    backup = backup_view(state, now_ms, params)
    return Views(
        now_ms=now_ms,
        vm_replication=replication,
        vm_backup=backup,
        vm=vm_view(replication, backup),
        node=nodes,
        link=links,
        cluster=clusters,
        service_group=service_group_view(replication),
        source=per_source,
        source_stream=per_stream,
    )


def empty_views() -> Views:
    return build_views(FleetState(), 0, ViewParams())
