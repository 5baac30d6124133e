"""Benchmark of one rule-engine tick over a large fleet, and of applying a replication batch.

    python3 -m bench.tick --sizes 100000 1000000

Engine state is built directly as polars tables with the exact schemas of rules/state.py (no
JSON, no decoder), so that building a million VMs takes seconds. Each size runs in a fresh
child process so that its resident-memory figure is not polluted by the previous size.

Ticks are timed at steady state: before each tick, the second's traffic is applied (not
timed) as the service would, the healthy VMs' completed cycles (about 15,000 events per second
at a million VMs) and the nodes' heartbeats, so that lags stay where a live fleet keeps them.
Then the same fleet is frozen (nothing reports, every lag grows: an alert storm) and timed
again.

Every figure comes with a baseline measured in the same process, interleaved with the measured
operation, because absolute times drift on a shared 2-core machine: a trivial full pass over
the same replication table (`select(max(last_recovery_point_ms))`). The ratio is the figure to
compare across runs; milliseconds are for the target.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import statistics
import sys
import time
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import polars as pl
import yaml

from bench._common import machine_line, ms, rss_bytes, settled_rss_bytes, summary, timed, uniform
from ingest.contracts import SCHEMAS, Stream
from rpowatch import simulator
from rules import state
from rules.dedupe import SeenIds
from rules.engine import Engine, EngineSettings
from rules.pack import compile_pack

PACK_PATH = Path(__file__).resolve().parent.parent / "rules" / "packs" / "default.yaml"

NOW0_MS = 1_795_000_000_000  # 2026-11-18T08:53:20Z: any fixed instant keeps runs comparable
DAY_MS = 86_400_000
GIB = 1024**3
TICK_STEP_MS = 1_000  # the engine's default tick interval

# The simulator's vocabulary (rpowatch/simulator.py), so that string lengths are realistic.
SITES = ("sea", "ams", "fra", "lon", "syd", "sin", "tor", "dub")
AZURE_REGIONS = (
    "westus2",
    "westeurope",
    "germanywestcentral",
    "uksouth",
    "australiaeast",
    "southeastasia",
    "canadacentral",
    "northeurope",
)
SERVICES = simulator.SERVICES  # the same application names as the demo's fleet
STORAGE_PATHS_PER_CLUSTER = 3
NODE_MEMORY_BYTES = 512 * GIB
NODE_IOPS_CAPACITY = 200_000.0
NODE_NET_CAPACITY = 1.25e9
STORAGE_PATH_BYTES = 20 * 1024**4  # a 20 TiB cluster shared volume

# Shares of the fleet in each condition (per VM or per node, independent draws).
LAGGING_PAST_RPO = 0.01
LAG_AT_RISK = 0.005
ASR_CLUSTER_SHARE = 0.2  # instances whose VMs replicate to Azure (ASR); the rest to a partner
BACKUP_FAILING = 0.015
NODE_SILENT = 0.002
NODE_DOWN = 0.001
NODE_MAINTENANCE = 0.003


# --- state ----------------------------------------------------------------------------------


def _pick(u: pl.Expr, values: tuple[str, ...]) -> pl.Expr:
    """values[floor(u * len)] as a string expression."""
    idx = (u * len(values)).cast(pl.Int64).clip(0, len(values) - 1)
    return idx.replace_strict(list(range(len(values))), list(values), return_dtype=pl.String)


def _pad(expr: pl.Expr, width: int) -> pl.Expr:
    return expr.cast(pl.String).str.zfill(width)


def build_state(vms: int, vms_per_cluster: int, now_ms: int = NOW0_MS) -> state.FleetState:
    """A realistic fleet of `vms` VMs: `vms_per_cluster` VMs per Azure Local instance, one node
    per 100 VMs, every instance replicating to one target (a partner instance, or Azure for
    ASR instances), so links = instances."""
    clusters = -(-vms // vms_per_cluster)
    nodes_per_cluster = max(1, round(vms_per_cluster / 100))
    i = pl.col("i")
    c = pl.col("c")
    site = _pick((c % len(SITES)).cast(pl.Float64) / len(SITES), SITES)
    short = pl.concat_str(site, _pad(c + 1, 5))
    cluster_id = pl.concat_str(pl.lit("hci-"), site, pl.lit("-"), _pad(c + 1, 5))
    partner = (c + 1) % clusters
    partner_id = pl.concat_str(
        pl.lit("hci-"),
        _pick((partner % len(SITES)).cast(pl.Float64) / len(SITES), SITES),
        pl.lit("-"),
        _pad(partner + 1, 5),
    )
    asr = uniform(c, 11) < ASR_CLUSTER_SHARE
    region = _pick((c % len(AZURE_REGIONS)).cast(pl.Float64) / len(AZURE_REGIONS), AZURE_REGIONS)

    u_freq, u_lag, u_lag2, u_status = uniform(i, 1), uniform(i, 2), uniform(i, 3), uniform(i, 4)
    frequency = pl.when(u_freq < 0.4).then(30).when(u_freq < 0.8).then(300).otherwise(900).cast(pl.Int64)
    rpo_s = pl.col("frequency_s").cast(pl.Float64) * 2
    # Healthy VMs are somewhere in their cycle; 1 % are past their RPO, 0.5 % close to it.
    lag_s = (
        pl.when(u_lag < LAGGING_PAST_RPO)
        .then(rpo_s * (1.05 + 4 * u_lag2))
        .when(u_lag < LAGGING_PAST_RPO + LAG_AT_RISK)
        .then(rpo_s * (0.82 + 0.15 * u_lag2))
        .otherwise(1.0 + pl.col("frequency_s").cast(pl.Float64) * u_lag2)
    )
    status = (
        pl.when(u_status < 0.003)
        .then(pl.lit("failed"))
        .when(u_status < 0.005)
        .then(pl.lit("paused"))
        .when(u_status < 0.006)
        .then(pl.lit("resync_required"))
        .when(u_status < 0.007)
        .then(pl.lit("initial_replication"))
        .otherwise(pl.lit("replicating"))
    )
    churn = (pl.lit(50e3).log() + uniform(i, 5) * (pl.lit(5e6).log() - pl.lit(50e3).log())).exp().round(1)
    j = i % vms_per_cluster

    base = pl.DataFrame({"i": pl.int_range(vms, dtype=pl.Int64, eager=True)}).with_columns(
        (i // vms_per_cluster).alias("c")
    )
    replication = (
        base.lazy()
        .with_columns(frequency.alias("frequency_s"), cluster_id.alias("cluster_id"))
        .with_columns((lag_s * 1000).cast(pl.Int64).alias("lag_ms"))
        .select(
            pl.concat_str(pl.lit("vm-"), short, pl.lit("-"), _pad(j + 1, 4)).alias("vm_id"),
            pl.col("cluster_id"),
            pl.when(asr).then(pl.concat_str(pl.lit("azure:"), region)).otherwise(partner_id).alias("target_id"),
            pl.when(asr).then(pl.lit("asr")).otherwise(pl.lit("hyperv_replica")).alias("technology"),
            pl.col("frequency_s"),
            (now_ms - (uniform(i, 6) * 400 * DAY_MS).cast(pl.Int64) - DAY_MS).alias("first_seen_ms"),
            (now_ms - pl.col("lag_ms") + 2_000).clip(upper_bound=now_ms).alias("last_event_ms"),
            (now_ms - pl.col("lag_ms")).alias("last_recovery_point_ms"),
            pl.when(uniform(i, 7) < 0.05)
            .then(pl.lit(None, dtype=pl.Int64))
            .otherwise(now_ms - (uniform(i, 8) * 30 * DAY_MS).cast(pl.Int64))
            .alias("last_failover_test_ms"),
            status.alias("status"),
            (now_ms - (uniform(i, 9) * 20 * DAY_MS).cast(pl.Int64)).alias("status_since_ms"),
            (pl.col("lag_ms").cast(pl.Float64) / 1000 * churn * uniform(i, 10)).cast(pl.Int64).alias("pending_bytes"),
            (40 * GIB + (uniform(i, 12) * 460 * GIB).cast(pl.Int64)).alias("vhd_bytes"),
            churn.alias("churn_bytes_per_s"),
            pl.concat_str(cluster_id, pl.lit("-csv"), (j % STORAGE_PATHS_PER_CLUSTER + 1).cast(pl.String)).alias(
                "storage_path_id"
            ),
            pl.concat_str(
                _pick(uniform(c * 1000 + j // 4, 13), SERVICES), pl.lit("-"), short, pl.lit("-"),
                (j // 4 + 1).cast(pl.String),
            ).alias("service_group"),
            rpo_s.alias("rpo_target_s"),
            pl.lit(31 * 86_400.0).alias("failover_test_max_age_s"),
        )
        .collect()
        .with_columns(
            # Counters of a VM that has been replicating steadily for the whole window.
            pl.lit(now_ms // 3_600_000).alias("window_bucket"),
            (3600 // pl.col("frequency_s")).alias("completed_cur"),
            (3600 // pl.col("frequency_s")).alias("completed_prev"),
            pl.lit(0).alias("missed_cur"),
            pl.lit(0).alias("missed_prev"),
            pl.col("status_since_ms").alias("status_event_ms"),
            state.link_key().alias("link_key"),
            state.vm_key().alias("vm_key"),
            state.identity_key(state.REPLICATION_IDENTITY),
        )
        .select(state.REPLICATION_SCHEMA.names())
        .cast(state.REPLICATION_SCHEMA)
    )

    failures = (1 + uniform(i, 21) * 5).cast(pl.Int64)
    failing = uniform(i, 20) < BACKUP_FAILING
    backup = (
        replication.lazy()
        .select("vm_id", "vm_key", "cluster_id", "first_seen_ms")
        .with_row_index("i")
        .with_columns(pl.col("i").cast(pl.Int64))
        .select(
            "vm_id",
            "vm_key",
            "cluster_id",
            "first_seen_ms",
            (now_ms - (uniform(i, 22) * 3_600_000).cast(pl.Int64)).alias("last_event_ms"),
            # A failing VM's chain stopped `failures` daily jobs ago.
            pl.when(failing)
            .then(now_ms - failures * 23 * 3_600_000 - (uniform(i, 23) * 3_600_000).cast(pl.Int64))
            .otherwise(now_ms - (uniform(i, 23) * 23 * 3_600_000).cast(pl.Int64))
            .alias("last_success_ms"),
            pl.when(uniform(i, 24) < 0.1)
            .then(pl.lit(None, dtype=pl.Int64))
            .otherwise(now_ms - (uniform(i, 25) * 90 * DAY_MS).cast(pl.Int64))
            .alias("last_restore_test_ms"),
            pl.when(failing).then(failures).otherwise(0).alias("consecutive_failures"),
            pl.lit(86_400.0).alias("backup_rpo_s"),
            pl.lit(90 * 86_400.0).alias("restore_test_max_age_s"),
        )
        .collect()
        .with_columns(
            pl.col("last_success_ms").alias("last_success_job_ms"),
            # One failure time per consecutive failure, after the last success.
            pl.int_ranges(pl.col("consecutive_failures"))
            .list.eval(pl.element() * 0)
            .alias("failure_ts"),
            pl.lit(14).alias("daily_points"),
            pl.lit(0).alias("weekly_points"),
            pl.lit(6).alias("monthly_points"),
            pl.lit(1).alias("yearly_points"),
            (pl.int_range(pl.len()) % 3 == 0).alias("tiers_reported"),
            pl.lit(14.0).alias("retention_daily"),
            pl.lit(0.0).alias("retention_weekly"),
            pl.lit(6.0).alias("retention_monthly"),
            pl.lit(7.0).alias("retention_yearly"),
            state.identity_key(state.BACKUP_IDENTITY),
        )
        .select(state.BACKUP_SCHEMA.names())
        .cast(state.BACKUP_SCHEMA)
    )

    n_nodes = clusters * nodes_per_cluster
    k = pl.col("i") % nodes_per_cluster
    u_node = uniform(i, 31)
    nodes = (
        pl.DataFrame({"i": pl.int_range(n_nodes, dtype=pl.Int64, eager=True)})
        .lazy()
        .with_columns((i // nodes_per_cluster).alias("c"))
        .with_columns(cluster_id.alias("cluster_id"))
        .select(
            "cluster_id",
            pl.concat_str(pl.col("cluster_id"), pl.lit("-n"), (k + 1).cast(pl.String)).alias("node_id"),
            pl.when(u_node < NODE_SILENT)
            .then(now_ms - 60_000 - (uniform(i, 32) * 540_000).cast(pl.Int64))
            .otherwise(now_ms - (uniform(i, 32) * 5_000).cast(pl.Int64))
            .alias("last_heartbeat_ms"),
            pl.when((u_node >= NODE_SILENT) & (u_node < NODE_SILENT + NODE_DOWN))
            .then(pl.lit("down"))
            .when((u_node >= NODE_SILENT + NODE_DOWN) & (u_node < NODE_SILENT + NODE_DOWN + NODE_MAINTENANCE))
            .then(pl.lit("maintenance"))
            .otherwise(pl.lit("up"))
            .alias("state"),
            pl.lit(NODE_MEMORY_BYTES).alias("memory_bytes"),
            (NODE_MEMORY_BYTES * (0.45 + 0.2 * uniform(i, 33))).cast(pl.Int64).alias("memory_used_bytes"),
            pl.lit(NODE_NET_CAPACITY).alias("net_capacity_bytes_per_s"),
            (NODE_NET_CAPACITY * (0.05 + 0.3 * uniform(i, 34))).alias("net_replication_bytes_per_s"),
            pl.lit(NODE_IOPS_CAPACITY).alias("iops_capacity"),
            (NODE_IOPS_CAPACITY * (0.2 + 0.3 * uniform(i, 35))).round(0).alias("iops_used"),
        )
        .collect()
        .with_columns(
            pl.col("net_replication_bytes_per_s").alias("net_replication_avg"),
            pl.col("iops_used").alias("iops_used_avg"),
            pl.lit("kafka").alias("source"),
        )
        .select(state.NODE_SCHEMA.names())
        .cast(state.NODE_SCHEMA)
    )
    # What the nodes' heartbeats report besides themselves: each storage path of an instance
    # (as its first node sees it) and each instance's clock skew, so that the per-path and
    # per-instance views cost what they cost on a live fleet.
    per_path = pl.DataFrame({"i": pl.int_range(clusters * STORAGE_PATHS_PER_CLUSTER, dtype=pl.Int64, eager=True)})
    storage_paths = (
        per_path.lazy()
        .with_columns((i // STORAGE_PATHS_PER_CLUSTER).alias("c"))
        .with_columns(cluster_id.alias("cluster_id"))
        .select(
            "cluster_id",
            pl.concat_str("cluster_id", pl.lit("-csv"), (i % STORAGE_PATHS_PER_CLUSTER + 1).cast(pl.String)).alias(
                "path_id"
            ),
            pl.concat_str("cluster_id", pl.lit("-n1")).alias("node_id"),
            (now_ms - (uniform(i, 41) * 5_000).cast(pl.Int64)).alias("last_report_ms"),
            pl.lit(STORAGE_PATH_BYTES).alias("capacity_bytes"),
            (STORAGE_PATH_BYTES * (0.1 + 0.6 * uniform(i, 42))).cast(pl.Int64).alias("free_bytes"),
            pl.lit(NODE_IOPS_CAPACITY).alias("iops_capacity"),
            (NODE_IOPS_CAPACITY * (0.2 + 0.3 * uniform(i, 43))).round(0).alias("iops_used"),
            pl.lit(True).alias("online"),
        )
        .collect()
        .cast(state.STORAGE_PATH_SCHEMA)
    )
    instances = (
        pl.DataFrame({"c": pl.int_range(clusters, dtype=pl.Int64, eager=True)})
        .select(
            cluster_id.alias("cluster_id"),
            ((uniform(c, 44) - 0.5) * 4).alias("clock_skew_s"),  # within ±2 s: NTP-synchronised
            pl.lit(now_ms).alias("skew_updated_ms"),
        )
        .cast(state.CLUSTER_SCHEMA)
    )
    for table, schema in (
        (replication, state.REPLICATION_SCHEMA),
        (backup, state.BACKUP_SCHEMA),
        (nodes, state.NODE_SCHEMA),
        (storage_paths, state.STORAGE_PATH_SCHEMA),
        (instances, state.CLUSTER_SCHEMA),
    ):
        if table.schema != schema:
            raise AssertionError(f"schema drift: {table.schema} != {schema}")
    # One chunk per column, as the engine keeps its tables (apply compacts them).
    return state.FleetState(
        replication=replication.rechunk(),
        backup=backup.rechunk(),
        nodes=nodes.rechunk(),
        storage_paths=storage_paths.rechunk(),
        clusters=instances.rechunk(),
    )


def replication_batch(fleet: state.FleetState, size: int, now_ms: int, seed: int) -> pl.DataFrame:
    """A decoded replication batch (contract schema) of `size` events for distinct VMs of the
    fleet, as the decoder would hand it over: mostly completed cycles, a few other kinds."""
    rep = fleet.replication
    picked = rep.select(pl.int_range(rep.height, dtype=pl.Int64).alias("row")).select(
        pl.col("row").sample(n=min(size, rep.height), seed=seed)
    )
    rows = rep.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)).join(picked, on="row")
    i = pl.col("row")
    u_kind = uniform(i, seed * 7 + 1)
    kind = (
        pl.when(u_kind < 0.97)
        .then(pl.lit("cycle_completed"))
        .when(u_kind < 0.985)
        .then(pl.lit("cycle_failed"))
        .when(u_kind < 0.99)
        .then(pl.lit("cycle_missed"))
        .when(u_kind < 0.995)
        .then(pl.lit("test_failover_completed"))
        .otherwise(pl.lit("resumed"))
    )
    ts_ms = now_ms - (uniform(i, seed * 7 + 2) * 1_000).cast(pl.Int64)
    out = _events(rows, kind, ts_ms, now_ms, seed)
    return out.sample(fraction=1.0, shuffle=True, seed=seed)  # arrival order, not table order


def _events(rows: pl.DataFrame, kind: pl.Expr, ts_ms: pl.Expr, now_ms: int, seed: int) -> pl.DataFrame:
    """Decoded replication events (contract schema) for `rows` of the replication table (with
    an Int64 `row` column): `kind` at `ts_ms`; a completed cycle's recovery point is 2 s older."""
    i = pl.col("row")
    ts = ts_ms.cast(pl.Datetime("ms", "UTC"))
    schema = SCHEMAS[Stream.REPLICATION]
    out = rows.select(
        pl.concat_str(pl.lit("rep-"), pl.col("vm_id"), pl.lit("-"), ts_ms.cast(pl.String)).alias("event_id"),
        ts.alias("ts"),
        pl.col("cluster_id"),
        pl.col("vm_id"),
        pl.col("target_id"),
        pl.col("technology"),
        kind.alias("kind"),
        pl.col("frequency_s"),
        pl.when(kind == "cycle_completed").then((ts_ms - 2_000).cast(pl.Datetime("ms", "UTC"))).alias(
            "recovery_point_ts"
        ),
        (pl.col("churn_bytes_per_s") * pl.col("frequency_s")).cast(pl.Int64).alias("bytes"),
        (pl.col("churn_bytes_per_s") * uniform(i, seed * 7 + 3)).cast(pl.Int64).alias("pending_bytes"),
        pl.col("vhd_bytes"),
        pl.col("churn_bytes_per_s"),
        (2_000 + uniform(i, seed * 7 + 4) * 20_000).cast(pl.Int64).alias("duration_ms"),
        pl.col("storage_path_id"),
        pl.col("service_group"),
        pl.lit(now_ms).cast(pl.Datetime("ms", "UTC")).alias("received_at"),
    ).cast(schema)
    if out.schema != schema:
        raise AssertionError(f"schema drift: {out.schema} != {schema}")
    return out


