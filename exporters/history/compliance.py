"""RPO compliance from the VM series: time within RPO, breaches, longest breach, time to recover.

Definitions (what the API, the CLI and docs/history.md promise):

- An interval is *observed* when the VM has a row for it, and *breached* when its
  `lag_max_seconds > rpo_target_seconds` (the ReplicationRPOBreach condition, at any tick of
  the interval). Time is counted in whole intervals: `observed_seconds`, `breached_seconds`.
- A *breach* is a run of breached intervals of one VM, each starting where the previous one
  ends. A missing interval (no data) ends a run.
- A breach has *recovered* when the VM has an observed, non-breached interval starting exactly
  where the breach ends. Mean time to recover is the mean duration of recovered breaches; a
  breach still open at the end of the window (or cut by missing data) is not in it.
- A VM belongs to the group (hci_cluster, service_group) of its newest interval in the window.

The work is split so that a month over 10,000 VMs does not read 432 million rows:
`summarize` turns rows into one *chunk* row per VM (VM_DAILY schema: totals and the chunk's
breaches). Compaction stores the chunk of each past day as a rollup; a query combines the
rollups of whole days inside its window with the chunk of the raw rows of everything else,
joining breaches that continue across chunk boundaries (`combine`).
"""

from __future__ import annotations

import polars as pl

from exporters.history.tables import VM_DAILY

GROUP_BY = ("vm", "hci_cluster", "service_group")
ATTRS = ("hci_cluster", "target", "technology", "service_group")

RESULT_SCHEMA = pl.Schema(
    {
        "vms": pl.Int64(),
        "observed_seconds": pl.Float64(),
        "breached_seconds": pl.Float64(),
        "within_rpo_ratio": pl.Float64(),
        "breaches": pl.Int64(),
        "recovered_breaches": pl.Int64(),
        "longest_breach_seconds": pl.Float64(),
        "mean_time_to_recover_seconds": pl.Float64(),
    }
)


def summarize(rows: pl.LazyFrame) -> pl.LazyFrame:
    """One chunk row per VM (VM_DAILY schema) from VM rows that are already one per key, in any
    order.

    Nothing sorts the rows: a day at 10,000 VMs and 1-minute resolution is 14.4 million rows,
    and sorting them by VM costs seconds. Totals are one group-by; breaches come from the
    breached rows only (few), sorted among themselves; whether each breach recovered is a
    lookup of the interval after it."""
    ts, end, vm, interval = pl.col("ts_ms"), pl.col("end_ms"), pl.col("vm"), pl.col("interval_ms")
    breached = (pl.col("lag_max_seconds") > pl.col("rpo_target_seconds")).fill_null(False)
    base = rows.select("vm", *ATTRS, "ts_ms", "interval_ms", breached.alias("breached"))
    totals = base.group_by("vm").agg(
        ts.min().alias("first_ts_ms"),
        ts.max().alias("last_ts_ms"),
        interval.sum().alias("observed_ms"),
        interval.filter(pl.col("breached")).sum().alias("breached_ms"),
    )
    # Labels of each VM's newest row: a semi-join on (vm, newest ts) is several times cheaper
    # than aggregating four string columns per group.
    newest = base.join(totals.select("vm", pl.col("last_ts_ms").alias("ts_ms")), on=["vm", "ts_ms"], how="semi")
    per_vm = totals.join(newest.select("vm", *ATTRS), on="vm", how="left")
    # A breached interval continues a breach when the previous breached one ends where it starts.
    continues = ((vm == vm.shift(1)) & (end.shift(1) == ts)).fill_null(False)
    pieces = (
        base.filter(pl.col("breached"))
        .select("vm", "ts_ms", (ts + interval).alias("end_ms"))
        .sort("vm", "ts_ms")
        .with_columns((~continues).cum_sum().alias("episode"))
        .group_by("episode")
        .agg(vm.first(), ts.min().alias("start_ms"), end.max().alias("end_ms"))
    )
    # After a breach: an interval starting where it ends (recovered: it is not breached, or the
    # breach would go on), a gap (not recovered), or nothing more in this chunk (unknown).
    following = (
        base.select("vm", ts.alias("end_ms"))
        .join(pieces.select("vm", "end_ms"), on=["vm", "end_ms"], how="semi")  # probes with the few
        .with_columns(pl.lit(True).alias("followed"))
    )
    episodes = (
        pieces.join(following, on=["vm", "end_ms"], how="left")
        .join(per_vm.select("vm", "last_ts_ms"), on="vm", how="left")
        .with_columns(
            pl.when(end > pl.col("last_ts_ms"))
            .then(pl.lit(None, dtype=pl.Boolean))
            .otherwise(pl.col("followed").fill_null(False))
            .alias("recovered")
        )
        .group_by("vm")
        .agg(pl.struct("start_ms", "end_ms", "recovered").sort_by("start_ms").alias("episodes"))
    )
    return (
        per_vm.join(episodes, on="vm", how="left")
        .with_columns(pl.col("episodes").fill_null(pl.lit([], dtype=VM_DAILY.schema["episodes"])))
        .select(VM_DAILY.schema.names())
        .cast(dict(VM_DAILY.schema))  # type: ignore[arg-type]
    )


