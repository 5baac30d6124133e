"""The alert lifecycle, vectorized over every alert of every rule.

    inactive ──condition true──▶ pending ──true for `for`──▶ firing
        ▲                           │                          │
        └──────condition false──────┘     condition false for `keep_firing_for`
                                                               ▼
                                          resolved (kept `resolved_retention` for re-sending)

This is Prometheus's alerting-rule semantics (rules/alerting.go): pending alerts are never
sent, firing ones carry the time they became active, and a resolved alert is remembered for a
while so that senders can repeat the resolve.
"""

from __future__ import annotations

import polars as pl

PENDING = "pending"
FIRING = "firing"
RESOLVED = "resolved"

# One row per alert (alertname + identity labels). Kept narrow on purpose: the lifecycle runs
# over every alert at every tick, so labels and annotations (JSON text) live in a side table
# the engine fills only when an alert needs them (see rules.engine).
ALERT_SCHEMA = pl.Schema(
    {
        "alertname": pl.String(),
        "alert_key": pl.String(),
        "hci_cluster": pl.String(),  # the instance the alert is about (null for fleet-wide ones)
        "severity": pl.String(),
        "state": pl.String(),
        "active_at_ms": pl.Int64(),
        "fired_at_ms": pl.Int64(),
        "last_true_ms": pl.Int64(),
        "resolved_at_ms": pl.Int64(),
    }
)

# What the rules found true at this tick: one row per (alertname, alert_key).
ACTIVE_SCHEMA = pl.Schema(
    {
        "alertname": pl.String(),
        "alert_key": pl.String(),
        "hci_cluster": pl.String(),
        "severity": pl.String(),
        "for_ms": pl.Int64(),
        "keep_firing_for_ms": pl.Int64(),
    }
)

TRANSITION_SCHEMA = pl.Schema(
    {
        "alertname": pl.String(),
        "alert_key": pl.String(),
        "hci_cluster": pl.String(),
        "severity": pl.String(),
        "transition": pl.String(),  # "fired" | "resolved"
        "at_ms": pl.Int64(),
    }
)

# Labels and annotations of an alert, as JSON objects; annotations carry the values of their
# last rendering (`annotated_at_ms`).
DETAIL_SCHEMA = pl.Schema(
    {
        "alertname": pl.String(),
        "alert_key": pl.String(),
        "labels": pl.String(),
        "annotations": pl.String(),
        "annotated_at_ms": pl.Int64(),
    }
)


def empty_alerts() -> pl.DataFrame:
    return pl.DataFrame(schema=ALERT_SCHEMA)


def advance(
    alerts: pl.DataFrame,
    active: pl.DataFrame,
    now_ms: int,
    rule_timing: pl.DataFrame,
    resolved_retention_ms: int,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One tick. `alerts` is the previous table (ALERT_SCHEMA), `active` what is true now
    (ACTIVE_SCHEMA), `rule_timing` has alertname, for_ms, keep_firing_for_ms for every rule
    (an inactive alert needs its rule's keep_firing_for). Returns the new table and the
    transitions (fired / resolved) of this tick."""
    now = pl.lit(now_ms, dtype=pl.Int64)
    joined = (
        alerts.join(active, on=["alertname", "alert_key"], how="full", coalesce=True, suffix="_now")
        .drop("for_ms", "keep_firing_for_ms")
        .join(rule_timing, on="alertname", how="left")
    )
    is_active = pl.col("severity_now").is_not_null()
    was = pl.col("state")
    # A resolved alert that becomes true again starts a new occurrence, like a fresh one.
    fresh = was.is_null() | (was == RESOLVED)
    for_ms = pl.col("for_ms").fill_null(0)
    keep_ms = pl.col("keep_firing_for_ms").fill_null(0)
    active_at = pl.when(is_active & fresh).then(now).otherwise(pl.col("active_at_ms"))
    last_true = pl.when(is_active).then(now).otherwise(pl.col("last_true_ms"))

    state = (
        pl.when(is_active)
        .then(
            pl.when(was == FIRING)
            .then(pl.lit(FIRING))
            .when(now - active_at >= for_ms)
            .then(pl.lit(FIRING))
            .otherwise(pl.lit(PENDING))
        )
        .when(was == PENDING)
        .then(pl.lit(None, dtype=pl.String))  # pending and false again: forgotten
        .when(was == FIRING)
        .then(pl.when(now - pl.col("last_true_ms") < keep_ms).then(pl.lit(FIRING)).otherwise(pl.lit(RESOLVED)))
        .when((was == RESOLVED) & (now - pl.col("resolved_at_ms") < resolved_retention_ms))
        .then(pl.lit(RESOLVED))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    stepped = joined.with_columns(
        state.alias("new_state"),
        active_at.alias("active_at_ms"),
        last_true.alias("last_true_ms"),
        pl.coalesce("severity_now", "severity").alias("severity"),
        pl.coalesce("hci_cluster_now", "hci_cluster").alias("hci_cluster"),
    ).with_columns(
        # Set when an occurrence starts firing; a pending occurrence has not fired (yet).
        pl.when((pl.col("new_state") == FIRING) & (was != FIRING).fill_null(True))
        .then(now)
        .when(pl.col("new_state") == PENDING)
        .then(pl.lit(None, dtype=pl.Int64))
        .otherwise(pl.col("fired_at_ms"))
        .alias("fired_at_ms"),
        pl.when((pl.col("new_state") == RESOLVED) & (was == FIRING))
        .then(now)
        .when(pl.col("new_state") == RESOLVED)
        .then(pl.col("resolved_at_ms"))
        .otherwise(pl.lit(None, dtype=pl.Int64))
        .alias("resolved_at_ms"),
    )
    became_firing = (pl.col("new_state") == FIRING) & (was != FIRING).fill_null(True)
    became_resolved = (pl.col("new_state") == RESOLVED) & (was == FIRING)
    transitions = stepped.filter(became_firing | became_resolved).select(
        "alertname",
        "alert_key",
        "hci_cluster",
        "severity",
        pl.when(became_firing).then(pl.lit("fired")).otherwise(pl.lit("resolved")).alias("transition"),
        now.alias("at_ms"),
    )
    table = (
        stepped.filter(pl.col("new_state").is_not_null())
        .with_columns(pl.col("new_state").alias("state"))
        .select(ALERT_SCHEMA.names())
    )
    return table, transitions
