"""Prometheus metrics (contracts.md §3) built from the current snapshot on every scrape.

A custom collector rather than labelled Gauges: each scrape reads one immutable `Snapshot` and
builds fresh families from it, so concurrent scrapes never see half an update, and a VM, node
or link that left the state tables vanishes from the next scrape (Prometheus then stale-marks
it) instead of being exported forever with its last value.

A family whose view column does not exist (yet) is simply not exported: the rule engine's views
grow columns over time (e.g. `missed_cycles_ratio`), and an older or newer engine must never
make a scrape fail.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporters.exposition import VALUE, FrameGauge
from exporters.snapshot import SelfStats, Snapshot, SnapshotHolder
from rules import lifecycle
from rules.engine import TickResult, empty_result
from rules.views import ENTITIES

logger = logging.getLogger(__name__)

PerVm = Literal["all", "violating", "none"]
HEALTH_STATES = ("normal", "warning", "critical")

REPLICATION_LABELS = ENTITIES["vm_replication"].labels  # vm, hci_cluster, target, technology
BACKUP_LABELS = ENTITIES["vm_backup"].labels  # vm, hci_cluster
NODE_LABELS = ENTITIES["node"].labels  # hci_cluster, node
LINK_LABELS = ENTITIES["link"].labels  # hci_cluster, target
CLUSTER_LABELS = ENTITIES["cluster"].labels  # hci_cluster
STORAGE_PATH_LABELS = ENTITIES["storage_path"].labels  # hci_cluster, storage_path

# (metric name, view column, HELP): plain gauges, one sample per row with a non-null value.
_REPLICATION_GAUGES = (
    (
        "rpowatch_replication_last_recovery_point_timestamp_seconds",
        "last_recovery_point_seconds",
        "Unix time of the newest point in time the replica can be recovered to.",
    ),
    (
        "rpowatch_replication_lag_seconds",
        "lag_seconds",
        "Seconds between now (at scrape time) and the newest recoverable point on the replica.",
    ),
    (
        "rpowatch_replication_rpo_target_seconds",
        "rpo_target_seconds",
        "Recovery point objective the VM's policy sets for replication, in seconds.",
    ),
    (
        "rpowatch_replication_pending_bytes",
        "pending_bytes",
        "Tracked changes not yet sent to the replica (replication log backlog), in bytes.",
    ),
    (
        "rpowatch_replication_missed_cycles_ratio",
        "missed_cycles_ratio",
        "Missed replication cycles divided by expected cycles in the monitoring window.",
    ),
    (
        "rpowatch_replication_time_to_breach_seconds",
        "time_to_breach_seconds",
        "Predicted seconds until replication lag exceeds the RPO; +Inf when not trending there.",
    ),
)
_FAILOVER_TEST = (
    "rpowatch_failover_test_last_success_timestamp_seconds",
    "last_failover_test_seconds",
    "Unix time of the VM's last successful test failover.",
)
_BACKUP_GAUGES = (
    (
        "rpowatch_backup_last_success_timestamp_seconds",
        "last_success_seconds",
        "Unix time of the VM's newest successful backup recovery point.",
    ),
    (
        "rpowatch_backup_rpo_target_seconds",
        "backup_rpo_target_seconds",
        "Recovery point objective the VM's policy sets for backups, in seconds.",
    ),
    (
        "rpowatch_restore_test_last_success_timestamp_seconds",
        "last_restore_test_seconds",
        "Unix time of the VM's last successful restore test.",
    ),
)
_CLUSTER_GAUGES = (
    (
        "rpowatch_cluster_iops_headroom_ratio",
        "iops_headroom_ratio",
        "Storage IOPS headroom of the instance's up nodes: 1 - used / capacity.",
    ),
    (
        "rpowatch_cluster_failover_capacity_ratio",
        "failover_capacity_ratio",
        "Free memory of the other up nodes divided by the memory the busiest node runs; >= 1 means N+1 holds.",
    ),
)
_LINK_GAUGES = (
    (
        "rpowatch_link_bandwidth_saturation_ratio",
        "saturation_ratio",
        "Replication throughput the link's VMs need divided by the link's capacity.",
    ),
)
# Beyond contracts.md §3: what nodes report per storage path (volume) in heartbeats.
_STORAGE_PATH_GAUGES = (
    (
        "rpowatch_storage_path_free_ratio",
        "free_ratio",
        "Free space of the storage path divided by its capacity, as a node last reported it.",
    ),
    (
        "rpowatch_storage_path_iops_headroom_ratio",
        "iops_headroom_ratio",
        "IOPS headroom of the storage path: 1 - used / capacity, as a node last reported it.",
    ),
    ("rpowatch_storage_path_online", "online", "1 while a node reports the storage path online, else 0."),
    ("rpowatch_storage_path_vms", "vms", "Replicated VMs whose virtual disks are on the storage path."),
)
_NODE_GAUGES = (
    (
        "rpowatch_node_up",
        "up",
        "1 while the node's heartbeats arrive within the timeout and its state is up, else 0.",
    ),
    (
        "rpowatch_node_last_heartbeat_timestamp_seconds",
        "last_heartbeat_seconds",
        "Unix time of the node's newest heartbeat.",
    ),
)

# Beyond contracts.md §3: per-instance counts of VMs, exported whatever `export.per_vm` says, so
# that fleet-wide compliance (dashboards, recording rules) stays right when per-VM series are
# limited to the violating VMs or dropped, as they must be for very large fleets.
RPO_STANDINGS = ("within", "over", "unknown")
_REPLICATION_VMS = (
    "rpowatch_cluster_replication_vms",
    "Replicated VMs of the instance whose lag at scrape time is within or over their RPO, or whose RPO is unknown.",
)
_REPLICATION_HEALTH_VMS = (
    "rpowatch_cluster_replication_health_vms",
    "Replicated VMs of the instance per replication health state (normal, warning, critical).",
)
_BACKUP_VMS = (
    "rpowatch_cluster_backup_vms",
    "Backed-up VMs of the instance whose newest successful backup (without one, since first seen) at scrape "
    "time is within or over their backup RPO, or whose backup RPO is unknown.",
)
_TEST_OVERDUE_VMS = (
    (
        "rpowatch_cluster_failover_test_overdue_vms",
        "failover_test_age_seconds",
        "failover_test_max_age_seconds",
        "Replicated VMs of the instance whose last test failover is older than their policy allows.",
    ),
    (
        "rpowatch_cluster_restore_test_overdue_vms",
        "restore_test_age_seconds",
        "restore_test_max_age_seconds",
        "Backed-up VMs of the instance whose last restore test is older than their policy allows.",
    ),
)

OMITTED_WARNING_EVERY_S = 3600.0

# 1 ms .. 1 s is the expected range of one tick; 2.5 s shows ticks that overran a typical
# evaluation interval instead of hiding them in +Inf.
EVALUATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def make_evaluation_histogram(registry: CollectorRegistry) -> Histogram:
    """`rpowatch_evaluation_duration_seconds`, registered in `registry`. The evaluation loop
    observes `TickResult.duration_s` into it; it is direct instrumentation, not part of the
    snapshot, because a histogram accumulates across ticks."""
    return Histogram(
        "rpowatch_evaluation_duration_seconds",
        "Seconds one rule-evaluation tick over the whole fleet took.",
        buckets=EVALUATION_BUCKETS,
        registry=registry,
    )


def make_prepare_histogram(registry: CollectorRegistry) -> Histogram:
    """`rpowatch_evaluation_prepare_duration_seconds` (beyond contracts.md §3), registered in
    `registry`: the work done after each tick for the next (Engine.prepare: at a million VMs
    most of the per-VM evaluation). It runs in the idle time of the interval, so a tick that
    is fast only because of it shows here."""
    return Histogram(
        "rpowatch_evaluation_prepare_duration_seconds",
        "Seconds the preparation of the next evaluation tick took, after each tick.",
        buckets=EVALUATION_BUCKETS,
        registry=registry,
    )


def build_version() -> str:
    try:
        return importlib.metadata.version("rpowatch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _label_exprs(labels: Sequence[str], **fixed: str) -> list[pl.Expr]:
    """Label columns as text (a null value becomes "" rather than "None"), plus `fixed` ones."""
    return [pl.col(c).cast(pl.String).fill_null("").alias(c) for c in labels] + [
        pl.lit(v).alias(k) for k, v in fixed.items()
    ]


def _gauges(
    frame: pl.DataFrame, labels: Sequence[str], specs: Iterable[tuple[str, str, str]]
) -> Iterator[GaugeMetricFamily]:
    """One gauge family per spec over `frame`, skipping null and NaN values (an unknown value
    is absent, not zero). A spec whose column the frame lacks yields no family. The samples
    stay a frame (a 100k-VM fleet has ~1M of them), written out by polars at exposition."""
    for name, column, doc in specs:
        if column not in frame.columns:
            continue
        value = pl.col(VALUE)
        rows = frame.select(*_label_exprs(labels), pl.col(column).cast(pl.Float64).alias(VALUE))
        yield FrameGauge(name, doc, labels, rows.filter(value.is_not_null() & ~value.is_nan()))


class RpowatchCollector(Collector):
    """Every per-entity, alert and self metric of contracts.md §3 except the evaluation
    histogram (see `make_evaluation_histogram`).

    `export_per_vm` limits per-VM series for very large fleets: "violating" keeps VMs whose
    replication health is not normal or whose backup is older than its RPO, "none" drops
    per-VM families; cluster, link, node, count, alert and self metrics are always exported.
    `export_max_vms` caps the VMs per-VM families describe (replicas and backups each), the
    furthest past their RPO first; `rpowatch_export_omitted_vms` says how many were left out.
    `clock` (Unix seconds) is the scrape-time "now" for lag; tests inject it.
    `known_alerts` ((alertname, severity) of every rule) and `alertmanager_urls` pre-initialise
    `rpowatch_alerts` and the notification counters at 0, so they exist (and rates and ratios
    over them work) before the first alert fires or is sent.
    """

    def __init__(
        self,
        holder: SnapshotHolder,
        export_per_vm: PerVm = "all",
        clock: Callable[[], float] = time.time,
        known_alerts: Iterable[tuple[str, str]] = (),
        alertmanager_urls: Iterable[str] = (),
        export_max_vms: int | None = None,
    ) -> None:
        if export_per_vm not in ("all", "violating", "none"):
            raise ValueError(f"export_per_vm must be all, violating or none, not {export_per_vm!r}")
        if export_max_vms is not None and export_max_vms < 1:
            raise ValueError(f"export_max_vms must be at least 1, not {export_max_vms}")
        self._holder = holder
        self._per_vm = export_per_vm
        self._max_vms = export_max_vms
        self._warned_at: float | None = None  # time.monotonic() of the last warning about the cap
        self._clock = clock
        # (alertname, severity) of every rule: exported as 0 when nothing fires, so a count that
        # drops to zero reads 0 rather than disappearing.
        self._known_alerts = tuple(known_alerts)
        self._alertmanager_urls = tuple(alertmanager_urls)
        self._version = build_version()

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry can reject a clashing registration without the cost of
        # a full collect().
        return list(self._collect(Snapshot(empty_result())))

    def collect(self) -> Iterable[Metric]:
        snapshot = self._holder.get()  # once: the whole scrape comes from one instant
        started = time.perf_counter()
        families = list(self._collect(snapshot))
        logger.debug("collected %d families in %.3f s", len(families), time.perf_counter() - started)
        return families

    def _collect(self, snapshot: Snapshot) -> Iterator[Metric]:
        views = snapshot.result.views
        now_s = self._clock()
        replication = _at_scrape_time(views.vm_replication, now_s, views.now_ms)
        backup = _backup_at_scrape_time(views.vm_backup, now_s, views.now_ms)
        omitted = {"replication": 0, "backup": 0}
        if self._per_vm != "none":
            yield from self._replication(replication, omitted)
            yield from self._backup(backup, omitted)
        self._warn_omitted(omitted)
        yield _omitted(omitted)
        yield from _vm_counts(replication, backup)
        yield from _gauges(views.cluster, CLUSTER_LABELS, _CLUSTER_GAUGES)
        yield from _gauges(views.link, LINK_LABELS, _LINK_GAUGES)
        yield from _gauges(views.node, NODE_LABELS, _NODE_GAUGES)
        yield from _gauges(views.storage_path, STORAGE_PATH_LABELS, _STORAGE_PATH_GAUGES)
        yield self._alerts(snapshot.result)
        yield from self._self_metrics(snapshot.self_stats)

    def _replication(self, frame: pl.DataFrame, omitted: dict[str, int]) -> Iterator[Metric]:
        """Per-VM replication families from the view as of scrape time (`_at_scrape_time`)."""
        if self._per_vm == "violating" and "health_state" in frame.columns:
            frame = frame.filter(pl.col("health_state") != "normal")
        frame = self._worst(frame, "lag_seconds", "rpo_target_seconds", omitted, "replication")
        yield from _gauges(frame, REPLICATION_LABELS, _REPLICATION_GAUGES)
        yield from _gauges(frame, BACKUP_LABELS, (_FAILOVER_TEST,))
        if "health_state" in frame.columns:
            yield self._health(frame)

    def _health(self, frame: pl.DataFrame) -> GaugeMetricFamily:
        health = pl.col("health_state")
        rows = pl.concat(
            frame.select(
                *_label_exprs(REPLICATION_LABELS, state=state),
                (health == state).fill_null(False).cast(pl.Float64).alias(VALUE),
            )
            for state in HEALTH_STATES
        )
        return FrameGauge(
            "rpowatch_replication_health",
            "Replication health of the VM: 1 for the current state (normal, warning, critical), 0 for the others.",
            [*REPLICATION_LABELS, "state"],
            rows,
        )

    def _backup(self, frame: pl.DataFrame, omitted: dict[str, int]) -> Iterator[Metric]:
        if self._per_vm == "violating" and {"backup_age_seconds", "backup_rpo_target_seconds"} <= set(frame.columns):
            frame = frame.filter(
                (pl.col("backup_age_seconds") > pl.col("backup_rpo_target_seconds")).fill_null(False)
            )
        frame = self._worst(frame, "backup_age_seconds", "backup_rpo_target_seconds", omitted, "backup")
        yield from _gauges(frame, BACKUP_LABELS, _BACKUP_GAUGES)

    def _warn_omitted(self, omitted: dict[str, int]) -> None:
        """A warning when the cap first leaves VMs out, and then at most once an hour."""
        if not any(omitted.values()):
            return
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < OMITTED_WARNING_EVERY_S:
            return
        self._warned_at = now
        logger.warning(
            "per-VM series of %d replicated and %d backed-up VMs left out of the scrape to stay within "
            "export.max_vms=%d (the VMs furthest past their RPO are kept; counts per instance cover all)",
            omitted["replication"], omitted["backup"], self._max_vms,
        )

    def _worst(self, frame: pl.DataFrame, age: str, target: str, omitted: dict[str, int], view: str) -> pl.DataFrame:
        """`frame`, or its `export_max_vms` rows furthest past their target (`age` ÷ `target`,
        unknown last) when it has more; how many were left out goes to `omitted[view]`."""
        if self._max_vms is None or frame.height <= self._max_vms:
            return frame
        omitted[view] = frame.height - self._max_vms
        if not {age, target} <= set(frame.columns):
            return frame.head(self._max_vms)
        share = (pl.col(age).cast(pl.Float64) / pl.col(target).cast(pl.Float64)).fill_nan(None)
        return frame.top_k(self._max_vms, by=share.fill_null(float("-inf")))

    def _alerts(self, result: TickResult) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "rpowatch_alerts",
            "Number of alerts firing now, by alert name and severity.",
            labels=["alertname", "severity"],
        )
        counts = {key: 0 for key in self._known_alerts}
        # Alerts still in the table (pending, resolved) read 0 rather than vanishing.
        for key in result.alerts.select("alertname", "severity").unique().iter_rows():
            counts.setdefault(key, 0)
        firing = result.alerts.filter(pl.col("state") == lifecycle.FIRING).group_by("alertname", "severity").len()
        for alertname, severity, n in firing.iter_rows():
            counts[(alertname, severity)] = n
        for (alertname, severity), n in sorted(counts.items()):
            family.add_metric([alertname, severity], n)
        return family

    def _self_metrics(self, stats: SelfStats) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "rpowatch_events_total", "Records accepted, by stream and source.", labels=["stream", "source"]
        )
        for (stream, source), n in sorted(stats.events_total.items()):
            events.add_metric([stream, source], n)
        yield events
        invalid = CounterMetricFamily(
            "rpowatch_events_invalid_total",
            "Records rejected and sent to dead letters, by stream and reason.",
            labels=["stream", "reason"],
        )
        for (stream, reason), n in sorted(stats.events_invalid_total.items()):
            invalid.add_metric([stream, reason], n)
        yield invalid
        up = GaugeMetricFamily(
            "rpowatch_source_up", "1 while the source's Kafka or MQTT connection is healthy, else 0.", labels=["source"]
        )
        for source, healthy in sorted(stats.source_up.items()):
            up.add_metric([source], 1.0 if healthy else 0.0)
        yield up
        last = GaugeMetricFamily(
            "rpowatch_source_last_event_timestamp_seconds",
            "Unix time the source last delivered a record (progress watchdog).",
            labels=["source"],
        )
        for source, seconds in sorted(stats.source_last_event_seconds.items()):
            last.add_metric([source], seconds)
        yield last
        sent = CounterMetricFamily(
            "rpowatch_alertmanager_notifications_total",
            "Alerts posted to the Alertmanager, successfully or not.",
            labels=["url"],
        )
        urls = self._alertmanager_urls
        for url, n in sorted(_with_zeros(stats.alertmanager_notifications_total, urls).items()):
            sent.add_metric([url], n)
        yield sent
        failed = CounterMetricFamily(
            "rpowatch_alertmanager_notifications_failed_total",
            "Alerts whose post to the Alertmanager failed (connection error, timeout or non-2xx).",
            labels=["url"],
        )
        for url, n in sorted(_with_zeros(stats.alertmanager_notifications_failed_total, urls).items()):
            failed.add_metric([url], n)
        yield failed
        info = GaugeMetricFamily(
            "rpowatch_build_info", "Always 1; the version label says which rpowatch runs.", labels=["version"]
        )
        info.add_metric([self._version], 1.0)
        yield info


def _with_zeros(counts: dict[str, int], keys: Iterable[str]) -> dict[str, int]:
    """`counts` plus 0 for every key it lacks."""
    return {**{key: 0 for key in keys}, **counts}


def _at_scrape_time(frame: pl.DataFrame, now_s: float, view_ms: int) -> pl.DataFrame:
    """The replication view with what moves between ticks moved to scrape time (contracts.md
    §3 computes lag at scrape time): lag from the recovery point (without one, the view's lag
    since first seen, advanced by the time since the tick), the predicted breach closer by that
    time, the failover test older by it."""
    columns = set(frame.columns)
    elapsed = now_s - view_ms / 1000.0
    moving: list[pl.Expr] = []
    if {"last_recovery_point_seconds", "lag_seconds"} <= columns:
        last_rp = pl.col("last_recovery_point_seconds")
        moving.append(
            pl.when(last_rp.is_not_null())
            .then(pl.lit(now_s) - last_rp)
            .otherwise(pl.col("lag_seconds") + elapsed)
            .alias("lag_seconds")
        )
    if "time_to_breach_seconds" in columns:
        ttb = pl.col("time_to_breach_seconds")
        moving.append(
            pl.when(ttb.is_infinite())
            .then(ttb)
            .otherwise(pl.max_horizontal(ttb - elapsed, pl.lit(0.0)))
            .alias("time_to_breach_seconds")
        )
    if "failover_test_age_seconds" in columns:
        moving.append(pl.col("failover_test_age_seconds") + elapsed)
    return frame.with_columns(moving) if moving else frame


def _backup_at_scrape_time(frame: pl.DataFrame, now_s: float, view_ms: int) -> pl.DataFrame:
    """The backup view with its ages advanced from the tick to scrape time."""
    elapsed = now_s - view_ms / 1000.0
    ages = [c for c in ("backup_age_seconds", "restore_test_age_seconds") if c in frame.columns]
    return frame.with_columns(pl.col(c) + elapsed for c in ages) if ages else frame


def _standing(value: str, target: str) -> pl.Expr:
    """`within`, `over` or `unknown` (no target or no value) for each row."""
    v, t = pl.col(value).cast(pl.Float64), pl.col(target).cast(pl.Float64)
    return (
        pl.when(t.is_null() | t.is_nan() | v.is_null() | v.is_nan())
        .then(pl.lit("unknown"))
        .when(v <= t)
        .then(pl.lit("within"))
        .otherwise(pl.lit("over"))
    )


@dataclass(frozen=True)
class _Count:
    """A family of per-instance counts: per value of `label` (none: one count), the rows where
    its condition holds."""

    spec: tuple[str, str]  # name, HELP
    label: str | None
    conditions: dict[str, pl.Expr]


def _count_families(frame: pl.DataFrame, counts: list[_Count]) -> Iterator[FrameGauge]:
    """Every count of `counts` per instance of `frame`, in one group-by (each is a pass over a
    million VMs' instance names at fleet scale). Every value of a label is exported for every
    instance, 0 included: a ratio over them must not lose an instance whose VMs are all on one
    side."""
    if not counts:
        return
    columns = {(i, value): f"__{i}_{j}" for i, c in enumerate(counts) for j, value in enumerate(c.conditions)}
    per_instance = frame.group_by(pl.col("hci_cluster").cast(pl.String).fill_null("")).agg(
        condition.fill_null(False).sum().cast(pl.Float64).alias(columns[(i, value)])
        for i, c in enumerate(counts)
        for value, condition in c.conditions.items()
    )
    for i, c in enumerate(counts):
        name, doc = c.spec
        if c.label is None:
            (column,) = (columns[(i, value)] for value in c.conditions)
            rows = per_instance.select("hci_cluster", pl.col(column).alias(VALUE))
            yield FrameGauge(name, doc, ["hci_cluster"], rows.sort("hci_cluster"))
            continue
        wide = per_instance.select("hci_cluster", *[pl.col(columns[(i, v)]).alias(v) for v in c.conditions])
        rows = wide.unpivot(index="hci_cluster", variable_name=c.label, value_name=VALUE)
        yield FrameGauge(name, doc, ["hci_cluster", c.label], rows.sort("hci_cluster", c.label))


def _vm_counts(replication: pl.DataFrame, backup: pl.DataFrame) -> Iterator[Metric]:
    """Per-instance counts of VMs by RPO standing, health and overdue tests, at scrape time."""
    of_replication: list[_Count] = []
    of_backup: list[_Count] = []
    if {"hci_cluster", "lag_seconds", "rpo_target_seconds"} <= set(replication.columns):
        standing = _standing("lag_seconds", "rpo_target_seconds")
        of_replication.append(_Count(_REPLICATION_VMS, "rpo", {s: standing == s for s in RPO_STANDINGS}))
    if {"hci_cluster", "health_state"} <= set(replication.columns):
        health = pl.col("health_state")
        of_replication.append(_Count(_REPLICATION_HEALTH_VMS, "state", {s: health == s for s in HEALTH_STATES}))
    if {"hci_cluster", "backup_age_seconds", "backup_rpo_target_seconds"} <= set(backup.columns):
        # backup_age_seconds counts from first seen when no backup ever succeeded: such a VM is
        # over its RPO only once that is longer than the RPO, as the BackupRPOBreach rule says.
        standing = _standing("backup_age_seconds", "backup_rpo_target_seconds")
        of_backup.append(_Count(_BACKUP_VMS, "rpo", {s: standing == s for s in RPO_STANDINGS}))
    for (name, age, max_age, doc), counts, frame in zip(
        _TEST_OVERDUE_VMS, (of_replication, of_backup), (replication, backup)
    ):
        if {"hci_cluster", age, max_age} <= set(frame.columns):
            counts.append(_Count((name, doc), None, {"overdue": pl.col(age) > pl.col(max_age)}))
    yield from _count_families(replication, of_replication)
    yield from _count_families(backup, of_backup)


def _omitted(omitted: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "rpowatch_export_omitted_vms",
        "VMs whose per-VM series this scrape left out to stay within export.max_vms, by view.",
        labels=["view"],
    )
    for view, count in sorted(omitted.items()):
        family.add_metric([view], count)
    return family