# A healthy VM completes a cycle once its lag reaches its interval; VMs that are behind (at risk
# from 1.6 intervals: 80 % of an RPO of two intervals) are the fleet's broken ones and stay so.
DUE_FROM, DUE_UNTIL = 1.0, 1.6
HEARTBEAT_EVERY_MS = 5_000  # build_state's nodes last reported within the last 5 s


def due_cycles(fleet: state.FleetState, now_ms: int) -> pl.DataFrame:
    """The replication events of the second before `now_ms` at steady state: every healthy,
    replicating VM whose lag reached its interval completes a cycle (about 15,000 per second
    at a million VMs with build_state's mix of intervals)."""
    lag_ms = now_ms - pl.col("last_recovery_point_ms")
    interval_ms = pl.col("frequency_s") * 1000
    rows = (
        fleet.replication.lazy()
        .with_row_index("row")
        .filter(
            (pl.col("status") == "replicating")
            & (lag_ms >= interval_ms * DUE_FROM)
            & (lag_ms < interval_ms * DUE_UNTIL)
        )
        .with_columns(pl.col("row").cast(pl.Int64))
        .collect()
    )
    ts_ms = now_ms - 1 - (uniform(pl.col("row"), now_ms % 9973) * 999).cast(pl.Int64)
    return _events(rows, pl.lit("cycle_completed"), ts_ms, now_ms, seed=now_ms % 9973)


