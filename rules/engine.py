"""The rule engine: applies decoded batches to the entity tables and evaluates every rule on a
tick. Pure and synchronous: the clock is an argument, nothing here does I/O.

`apply` and `tick` may be called from any thread but not concurrently; a lock makes that safe.
Both replace whole immutable tables, so a `TickResult` handed to a scrape or a sender never
changes under it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import polars as pl

from ingest.contracts import Stream
from rules import lifecycle, state
from rules.pack import CompiledRule, RulePack
from rules.policy import DEFAULT_POLICY, Policy
from rules.views import ENTITIES, ViewParams, Views, build_views, empty_views

LABEL_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class EngineSettings:
    heartbeat_timeout_s: float = 30.0
    dedupe_window_s: float = 600.0
    resolved_retention_s: float = 900.0
    at_risk_ratio: float = 0.8
    lookahead_s: float = 300.0
    monitoring_window_s: float = 3600.0
    rolling_window_s: float = 300.0
    ingest_stall_s: float = 60.0
    policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
    link_capacity_bytes_per_s: tuple[tuple[str, str, float], ...] = ()
    static_labels: tuple[tuple[str, str], ...] = (("service", "rpowatch"),)
    # Annotations of a standing alert are re-rendered this often (and whenever it fires), not
    # at every tick: at fleet scale there can be hundreds of thousands of standing alerts.
    annotation_refresh_s: float = 30.0


@dataclass(frozen=True)
class TickResult:
    views: Views
    alerts: pl.DataFrame  # lifecycle.ALERT_SCHEMA: pending, firing and recently resolved
    transitions: pl.DataFrame  # TRANSITION_SCHEMA plus labels and annotations: changes of this tick
    details: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=lifecycle.DETAIL_SCHEMA))
    duration_s: float = 0.0

    @property
    def now_ms(self) -> int:
        return self.views.now_ms

    def firing(self) -> pl.DataFrame:
        return self.alerts.filter(pl.col("state") == lifecycle.FIRING)

    def with_details(self, alerts: pl.DataFrame) -> pl.DataFrame:
        """`alerts` (rows of `self.alerts`) with their `labels` and `annotations` JSON. Join
        only the rows you need: at fleet scale there can be many standing alerts."""
        return alerts.join(
            self.details.select("alertname", "alert_key", "labels", "annotations"),
            on=["alertname", "alert_key"],
            how="left",
        )


def empty_result() -> TickResult:
    transitions = pl.DataFrame(schema=lifecycle.TRANSITION_SCHEMA).with_columns(
        pl.lit(None, dtype=pl.String).alias("labels"), pl.lit(None, dtype=pl.String).alias("annotations")
    )
    return TickResult(views=empty_views(), alerts=lifecycle.empty_alerts(), transitions=transitions)


@dataclass
class Engine:
    pack: RulePack
    settings: EngineSettings = field(default_factory=EngineSettings)
    fleet: state.FleetState = field(default_factory=state.FleetState)
    alerts: pl.DataFrame = field(default_factory=lifecycle.empty_alerts)
    details: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=lifecycle.DETAIL_SCHEMA))
    held: frozenset[str] = frozenset()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._timing = pl.DataFrame(
            {
                "alertname": [r.name for r in self.pack.rules],
                "for_ms": [int(r.spec.for_seconds * 1000) for r in self.pack.rules],
                "keep_firing_for_ms": [int(r.spec.keep_firing_for_seconds * 1000) for r in self.pack.rules],
            },
            schema={"alertname": pl.String, "for_ms": pl.Int64, "keep_firing_for_ms": pl.Int64},
        )
        s = self.settings
        self._params = ViewParams(
            heartbeat_timeout_s=s.heartbeat_timeout_s,
            at_risk_ratio=s.at_risk_ratio,
            lookahead_s=s.lookahead_s,
            monitoring_window_s=s.monitoring_window_s,
            ingest_stall_s=s.ingest_stall_s,
            link_capacity_bytes_per_s=s.link_capacity_bytes_per_s,
        )
        self._window = state.WindowCounters(int(s.monitoring_window_s * 1000))

    def apply(self, stream: Stream, events: pl.DataFrame, now_ms: int, source: str = "") -> int:
        """Apply a batch of valid events of one stream that arrived through `source`. Returns
        how many were new (not duplicates of an `event_id` seen within the dedupe window)."""
        if events.is_empty():
            return 0
        with self._lock:
            fleet, fresh = state.drop_seen(
                self.fleet, stream.value, events, now_ms, int(self.settings.dedupe_window_s * 1000)
            )
            policies = self.settings.policies
            if stream is Stream.REPLICATION:
                fleet = replace(
                    fleet, replication=state.apply_replication(fleet.replication, fresh, policies, self._window)
                )
            elif stream is Stream.BACKUP:
                fleet = replace(fleet, backup=state.apply_backup(fleet.backup, fresh, policies))
            else:
                fleet = replace(
                    fleet,
                    nodes=state.apply_heartbeats(fleet.nodes, fresh, source, self.settings.rolling_window_s),
                    clusters=state.apply_clock_skew(fleet.clusters, fresh),
                )
            self.fleet = fleet
            return fresh.height

    def drop_clusters(self, cluster_ids: Collection[str]) -> None:
        """Forget everything about these Azure Local instances: their entities vanish from the
        next views (and so from /metrics) and their alerts are dropped without a resolve,
        because another owner takes them over (a Kafka rebalance moved their partition)."""
        if not cluster_ids:
            return
        ids = list(cluster_ids)
        with self._lock:
            self.fleet = state.drop_clusters(self.fleet, ids)
            self.alerts = self.alerts.filter(~pl.col("hci_cluster").is_in(ids).fill_null(False))
            self.held = self.held - frozenset(ids)

    def hold(self, cluster_ids: Collection[str]) -> None:
        """Freeze the alerts of these instances (nothing fires or resolves) while their state is
        being rebuilt, so a hand-over neither invents nor loses an alert."""
        with self._lock:
            self.held = self.held | frozenset(cluster_ids)

    def release(self, cluster_ids: Collection[str]) -> None:
        with self._lock:
            self.held = self.held - frozenset(cluster_ids)

    def tick(self, now_ms: int, sources: pl.DataFrame | None = None) -> TickResult:
        """Evaluate every rule over the whole fleet at `now_ms`. `sources` (SOURCES_SCHEMA)
        describes the ingest sources for the source-health rules."""
        started = time.perf_counter()
        with self._lock:
            views = build_views(self.fleet, now_ms, self._params, sources)
            matched = {rule.name: self._matches(rule, views) for rule in self.pack.rules}
            active = pl.concat(
                [
                    frame.select(
                        pl.lit(rule.name).alias("alertname"),
                        "alert_key",
                        "__alert_cluster",
                        pl.lit(rule.spec.severity).alias("severity"),
                        pl.lit(int(rule.spec.for_seconds * 1000), dtype=pl.Int64).alias("for_ms"),
                        pl.lit(int(rule.spec.keep_firing_for_seconds * 1000), dtype=pl.Int64).alias("keep_firing_for_ms"),
                    ).rename({"__alert_cluster": "hci_cluster"})
                    for rule in self.pack.rules
                    for frame in (matched[rule.name],)
                ]
                or [pl.DataFrame(schema=lifecycle.ACTIVE_SCHEMA)]
            )
            alerts = self.alerts
            if self.held:
                is_held = pl.col("hci_cluster").is_in(list(self.held)).fill_null(False)
                frozen = alerts.filter(is_held)
                alerts = alerts.filter(~is_held)
                active = active.filter(~is_held)
            advanced, transitions = lifecycle.advance(
                alerts, active, now_ms, self._timing, int(self.settings.resolved_retention_s * 1000)
            )
            self.alerts = pl.concat([advanced, frozen]) if self.held else advanced
            self.details = self._render(matched, advanced, now_ms)
            transitions = transitions.join(
                self.details.select("alertname", "alert_key", "labels", "annotations"),
                on=["alertname", "alert_key"],
                how="left",
            )
            alerts, details = self.alerts, self.details
        return TickResult(views, alerts, transitions, details, time.perf_counter() - started)

    def _matches(self, rule: CompiledRule, views: Views) -> pl.DataFrame:
        """The rows of the rule's entity view where its condition holds, with the alert key."""
        label_cols = ENTITIES[rule.spec.entity].labels
        key = pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in label_cols], separator=LABEL_SEPARATOR)
        cluster = pl.col("hci_cluster") if "hci_cluster" in label_cols else pl.lit(None, dtype=pl.String)
        return (
            views.of(rule.spec.entity)
            .lazy()
            .filter(rule.condition.fill_null(False))
            .with_columns(key.alias("alert_key"), cluster.alias("__alert_cluster"))
            .collect()
        )

    def _render(self, matched: dict[str, pl.DataFrame], alerts: pl.DataFrame, now_ms: int) -> pl.DataFrame:
        """Labels and annotations for the alerts that need them: new ones, ones that fired
        at this tick, and standing ones whose annotations are older than the refresh period."""
        refresh_ms = int(self.settings.annotation_refresh_s * 1000)
        keys = ["alertname", "alert_key"]
        previous = self.details
        due = (
            alerts.filter(pl.col("state") != lifecycle.RESOLVED)
            .join(previous.select(*keys, "annotated_at_ms"), on=keys, how="left")
            .filter(
                pl.col("annotated_at_ms").is_null()
                | (pl.col("annotated_at_ms") <= now_ms - refresh_ms)
                | (pl.col("fired_at_ms") == now_ms)
            )
            .select(keys)
        )
        rendered = [
            self._details(rule, matched[rule.name].join(rule_due, on="alert_key", how="semi"), now_ms)
            for rule in self.pack.rules
            for rule_due in (due.filter(pl.col("alertname") == rule.name),)
            if not rule_due.is_empty()
        ]
        details = previous
        if rendered:
            fresh = pl.concat(rendered)
            details = pl.concat([previous.join(fresh, on=keys, how="anti"), fresh])
        # Forget details of alerts the lifecycle has forgotten, once they are a noticeable share.
        if details.height > alerts.height * 1.25 + 100:
            details = details.join(alerts.select(keys), on=keys, how="semi")
        return details

    def _details(self, rule: CompiledRule, rows: pl.DataFrame, now_ms: int) -> pl.DataFrame:
        spec = rule.spec
        label_cols = ENTITIES[spec.entity].labels
        static = {**dict(self.settings.static_labels), **spec.labels}
        labels = pl.struct(
            pl.lit(spec.alert).alias("alertname"),
            pl.lit(spec.severity).alias("severity"),
            *[pl.lit(v).alias(k) for k, v in static.items()],
            *[pl.col(c).cast(pl.String).fill_null("").alias(c) for c in label_cols],
        )
        return rows.select(
            pl.lit(spec.alert).alias("alertname"),
            "alert_key",
            labels.struct.json_encode().alias("labels"),
            pl.struct([expr.alias(key) for key, expr in rule.annotations.items()]).struct.json_encode().alias("annotations"),
            pl.lit(now_ms, dtype=pl.Int64).alias("annotated_at_ms"),
        )
