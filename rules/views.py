"""Entity views: the state tables seen at one instant, with the derived columns rules test.

A view is what a rule's condition is written against (`lag_seconds > rpo_target_seconds`) and
what the metrics exporter reads. Column names are the rule-pack vocabulary, so renaming one is a
breaking change for users' packs; label columns use the Prometheus label names of
contracts.md §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rules.state import FleetState

INF = float("inf")


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
        Entity("node", ("hci_cluster", "node"), "one physical node"),
        Entity("link", ("hci_cluster", "target"), "replication link: source instance to target"),
        Entity("cluster", ("hci_cluster",), "one Azure Local instance"),
    )
}


@dataclass(frozen=True)
class ViewParams:
    heartbeat_timeout_s: float = 30.0
    at_risk_ratio: float = 0.8
    # Declared link capacities (bytes/s) by (hci_cluster, target), when heartbeats carry none.
    link_capacity_bytes_per_s: tuple[tuple[str, str, float], ...] = ()


def _seconds_since(now_ms: int, column: str) -> pl.Expr:
    return (pl.lit(now_ms) - pl.col(column)).cast(pl.Float64) / 1000.0


def _epoch_seconds(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Float64) / 1000.0


def replication_view(state: FleetState, now_ms: int, params: ViewParams) -> pl.DataFrame:
    # A VM that never completed a cycle has been unrecoverable since we first heard of it.
    lag = _seconds_since(now_ms, "lag_from_ms")
    rpo = pl.col("rpo_target_s")
    frequency = pl.col("frequency_s").cast(pl.Float64)
    critical = (pl.col("lag_seconds") > pl.col("rpo_target_seconds")) | pl.col("status").is_in(
        ["failed", "resync_required"]
    )
    warning = (pl.col("lag_seconds") > params.at_risk_ratio * pl.col("rpo_target_seconds")) | pl.col(
        "status"
    ).is_in(["paused", "initial_replication"])
    return (
        state.replication.lazy()
        .with_columns(pl.coalesce("last_recovery_point_ms", "first_seen_ms").alias("lag_from_ms"))
        .select(
            pl.col("vm_id").alias("vm"),
            pl.col("cluster_id").alias("hci_cluster"),
            pl.col("target_id").alias("target"),
            pl.col("technology"),
            pl.col("service_group"),
            pl.col("storage_path_id").alias("storage_path"),
            pl.col("status"),
            pl.col("frequency_s"),
            _epoch_seconds("last_recovery_point_ms").alias("last_recovery_point_seconds"),
            lag.alias("lag_seconds"),
            rpo.alias("rpo_target_seconds"),
            pl.col("pending_bytes"),
            pl.col("vhd_bytes"),
            pl.col("churn_bytes_per_s"),
            _seconds_since(now_ms, "status_since_ms").alias("status_age_seconds"),
            _epoch_seconds("last_failover_test_ms").alias("last_failover_test_seconds"),
            pl.col("failover_test_max_age_s").alias("failover_test_max_age_seconds"),
            # Lag only keeps growing once a cycle is overdue (a cycle resets it); until then
            # nothing is trending towards a breach.
            pl.when(lag > frequency * 1.5)
            .then(pl.max_horizontal(rpo - lag, pl.lit(0.0)))
            .otherwise(pl.lit(INF))
            .alias("time_to_breach_seconds"),
        )
        .with_columns(
            pl.when(critical)
            .then(pl.lit("critical"))
            .when(warning)
            .then(pl.lit("warning"))
            .otherwise(pl.lit("normal"))
            .alias("health_state")
        )
        .collect()
    )


def backup_view(state: FleetState, now_ms: int, params: ViewParams) -> pl.DataFrame:
    return state.backup.select(
        pl.col("vm_id").alias("vm"),
        pl.col("cluster_id").alias("hci_cluster"),
        _epoch_seconds("last_success_ms").alias("last_success_seconds"),
        _seconds_since(now_ms, "last_success_ms")
        .fill_null(_seconds_since(now_ms, "first_seen_ms"))
        .alias("backup_age_seconds"),
        pl.col("backup_rpo_s").alias("backup_rpo_target_seconds"),
        pl.col("consecutive_failures"),
        _epoch_seconds("last_restore_test_ms").alias("last_restore_test_seconds"),
        pl.col("restore_test_max_age_s").alias("restore_test_max_age_seconds"),
    )


def node_view(state: FleetState, now_ms: int, params: ViewParams) -> pl.DataFrame:
    age = _seconds_since(now_ms, "last_heartbeat_ms")
    return state.nodes.select(
        pl.col("cluster_id").alias("hci_cluster"),
        pl.col("node_id").alias("node"),
        pl.col("state"),
        _epoch_seconds("last_heartbeat_ms").alias("last_heartbeat_seconds"),
        age.alias("heartbeat_age_seconds"),
        pl.lit(params.heartbeat_timeout_s).alias("heartbeat_timeout_seconds"),
        ((pl.col("state") == "up") & (age <= params.heartbeat_timeout_s)).cast(pl.Int8).alias("up"),
        pl.col("memory_bytes"),
        pl.col("memory_used_bytes"),
        pl.col("net_capacity_bytes_per_s"),
        pl.col("iops_capacity"),
        pl.col("iops_used"),
    )


def cluster_view(nodes: pl.DataFrame) -> pl.DataFrame:
    """Per instance: IOPS headroom and N+1 memory capacity, over the nodes that are up."""
    up = nodes.filter(pl.col("up") == 1)
    free = (pl.col("memory_bytes") - pl.col("memory_used_bytes")).cast(pl.Float64)
    largest = pl.col("memory_used_bytes").arg_max()
    return up.group_by("hci_cluster").agg(
        (1.0 - pl.col("iops_used").sum() / pl.col("iops_capacity").sum()).alias("iops_headroom_ratio"),
        # If the node running the most memory fails, the others' free memory must take it.
        ((free.sum() - free.get(largest)) / pl.col("memory_used_bytes").get(largest).cast(pl.Float64)).alias(
            "failover_capacity_ratio"
        ),
        pl.col("net_capacity_bytes_per_s").sum().alias("net_capacity_bytes_per_s"),
        pl.len().alias("nodes_up"),
    )


def link_view(replication: pl.DataFrame, clusters: pl.DataFrame, params: ViewParams) -> pl.DataFrame:
    """Per replication link: the throughput its VMs need to keep up, against its capacity."""
    declared = pl.DataFrame(
        list(params.link_capacity_bytes_per_s),
        schema={"hci_cluster": pl.String, "target": pl.String, "declared_capacity": pl.Float64},
        orient="row",
    )
    needed = replication.group_by("hci_cluster", "target").agg(
        pl.col("churn_bytes_per_s").sum().alias("needed_bytes_per_s"),
        pl.len().alias("vms"),
        (pl.col("health_state") != "normal").sum().alias("vms_unhealthy"),
    )
    capacity = pl.coalesce("declared_capacity", "net_capacity_bytes_per_s")
    return (
        needed.join(declared, on=["hci_cluster", "target"], how="left")
        .join(clusters.select("hci_cluster", "net_capacity_bytes_per_s"), on="hci_cluster", how="left")
        .select(
            "hci_cluster",
            "target",
            "needed_bytes_per_s",
            capacity.alias("capacity_bytes_per_s"),
            (pl.col("needed_bytes_per_s") / capacity).alias("saturation_ratio"),
            "vms",
            "vms_unhealthy",
        )
    )


@dataclass(frozen=True)
class Views:
    """Everything rules and exporters see at `now_ms`."""

    now_ms: int
    vm_replication: pl.DataFrame
    vm_backup: pl.DataFrame
    node: pl.DataFrame
    link: pl.DataFrame
    cluster: pl.DataFrame

    def of(self, entity: str) -> pl.DataFrame:
        frame: pl.DataFrame = getattr(self, entity)
        return frame


def build_views(state: FleetState, now_ms: int, params: ViewParams) -> Views:
    replication = replication_view(state, now_ms, params)
    nodes = node_view(state, now_ms, params)
    clusters = cluster_view(nodes)
    return Views(
        now_ms=now_ms,
        vm_replication=replication,
        vm_backup=backup_view(state, now_ms, params),
        node=nodes,
        link=link_view(replication, clusters, params),
        cluster=clusters,
    )


def empty_views() -> Views:
    return build_views(FleetState(), 0, ViewParams())