def run_second(engine: Engine, now_ms: int, events: pl.DataFrame | None = None) -> int:
    """What reaches the engine between two ticks at steady state: the cycles completed in the
    last second (`events`, by default `due_cycles`), applied as one batch, and the heartbeats of
    the nodes that report every 5 s (written straight into the node table: the tick reads their
    age, not how they arrived). Nodes that build_state made silent or down stay so. Returns
    the events applied. `engine` may be any version of rules.engine.Engine (bench.tick_ab).

    First, as the service does right after each tick, the engine prepares the next one
    (`Engine.prepare`: the sums a refresh would compute inside it), where it can."""
    prepare = getattr(engine, "prepare", None)  # versions of rules/ before it tick without
    if prepare is not None:
        prepare(now_ms - TICK_STEP_MS, TICK_STEP_MS)
    if events is None:
        events = due_cycles(engine.fleet, now_ms)
    applied = engine.apply(Stream.REPLICATION, events, now_ms)
    nodes = engine.fleet.nodes
    reporting = (pl.col("state") == "up") & (now_ms - pl.col("last_heartbeat_ms") >= HEARTBEAT_EVERY_MS) & (
        now_ms - pl.col("last_heartbeat_ms") < 2 * HEARTBEAT_EVERY_MS
    )
    engine.fleet = replace(
        engine.fleet,
        nodes=nodes.with_columns(
            pl.when(reporting).then(pl.lit(now_ms)).otherwise(pl.col("last_heartbeat_ms")).alias("last_heartbeat_ms")
        ),
    )
    return applied