def combine(
    chunks: pl.LazyFrame, group_by: str, filters: dict[str, list[str]] | None = None
) -> pl.DataFrame:
    """Compliance per group from chunks (VM_DAILY schema) that cover disjoint time."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
    chunks = chunks.collect(engine="streaming").lazy()
    per_vm = chunks.group_by("vm").agg(
        *[pl.col(c).sort_by("last_ts_ms").last() for c in ATTRS],
        pl.col("observed_ms").sum(),
        pl.col("breached_ms").sum(),
    )
    for column, values in (filters or {}).items():
        per_vm = per_vm.filter(pl.col(column).is_in(values))
    start, end = pl.col("start_ms"), pl.col("end_ms")
    pieces = (
        chunks.select("vm", "episodes")
        .explode("episodes")
        .unnest("episodes")
        .drop_nulls("start_ms")
        .sort("vm", "start_ms")
    )
    # Pieces of one breach meet at a chunk boundary: the next starts where the previous ended.
    continues = (pl.col("vm") == pl.col("vm").shift(1)) & (start == end.shift(1))
    breaches = (
        pieces.with_columns((~continues.fill_null(False)).cum_sum().alias("breach"))
        .group_by("breach")
        .agg(
            pl.col("vm").first(),
            start.min(),
            end.max(),
            pl.col("recovered").sort_by("start_ms").last(),
        )
    )
    # Unknown at the end of its last chunk: recovered if a later chunk has the next interval
    # (it is not breached, or the pieces would have joined).
    resumed = chunks.select("vm", pl.col("first_ts_ms").alias("end_ms"), pl.lit(True).alias("resumed")).unique()
    breaches = (
        breaches.join(resumed, on=["vm", "end_ms"], how="left")
        .with_columns(pl.coalesce("recovered", pl.col("resumed").fill_null(False)).alias("recovered"))
        .join(per_vm.select("vm", group_by) if group_by != "vm" else per_vm.select("vm"), on="vm", how="inner")
    )
    duration_s = (end - start).cast(pl.Float64) / 1000.0
    breach_stats = breaches.group_by(group_by).agg(
        pl.len().cast(pl.Int64).alias("breaches"),
        pl.col("recovered").sum().cast(pl.Int64).alias("recovered_breaches"),
        duration_s.max().alias("longest_breach_seconds"),
        duration_s.filter(pl.col("recovered")).mean().alias("mean_time_to_recover_seconds"),
    )
    totals = per_vm.group_by(group_by).agg(
        pl.len().cast(pl.Int64).alias("vms"),
        (pl.col("observed_ms").sum().cast(pl.Float64) / 1000.0).alias("observed_seconds"),
        (pl.col("breached_ms").sum().cast(pl.Float64) / 1000.0).alias("breached_seconds"),
    )
    return (
        totals.join(breach_stats, on=group_by, how="left", nulls_equal=True)
        .with_columns(
            pl.when(pl.col("observed_seconds") > 0)
            .then(1.0 - pl.col("breached_seconds") / pl.col("observed_seconds"))
            .otherwise(pl.lit(None, dtype=pl.Float64))
            .alias("within_rpo_ratio"),
            pl.col("breaches").fill_null(0),
            pl.col("recovered_breaches").fill_null(0),
        )
        .select(group_by, *RESULT_SCHEMA.names())
        .sort("within_rpo_ratio", group_by, nulls_last=True)
        .collect()
    )