def seen_ids(events: int, now_ms: int, window_ms: int) -> pl.DataFrame:
    """`events` event ids applied over the window before `now_ms` (event_id, cluster_id,
    seen_ms), evenly spread as at steady state."""
    i = pl.int_range(events, dtype=pl.Int64)
    return pl.select(
        pl.concat_str(pl.lit("rep-vm-ams"), _pad(i // 100 % 100_000, 5), pl.lit("-"), _pad(i % 100, 4), pl.lit("-"),
                      (now_ms - window_ms + i * window_ms // events).cast(pl.String)).alias("event_id"),
        pl.concat_str(pl.lit("hci-ams-"), _pad(i // 100 % 1000, 3)).alias("cluster_id"),
        (now_ms - window_ms + i * window_ms // events + 1).alias("seen_ms"),
    )


def seen_table(events: int, now_ms: int, window_ms: int) -> SeenIds:
    """A dedupe table at steady state: `events` event ids remembered over the window."""
    return SeenIds.from_frame(seen_ids(events, now_ms, window_ms), window_ms)


# --- measurements ---------------------------------------------------------------------------


def load_engine(engine: Any = Engine, compile: Any = compile_pack) -> Engine:
    """An engine with the default pack; `engine` and `compile` may come from another version
    of rules/ (bench.tick_ab)."""
    with open(PACK_PATH) as f:
        pack, problems = compile(yaml.safe_load(f), {"runbook_base": "x"})
    if problems:
        raise SystemExit(f"default pack has problems: {problems}")
    return cast(Engine, engine(pack))


BASELINE_INNER = 10  # a sub-millisecond pass is timed as the mean of this many back-to-back runs


def baseline(fleet: state.FleetState) -> float:
    """A trivial full pass over the replication table: one Int64 column, one aggregate."""
    query = fleet.replication.lazy().select(pl.col("last_recovery_point_ms").max())
    seconds, _ = timed(lambda: [query.collect() for _ in range(BASELINE_INNER)])
    return seconds / BASELINE_INNER


def baseline_filter(fleet: state.FleetState, now_ms: int) -> float:
    """A filter on one column that keeps every column of the VMs more than a minute behind
    (about half the fleet): a full pass that also allocates, as a tick does."""
    seconds, _ = timed(lambda: fleet.replication.filter(pl.col("last_recovery_point_ms") < now_ms - 60_000))
    return seconds


def time_ticks(
    engine: Engine, warmup: int, repeats: int, now_ms: int, traffic: list[int] | None = None
) -> tuple[list[float], list[float], list[float], int]:
    """Tick `warmup` + `repeats` times, one second apart; each tick is preceded by both
    baselines so that all three see the same machine conditions. Given `traffic`, each
    second's events are applied before its tick (`run_second`, not timed) and their number
    appended to it; without, the fleet is frozen: nothing reports, every lag grows."""
    ticks: list[float] = []
    bases: list[float] = []
    filters: list[float] = []
    now = now_ms
    for n in range(warmup + repeats):
        if traffic is not None:
            traffic.append(run_second(engine, now))
        b = baseline(engine.fleet)
        f = baseline_filter(engine.fleet, now)
        t, _ = timed(lambda: engine.tick(now))
        if n >= warmup:
            ticks.append(t)
            bases.append(b)
            filters.append(f)
        now += TICK_STEP_MS
    return ticks, bases, filters, now


PACED_TICKS = 15  # ticks one second apart; RSS is the median before the last ten


def paced_rss(engine: Engine, now_ms: int) -> tuple[int, int]:
    """Median RSS sampled just before each of the last ten of PACED_TICKS ticks run one second
    apart in real time, as the service runs them (each second's traffic applied, the last
    result held); and the clock after."""
    samples: list[int] = []
    held = None
    for _ in range(PACED_TICKS):
        started = time.monotonic()
        run_second(engine, now_ms)
        samples.append(rss_bytes())
        held = engine.tick(now_ms)
        now_ms += TICK_STEP_MS
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    del held
    return int(statistics.median(samples[-10:])), now_ms


def profile_tick(engine: Engine, now_ms: int, repeats: int) -> dict[str, dict[str, float]]:
    """Where a tick's time goes at steady state (each second's traffic applied first): the
    phases `Engine.tick` reports in `TickResult.phases` (aggregates, conditions, labels,
    lifecycle, transitions), each next to the filter baseline
    timed just before the tick, plus what a scrape or the history writer pays on top: building
    the full per-VM views the tick did not need."""
    out: dict[str, list[float]] = {}
    for r in range(repeats):
        now = now_ms + r * TICK_STEP_MS
        run_second(engine, now)
        out.setdefault("baseline: filter", []).append(baseline_filter(engine.fleet, now))
        result = engine.tick(now)
        out.setdefault("engine.tick (whole)", []).append(result.duration_s)
        for phase, seconds in result.phases.items():
            out.setdefault(f"  phase: {phase}", []).append(seconds)
        for entity in ("vm_replication", "vm_backup"):
            seconds, _ = timed(lambda: result.views.of(entity))
            out.setdefault(f"after the tick, on read: full {entity} view", []).append(seconds)
    return {name: summary(samples) for name, samples in out.items()}

def time_apply(
    engine: Engine, batches: int, batch_size: int, now_ms: int, seen: SeenIds | None
) -> dict[str, Any]:
    """Engine.apply of decoded replication batches onto the current fleet. The fleet (and its
    dedupe table) is reset before each batch so that every batch meets the same tables. After
    each apply, its two steps are timed alone on the same input: state.drop_seen and
    state.apply_replication."""
    fleet0 = engine.fleet
    # The engine's tables have one chunk per column (state._write_back compacts them when VMs
    # are added); build_state's come out of a lazy query in several. Every batch below starts
    # again from fleet0, so it is compacted here, once, as the engine's would already be.
    fleet0 = replace(fleet0, replication=fleet0.replication.rechunk())
    if seen is not None:
        fleet0 = replace(fleet0, seen={Stream.REPLICATION.value: seen})
    window_ms = int(engine.settings.dedupe_window_s * 1000)
    applies: list[float] = []
    bases: list[float] = []
    filters: list[float] = []
    dedupe: list[float] = []
    merge: list[float] = []
    prepared = [
        replication_batch(fleet0, batch_size, now_ms + n * TICK_STEP_MS, seed=100 + n) for n in range(batches + 1)
    ]
    for n, batch in enumerate(prepared):
        at = now_ms + n * TICK_STEP_MS
        engine.fleet = fleet0
        b = baseline(fleet0)
        f = baseline_filter(fleet0, at)
        t, fresh = timed(lambda: engine.apply(Stream.REPLICATION, batch, at))
        if fresh != batch.height:
            raise AssertionError(f"only {fresh} of {batch.height} events were new")
        d, (_, new) = timed(lambda: state.drop_seen(fleet0, Stream.REPLICATION.value, batch, at, window_ms))
        m, _ = timed(lambda: state.apply_replication(fleet0.replication, new, engine.settings.policies))
        if n >= 1:  # the first is a warm-up
            applies.append(t)
            bases.append(b)
            filters.append(f)
            dedupe.append(d)
            merge.append(m)
    engine.fleet = fleet0
    s = summary(applies)
    return {
        **s,
        "baseline_median_ms": summary(bases)["median_ms"],
        "baseline_filter_median_ms": summary(filters)["median_ms"],
        "ratio": s["median_ms"] / summary(bases)["median_ms"],
        "ratio_filter": s["median_ms"] / summary(filters)["median_ms"],
        "drop_seen": summary(dedupe),
        "apply_replication": summary(merge),
        "events_per_s": batch_size / (s["median_ms"] / 1000),
    }


def _legacy_drop_seen(
    seen: pl.DataFrame, events: pl.DataFrame, now_ms: int, window_ms: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """drop_seen as it was before rules/dedupe.py: one frame of string ids, anti-joined and
    filtered whole every batch. Kept here only as the reference `--seen` compares against."""
    fresh = events.unique(subset="event_id", keep="first", maintain_order=True).join(seen, on="event_id", how="anti")
    remembered = pl.concat(
        [
            seen.filter(pl.col("seen_ms") > now_ms - window_ms),
            fresh.select("event_id", "cluster_id", pl.lit(now_ms, dtype=pl.Int64).alias("seen_ms")),
        ]
    )
    return remembered, fresh


def _seen_batch(remembered: pl.DataFrame, size: int, now_ms: int, seed: int) -> pl.DataFrame:
    """`size` events with new ids, except 1 % replays of remembered ids, in random order."""
    replays = remembered.select("event_id", "cluster_id").sample(n=size // 100, seed=seed)
    new = seen_ids(size - replays.height, now_ms + 1, 1).select("event_id", "cluster_id").with_columns(
        pl.col("event_id").str.replace("rep-vm-ams", f"rep-vm-sea{seed}-")
    )
    return pl.concat([new, replays]).sample(fraction=1.0, shuffle=True, seed=seed)


def time_seen(ids: int, batch_size: int, batches: int, now_ms: int, window_ms: int) -> dict[str, Any]:
    """state.drop_seen against a steady-state dedupe table of `ids` ids, and the string
    anti-join it replaced on the same ids and batches, interleaved. Each batch is applied to
    the table the previous one left (time advancing at the rate that keeps it at `ids`), so
    buckets expire and tails are sorted into runs as often as in production."""
    frame = seen_ids(ids, now_ms, window_ms)
    legacy = frame
    fleet = state.FleetState(seen={Stream.REPLICATION.value: SeenIds.from_frame(frame, window_ms)})
    step_ms = max(1, batch_size * window_ms // ids)
    new_s: list[float] = []
    old_s: list[float] = []
    recent = frame.filter(pl.col("seen_ms") > now_ms - window_ms // 2)  # replays still inside the window
    for n in range(batches + 1):
        at = now_ms + (n + 1) * step_ms
        batch = _seen_batch(recent, batch_size, at, seed=300 + n)
        d, (fleet, fresh) = timed(lambda: state.drop_seen(fleet, Stream.REPLICATION.value, batch, at, window_ms))
        o, (legacy, fresh_old) = timed(lambda: _legacy_drop_seen(legacy, batch, at, window_ms))
        if fresh.height != fresh_old.height or fresh.height != batch_size - batch_size // 100:
            raise AssertionError(f"fresh events: {fresh.height} (new), {fresh_old.height} (legacy)")
        if n >= 1:  # the first is a warm-up
            new_s.append(d)
            old_s.append(o)
    new, old = summary(new_s), summary(old_s)
    table = fleet.seen[Stream.REPLICATION.value]
    return {
        "ids": ids,
        "batch": batch_size,
        "drop_seen": new,
        "legacy": old,
        "ratio": new["median_ms"] / old["median_ms"],
        "bytes_per_id": table.estimated_size() / len(table),
        "legacy_bytes_per_id": legacy.estimated_size() / legacy.height,
    }


def print_seen(r: dict[str, Any]) -> None:
    new, old = r["drop_seen"], r["legacy"]
    print(
        f"drop_seen of {r['batch']:,}-event batches (1 % replays) against {r['ids']:,} remembered ids, "
        f"{new['n']} batches: median {new['median_ms']:.1f} ms, p90 {new['p90_ms']:.1f} ms, max {new['max_ms']:.1f} ms, "
        f"{r['bytes_per_id']:.1f} B/id; string anti-join it replaced, same run: median {old['median_ms']:.1f} ms, "
        f"p90 {old['p90_ms']:.1f} ms, {r['legacy_bytes_per_id']:.1f} B/id; ratio new / old {r['ratio']:.3f}"
    )


def profile_apply(engine: Engine, batch_size: int, now_ms: int, repeats: int) -> dict[str, dict[str, float]]:
    """Where state.apply_replication's time goes on a large table: its steps one by one on the
    same data, and, as a same-run baseline, the full-join implementation it replaced (the
    reference copy in tests/unit/test_apply.py). The what-ifs are plain polars on the same
    data, not drop-in code."""
    from tests.unit.test_apply import old_apply_replication  # the reference, not shipped code

    chunked = engine.fleet.replication
    table = chunked.rechunk()  # as the engine keeps it (see time_apply)
    legacy_table = table.drop("vm_key")
    policies = engine.settings.policies
    window = state.WindowCounters(int(engine.settings.monitoring_window_s * 1000))
    out: dict[str, list[float]] = {}

    def add(name: str, fn: Callable[[], Any]) -> Any:
        seconds, value = timed(fn)
        out.setdefault(name, []).append(seconds)
        return value

    for n in range(repeats):
        batch = replication_batch(engine.fleet, batch_size, now_ms + n * TICK_STEP_MS, seed=500 + n)
        add("state.apply_replication (whole)", lambda: state.apply_replication(table, batch, policies, window))
        # Its steps one by one, as apply_replication chains them.
        position = add("  _locate: each event's row (vm_key.is_in over the table)", lambda: state._locate(table, batch))
        located = batch.with_columns(
            position.alias(state._POS), table.get_column("window_bucket").gather(position).alias("prev_bucket")
        )
        reduced = add("  _reduce_replication: one row per VM", lambda: state._reduce_replication(located, window))
        old, joined = add("  _beside: the rows' previous values beside the batch", lambda: state._beside(table, reduced))
        merged = add("  _merge_replication: one query", lambda: state._merge_replication(joined))
        relabelled = add("  _relabel: hashes of changed labels, policies", lambda: state._relabel(merged, policies))
        add("  _write_rows: scatter the changed columns", lambda: state._write_rows(table, old, relabelled))
        add(
            "reference: the full-join implementation it replaced",
            lambda: old_apply_replication(legacy_table, batch, policies, window),
        )
        add(
            "what-if: apply onto the table as build_state leaves it (10 chunks)",
            lambda: state.apply_replication(chunked, batch, policies, window),
        )
    return {name: summary(samples) for name, samples in out.items()}


def run_size(args: argparse.Namespace) -> dict[str, Any]:
    vms = args.worker
    engine = load_engine()
    gc.collect()
    rss_before = rss_bytes()
    log(f"[{vms:,} VMs] building state ({args.vms_per_cluster} VMs per instance)")
    build_s, fleet = timed(lambda: build_state(vms, args.vms_per_cluster))
    engine.fleet = fleet
    gc.collect()
    rss_state = rss_bytes()
    first_s, first = timed(lambda: engine.tick(NOW0_MS))
    gc.collect()
    rss_tick = rss_bytes()
    links = first.views.link.height
    alerts_first = first.alerts.height
    table_bytes = sum(t.estimated_size() for t in (fleet.replication, fleet.backup, fleet.nodes))
    log(f"[{vms:,} VMs] built in {build_s:.1f} s; first tick {ms(first_s):.0f} ms; timing {args.repeats} ticks")
    del first

    # Steady state first: each second's cycles and heartbeats applied before its tick, as the
    # service sees a healthy fleet.
    applied: list[int] = []
    ticks, bases, filters, now = time_ticks(engine, args.warmup, args.repeats, NOW0_MS + TICK_STEP_MS, applied)
    alerts_steady = engine.alerts.height
    # What the process holds as the service runs it: ticks one second apart in real time (the
    # allocator returns freed pages after a decay of about 10 s, so back-to-back ticks overstate
    # it), sampled just before each tick, with the last result held.
    rss_ticking, now = paced_rss(engine, now)
    tick = summary(ticks)
    base = summary(bases)
    base_filter = summary(filters)
    result: dict[str, Any] = {
        "vms": vms,
        "vms_per_cluster": args.vms_per_cluster,
        "clusters": fleet.nodes.get_column("cluster_id").n_unique(),
        "nodes": fleet.nodes.height,
        "links": links,
        "alerts_after_first_tick": alerts_first,
        "alerts_after_steady_ticks": alerts_steady,
        "events_per_second": statistics.median(applied),
        "alerts_after_last_tick": engine.alerts.height,
        "build_s": build_s,
        "first_tick_ms": ms(first_s),
        "tick": tick,
        "baseline": base,
        "ratio": tick["median_ms"] / base["median_ms"],
        "baseline_filter": base_filter,
        "ratio_filter": tick["median_ms"] / base_filter["median_ms"],
        "ms_per_100k_vms": tick["median_ms"] / (vms / 100_000),
        "rss_before_mb": rss_before / 2**20,
        "rss_state_mb": rss_state / 2**20,
        "rss_after_tick_mb": rss_tick / 2**20,
        "bytes_per_vm_rss": (rss_tick - rss_before) / vms,
        "rss_ticking_mb": rss_ticking / 2**20,
        "bytes_per_vm_rss_ticking": (rss_ticking - rss_before) / vms,
        "bytes_per_vm_state_rss": (rss_state - rss_before) / vms,
        "bytes_per_vm_tables": table_bytes / vms,
    }
    if args.profile:
        log(f"[{vms:,} VMs] profiling")
        result["profile"] = profile_tick(engine, now, args.profile_repeats)
        now += args.profile_repeats * TICK_STEP_MS
    # Then the same fleet frozen (nothing reports any more): every lag grows and VMs cross
    # their thresholds by the thousand per tick, an alert storm.
    alerts_before = engine.alerts.height
    frozen_ticks, _, frozen_filters, now = time_ticks(engine, args.warmup, args.repeats, now)
    result["frozen"] = {
        "tick": summary(frozen_ticks),
        "ratio_filter": summary(frozen_ticks)["median_ms"] / summary(frozen_filters)["median_ms"],
        "alerts_before": alerts_before,
        "alerts_after": engine.alerts.height,
    }
    if args.apply:
        log(f"[{vms:,} VMs] timing apply of {args.batch:,}-event batches")
        result["apply"] = time_apply(engine, args.apply_repeats, args.batch, now, None)
        if args.profile:
            result["profile_apply"] = profile_apply(engine, args.batch, now, args.profile_repeats)
        if args.seen_steady:
            # At steady state the dedupe table holds every event id of the last window.
            rate = vms * (0.4 / 30 + 0.4 / 300 + 0.2 / 900)  # events/s at the fleet's mix
            window_ms = int(engine.settings.dedupe_window_s * 1000)
            rows = int(rate * window_ms / 1000)
            log(f"[{vms:,} VMs] timing apply with a steady-state dedupe table of {rows:,} ids")
            gc.collect()
            rss_unseen = settled_rss_bytes()
            seen = seen_table(rows, now, window_ms)
            gc.collect()
            rss_seen = settled_rss_bytes()
            result["apply_steady_seen"] = {
                **time_apply(engine, args.apply_repeats, args.batch, now, seen),
                "seen_rows": rows,
                "seen_bytes_per_vm": seen.estimated_size() / vms,
                "seen_bytes_per_vm_rss": (rss_seen - rss_unseen) / vms,
            }
            del seen
    return result


# --- driver ---------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| VMs | instances | nodes | links | tick median ms | tick p90 ms | ms per 100k VMs "
        "| baseline max ms | tick / max | baseline filter ms | tick / filter | RSS B/VM | RSS ticking B/VM "
        "| tables B/VM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, b, f = r["tick"], r["baseline"], r["baseline_filter"]
        lines.append(
            f"| {r['vms']:,} | {r['clusters']:,} | {r['nodes']:,} | {r['links']:,} | {t['median_ms']:.1f} "
            f"| {t['p90_ms']:.1f} | {r['ms_per_100k_vms']:.1f} | {b['median_ms']:.3f} | {r['ratio']:.0f} "
            f"| {f['median_ms']:.1f} | {r['ratio_filter']:.1f} | {r['bytes_per_vm_rss']:.0f} "
            f"| {r['bytes_per_vm_rss_ticking']:.0f} | {r['bytes_per_vm_tables']:.0f} |"
        )
    return "\n".join(lines)


def _apply_line(label: str, a: dict[str, Any]) -> str:
    return (
        f"  {label}: median {a['median_ms']:.1f} ms, p90 {a['p90_ms']:.1f} ms "
        f"({a['events_per_s']:,.0f} events/s); tick-style ratios: / max {a['ratio']:.0f}, "
        f"/ filter {a['ratio_filter']:.1f}; parts: drop_seen {a['drop_seen']['median_ms']:.1f} ms, "
        f"apply_replication {a['apply_replication']['median_ms']:.1f} ms"
    )


def print_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"# bench.tick  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {machine_line()}")
    print(
        f"warm-up {args.warmup}, then {args.repeats} ticks {TICK_STEP_MS} ms apart. Baselines, timed before each "
        f"tick: max = replication.select(max(last_recovery_point_ms)) (mean of {BASELINE_INNER}); "
        "filter = replication.filter(last_recovery_point_ms < now - 60 s)"
    )
    print()
    print(fmt_table(rows))
    print()
    for r in rows:
        print(
            f"{r['vms']:,} VMs: build {r['build_s']:.1f} s, first tick {r['first_tick_ms']:.0f} ms, "
            f"steady state: {r['events_per_second']:,.0f} replication events applied per second (not timed), "
            f"alerts {r['alerts_after_first_tick']:,} -> {r['alerts_after_steady_ticks']:,}; RSS {r['rss_before_mb']:.0f} MiB "
            f"-> {r['rss_state_mb']:.0f} MiB (state built, {r['bytes_per_vm_state_rss']:.0f} B/VM) -> "
            f"{r['rss_after_tick_mb']:.0f} MiB (after one tick, its result held: {r['bytes_per_vm_rss']:.0f} B/VM); "
            f"ticking once a second in real time: {r['rss_ticking_mb']:.0f} MiB ({r['bytes_per_vm_rss_ticking']:.0f} B/VM)"
        )
        f = r["frozen"]
        print(
            f"  frozen fleet (nothing reports; an alert storm): tick median {f['tick']['median_ms']:.1f} ms, "
            f"p90 {f['tick']['p90_ms']:.1f} ms, tick / filter {f['ratio_filter']:.1f}; "
            f"alerts {f['alerts_before']:,} -> {f['alerts_after']:,}"
        )
        if "apply" in r:
            print(_apply_line(f"Engine.apply, {args.batch:,} replication events, empty dedupe table", r["apply"]))
        if "apply_steady_seen" in r:
            a = r["apply_steady_seen"]
            print(
                _apply_line(
                    f"Engine.apply, dedupe table at steady state ({a['seen_rows']:,} ids, "
                    f"{a['seen_bytes_per_vm']:.0f} B/VM by estimated_size, {a['seen_bytes_per_vm_rss']:.0f} B/VM of RSS)",
                    a,
                )
            )
        for key in ("profile", "profile_apply"):
            if key in r:
                print(f"  {key} at {r['vms']:,} VMs (median / p90 ms):")
                for name, s in r[key].items():
                    print(f"    {name:<78} {s['median_ms']:8.2f} {s['p90_ms']:8.2f}")
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        growth = hi["tick"]["median_ms"] / lo["tick"]["median_ms"]
        print(
            f"\nscaling: {lo['vms']:,} -> {hi['vms']:,} VMs ({hi['vms'] / lo['vms']:.0f}x): tick x{growth:.1f}; "
            f"ms per 100k VMs {lo['ms_per_100k_vms']:.1f} -> {hi['ms_per_100k_vms']:.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.tick", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="fleet sizes (VMs)")
    parser.add_argument("--vms-per-cluster", type=int, default=100, help="VMs per Azure Local instance")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=10_000, help="events per replication batch for apply")
    parser.add_argument("--apply-repeats", type=int, default=15)
    parser.add_argument("--no-apply", dest="apply_all", action="store_false", help="skip the apply benchmark")
    parser.add_argument("--no-seen-steady", dest="seen_all", action="store_false",
                        help="skip apply with a steady-state dedupe table")
    parser.add_argument("--profile", action="store_true", help="break the tick down at the largest size")
    parser.add_argument("--profile-repeats", type=int, default=5)
    parser.add_argument("--seen", action="store_true",
                        help="only time drop_seen at the steady-state dedupe table of the largest size, "
                        "against the string anti-join it replaced")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--apply", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seen-steady", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(run_size(args)))
        return
    if args.seen:
        window_ms = int(EngineSettings().dedupe_window_s * 1000)
        # The fleet's event rate at its replication mix, as in run_size.
        ids = int(max(args.sizes) * (0.4 / 30 + 0.4 / 300 + 0.2 / 900) * window_ms / 1000)
        log(f"timing drop_seen against {ids:,} remembered ids")
        result = time_seen(ids, args.batch, args.apply_repeats, NOW0_MS, window_ms)
        print(f"# bench.tick --seen  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {machine_line()}")
        print_seen(result)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "seen": result}, indent=2))
        return

    rows = []
    largest = max(args.sizes)
    for size in args.sizes:
        cmd = [
            sys.executable, "-m", "bench.tick", "--worker", str(size),
            "--vms-per-cluster", str(args.vms_per_cluster), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--batch", str(args.batch),
            "--apply-repeats", str(args.apply_repeats), "--profile-repeats", str(args.profile_repeats),
        ]
        if size == largest:
            cmd += ["--apply"] if args.apply_all else []
            cmd += ["--seen-steady"] if args.apply_all and args.seen_all else []
            cmd += ["--profile"] if args.profile else []
        done = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, cwd=Path(__file__).resolve().parent.parent)
        rows.append(json.loads(done.stdout))
    print_report(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
