"""Entity state tables and how a decoded batch updates them.

Every update is vectorized: the batch is reduced to one row per entity, then merged with the
rows of the table it touches; the other rows are not rewritten and keep their positions. Updates are order-insensitive where the contract demands it: a recovery point
only moves forward (max), status fields follow the newest event time, and events already seen
(same `event_id` within the dedupe window) are dropped before they count.

Tables are never mutated in place: each update returns new DataFrames, so a snapshot handed to
a scrape stays consistent while the next batch is applied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import polars as pl

from rules.dedupe import SeenIds
from rules.policy import DEFAULT_POLICY, Policy, first_match, resolve_matched

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
        # Hash of vm_id (`vm_key()`), computed once when the VM is added: finding the rows a
        # batch touches, and joins per VM, work on an integer instead of a string.
        "vm_key": pl.UInt64(),
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
        # Hash of the VM's identity labels (`REPLICATION_IDENTITY`): what its alert ids are
        # made from, kept per row so that a tick hashes no strings (see `identity_key`).
        "identity_key": pl.UInt64(),
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
        "vm_key": pl.UInt64(),  # hash of vm_id, as in REPLICATION_SCHEMA
        "cluster_id": pl.String(),
        "identity_key": pl.UInt64(),  # hash of the identity labels (`BACKUP_IDENTITY`)
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

# Per storage path (volume) of an instance, as its nodes report it in heartbeats (`storage`). A
# cluster-shared volume is reported by every node that sees it: the newest report wins, and at
# the same instant the greatest node id, so the order of arrival never matters.
STORAGE_PATH_SCHEMA = pl.Schema(
    {
        "cluster_id": pl.String(),
        "path_id": pl.String(),
        "node_id": pl.String(),  # the node whose report this is
        "last_report_ms": MS(),
        "capacity_bytes": MS(),
        "free_bytes": MS(),
        "iops_capacity": pl.Float64(),
        "iops_used": pl.Float64(),
        "online": pl.Boolean(),
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


def _empty(schema: pl.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass(frozen=True)
class FleetState:
    """All entity tables at one moment. Immutable: updates return a new FleetState."""

    replication: pl.DataFrame = field(default_factory=lambda: _empty(REPLICATION_SCHEMA))
    backup: pl.DataFrame = field(default_factory=lambda: _empty(BACKUP_SCHEMA))
    nodes: pl.DataFrame = field(default_factory=lambda: _empty(NODE_SCHEMA))
    storage_paths: pl.DataFrame = field(default_factory=lambda: _empty(STORAGE_PATH_SCHEMA))
    clusters: pl.DataFrame = field(default_factory=lambda: _empty(CLUSTER_SCHEMA))
    # Per stream: the event ids applied recently, with their instance (see rules/dedupe.py).
    seen: dict[str, SeenIds] = field(default_factory=dict)


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
    inside the batch: the first one stays), and remember the new ones."""
    seen = state.seen.get(stream)
    remembered, fresh = (seen if seen is not None else SeenIds.for_window(window_ms)).dedupe(
        events, now_ms, window_ms
    )
    return replace(state, seen={**state.seen, stream: remembered}), fresh


def link_key() -> pl.Expr:
    return pl.concat_str([pl.col("cluster_id"), pl.col("target_id")], separator="\x1f").hash()


# The identity labels of the per-VM entities (rules.views.ENTITIES), as label ← state column.
REPLICATION_IDENTITY = (
    ("vm", "vm_id"),
    ("hci_cluster", "cluster_id"),
    ("target", "target_id"),
    ("technology", "technology"),
)
BACKUP_IDENTITY = (("vm", "vm_id"), ("hci_cluster", "cluster_id"))


def identity_hash(columns: list[pl.Expr]) -> pl.Expr:
    """A 64-bit hash of an entity's identity label values, in label order. The one definition
    of it: alert ids are this xor a rule's salt (rules.describe), computed either from a view's
    label columns or, for the per-VM entities, stored per row (`identity_key`)."""
    return pl.struct([c.cast(pl.String) for c in columns]).hash()


def identity_key(identity: tuple[tuple[str, str], ...]) -> pl.Expr:
    """The `identity_key` column of a VM table, from its state columns."""
    return identity_hash([pl.col(column).alias(label) for label, column in identity]).alias("identity_key")


def vm_key() -> pl.Expr:
    """The `vm_key` column of the VM tables."""
    return pl.col("vm_id").hash()


_POS = "__pos"  # position of a touched row in the table it came from
_POLICY = "__policy"  # index of the first policy matching a row
_ROW, _FINAL, _LAST_OTHER = "__row", "__final", "__last_other"  # see _reduce_replication
_RANK_NEW, _RANK_OLD, _TAKES, _INTERRUPTED = "__rank_new", "__rank_old", "__takes", "__interrupted"
# The string columns of REPLICATION_SCHEMA: `_merge_replication` flags which values changed.
_STRINGS = ("cluster_id", "target_id", "technology", "status", "storage_path_id", "service_group")


def _changed(column: str) -> str:
    """The name of the flag column of `_merge_replication`: whether this column's value changed."""
    return f"__changed_{column}"


def _touched(table: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """The rows of `table` for the VMs of `events`, in table order, with their position
    (`_POS`). Found with one pass over the UInt64 `vm_key`, not the strings. Callers then join
    on `vm_id`: a hash collision only brings along a row the batch does not touch, which merges
    with nothing and is written back unchanged."""
    keys = events.select(vm_key().unique()).to_series()
    positions = table.select(pl.arg_where(pl.col("vm_key").is_in(keys.implode()))).to_series()
    return table.gather(positions).with_columns(positions.alias(_POS))


def _scatter(column: pl.Series, positions: pl.Series, values: pl.Series) -> pl.Series:
    """`column` with `values` at `positions`, as a new Series (tables are immutable: a snapshot
    held elsewhere must not change; polars copies the shared buffer before writing)."""
    if not column.dtype.is_nested():
        return column.clone().scatter(positions, values)
    # Nested types have no scatter: gather from the column followed by the values instead, made
    # contiguous first (a gather from two chunks is an order of magnitude slower than the copy).
    index = pl.int_range(column.len(), dtype=pl.Int64, eager=True).scatter(
        positions, pl.int_range(column.len(), column.len() + values.len(), dtype=pl.Int64, eager=True)
    )
    return pl.concat([column, values.alias(column.name)], rechunk=True).gather(index)


def _write_back(table: pl.DataFrame, touched: pl.DataFrame, merged: pl.DataFrame) -> pl.DataFrame:
    """`table` with its touched rows replaced by their merged values, at the same positions,
    and the new VMs (null `_POS`) appended (see `_written`). Only columns whose values changed
    are rewritten."""
    is_new = pl.col(_POS).is_null()
    # The full join kept every touched row once (vm_id is unique on both sides), so sorted by
    # position they line up with `touched`.
    updated = merged.filter(~is_new).sort(_POS)
    positions = updated.get_column(_POS)
    writes = {
        name: (positions, values)
        for name in table.columns
        if not (values := updated.get_column(name)).equals(
            touched.get_column(name), check_dtypes=True, check_names=True, null_equal=True
        )
    }
    return _written(table, writes, merged.filter(is_new).drop(_POS))


def _written(
    table: pl.DataFrame, writes: dict[str, tuple[pl.Series, pl.Series]], added: pl.DataFrame
) -> pl.DataFrame:
    """`table` with, for each column named in `writes`, the values written at the positions
    given there (the other columns shared with `table` as they are), and the rows `added`
    appended: a row only moves when rows are added or removed, which the history writer and
    the views rely on.

    The result is kept in one chunk per column: picking a batch's rows out of a chunked table
    costs about ten times more (10 ms instead of 1 ms for 10,000 rows of a million), at every
    batch, while compacting costs one copy of the table, only when VMs are added."""
    if writes:
        table = pl.DataFrame(
            [_scatter(column, *writes[column.name]) if column.name in writes else column for column in table.get_columns()]
        )
    if added.height:
        table = pl.concat([table, added], how="vertical")
    if max(table.n_chunks("all"), default=1) > 1:
        table = table.rechunk()
    return table


def drop_clusters(fleet: FleetState, cluster_ids: list[str]) -> FleetState:
    """The fleet without the entities of these instances."""
    keep = ~pl.col("cluster_id").is_in(cluster_ids).fill_null(False)
    return replace(
        fleet,
        replication=fleet.replication.filter(keep),
        backup=fleet.backup.filter(keep),
        nodes=fleet.nodes.filter(keep),
        storage_paths=fleet.storage_paths.filter(keep),
        clusters=fleet.clusters.filter(keep),
        # The ids too: if the instance comes back, its replayed events must apply again.
        seen={stream: seen.drop_clusters(cluster_ids) for stream, seen in fleet.seen.items()},
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
    """The table after applying a batch. Only the rows of the batch's VMs are merged (a batch
    touches a few thousand VMs of up to a million); the others are kept as they are, in place.

    No join: each event is given the position of its VM's row (`_locate`), the batch is reduced
    to one row per VM carrying that position, and the previous values of those rows are
    gathered by it, row for row with the reduced batch (null rows for new VMs)."""
    return write_replication(table, events, policies, window)[0]


def write_replication(
    table: pl.DataFrame,
    events: pl.DataFrame,
    policies: tuple[Policy, ...] = (DEFAULT_POLICY,),
    window: WindowCounters = WindowCounters(3_600_000),
) -> tuple[pl.DataFrame, pl.Series]:
    """`apply_replication`, and the positions of the rows the batch wrote (the engine
    re-evaluates those rows of conditions it evaluated ahead of a tick)."""
    if events.is_empty():
        return table, _no_rows()
    position = _locate(table, events)
    located = events.with_columns(
        position.alias(_POS), table.get_column("window_bucket").gather(position).alias("prev_bucket")
    )
    old, joined = _beside(table, _reduce_replication(located, window))
    merged = _relabel(_merge_replication(joined), policies)
    written = _write_rows(table, old, merged)
    return written, _rows_written(merged, table.height, written.height)


def _no_rows() -> pl.Series:
    return pl.Series(_POS, [], dtype=pl.UInt32)


def _rows_written(merged: pl.DataFrame, before: int, after: int) -> pl.Series:
    """The positions of the rows a batch merged (whether or not a value changed) and of those
    it appended."""
    updated = merged.get_column(_POS).drop_nulls().cast(pl.UInt32)
    return pl.concat([updated, pl.int_range(before, after, dtype=pl.UInt32, eager=True).alias(_POS)])


def _beside(table: pl.DataFrame, reduced: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The previous values of the reduced batch's rows (gathered by `_POS`, null rows for new
    VMs), and those beside the batch's (suffix `_new`), row for row."""
    # vm_id and vm_key never change for a row the table holds: the new VMs take theirs later.
    old = table.drop("vm_id", "vm_key").gather(reduced.get_column(_POS))
    ours = set(old.columns)
    return old, old.hstack(reduced.rename({c: f"{c}_new" for c in reduced.columns if c in ours}))


def _locate(table: pl.DataFrame, events: pl.DataFrame) -> pl.Series:
    """Per event, the position of its VM's row in `table` (null: a VM the table does not hold).
    The candidate rows are found with one pass over the UInt64 `vm_key` (not the strings), and
    the batch is matched with those few rows on the key, then verified on `vm_id`: a hash
    collision with another VM then only fails to match. Should two candidate rows share a key,
    matching on it would be ambiguous, and the batch is matched on `vm_id` itself instead."""
    keyed = events.select("vm_id", vm_key().alias("vm_key"))
    wanted = keyed.get_column("vm_key").implode()
    rows = table.select(pl.arg_where(pl.col("vm_key").is_in(wanted))).to_series()
    candidates = table.select("vm_id", "vm_key").gather(rows).with_columns(rows.alias(_POS))
    found = keyed.join(candidates, on="vm_key", how="left", suffix="_table", maintain_order="left")
    if found.height == keyed.height:  # no event's key is shared by two rows
        same = pl.col("vm_id") == pl.col("vm_id_table")
        return found.select(pl.when(same).then(pl.col(_POS)).alias(_POS)).to_series()
    found = keyed.join(candidates.drop("vm_key"), on="vm_id", how="left", maintain_order="left")
    return found.get_column(_POS)


def _merge_replication(joined: pl.DataFrame) -> pl.DataFrame:
    """The previous values of the rows (plain names, null for new VMs) merged with the reduced
    batch (suffix `_new`), row by row. One query, one collect."""
    query = joined.lazy()
    for stage in _merge_stages():
        query = query.with_columns(*stage)
    return query.collect()


@functools.cache
def _merge_stages() -> tuple[tuple[pl.Expr, ...], ...]:
    """The expressions of `_merge_replication`, stage by stage, built once: building them took
    about a fifth of the time of evaluating them over a batch of 40,000 events."""
    rank_new = pl.col(_RANK_NEW)
    rank_old = pl.col(_RANK_OLD)
    old_event = pl.col("status_event_ms").fill_null(-(2**62))
    new_event = pl.col("status_event_ms_new")
    takes = (
        pl.col("status_new").is_not_null() & ((new_event > old_event) | ((new_event == old_event) & (rank_new >= rank_old)))
    ).fill_null(False)
    # Another status in the batch, later than the table's, ended the table's run.
    other_ms = pl.col("other_status_ms")
    interrupted = (
        (other_ms > old_event) | ((other_ms == old_event) & (pl.col("other_status_rank") > rank_old))
    ).fill_null(False)
    takes_status = pl.col(_TAKES)
    status_changed = takes_status & (pl.col("status_new") != pl.col("status").fill_null(""))
    strings = {name: _newer(name) for name in _STRINGS if name != "status"}
    strings["status"] = pl.when(takes_status).then(pl.col("status_new")).otherwise(pl.col("status")).alias("status")
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

    # The ranks and the status decisions are columns of their own, each computed once: a
    # query run eagerly does not share common subexpressions, and the string lookups of the
    # ranks (about 1 ms per 40,000 rows each) would run once per use.
    return (
        (
            pl.col("status_new").replace_strict(STATUS_RANK, default=-1).alias(_RANK_NEW),
            pl.col("status").replace_strict(STATUS_RANK, default=-1).alias(_RANK_OLD),
        ),
        (takes.alias(_TAKES), interrupted.alias(_INTERRUPTED)),
        (
            *strings.values(),
            # Which string values changed, compared once here (comparing strings costs about
            # ten to thirty times more than integers): for `_relabel` and `_write_rows`.
            *(value.ne_missing(pl.col(name)).alias(_changed(name)) for name, value in strings.items()),
            _newer("frequency_s"),
            _min_of("first_seen_ms"),
            _max_of("last_recovery_point_ms"),
            _max_of("last_failover_test_ms"),
            pl.when(takes_status).then(new_event).otherwise(pl.col("status_event_ms")).alias("status_event_ms"),
            pl.when(status_changed | (takes_status & pl.col(_INTERRUPTED)) | pl.col("status_since_ms").is_null())
            .then(pl.col("status_run_ms"))
            .when(takes_status)
            .then(pl.min_horizontal("status_since_ms", "status_run_ms"))
            .otherwise(pl.col("status_since_ms"))
            .alias("status_since_ms"),
            _newer("pending_bytes"),
            _newer("vhd_bytes"),
            _newer("churn_bytes_per_s"),
            *shifted("completed_cur", "completed_prev"),
            *shifted("missed_cur", "missed_prev"),
            bucket_now.alias("window_bucket"),
        ),
        (_max_of("last_event_ms"),),
    )


# The columns `link_key` and `identity_key` are made of, besides vm_id (fixed for a row).
_LABEL_INPUTS = ("cluster_id", "target_id", "technology")


def _relabel(merged: pl.DataFrame, policies: tuple[Policy, ...]) -> pl.DataFrame:
    """With `link_key`, `identity_key` and the policy columns of the merged rows. The two
    hashes depend only on the row's own labels, which a batch seldom changes: they are hashed
    for the new VMs and the rows whose labels changed, and kept as they were for the others
    (hashing the strings of every touched row cost ~3.5 ms per 40,000 rows). The policies are
    resolved for every touched row, as before: they depend on the `policies` passed in too."""
    stale = pl.col(_POS).is_null()
    for name in _LABEL_INPUTS:
        stale = stale | pl.col(_changed(name))
    rows = merged.select(pl.arg_where(stale)).to_series()
    if rows.len():
        labels = merged.gather(rows).select(link_key().alias("link_key"), identity_key(REPLICATION_IDENTITY))
        merged = merged.with_columns(
            merged.get_column(name).scatter(rows, labels.get_column(name)) for name in ("link_key", "identity_key")
        )
    twice_interval = pl.col("frequency_s").cast(pl.Float64) * 2
    matched = pl.col(_POLICY)
    return merged.with_columns(first_match(policies, set(merged.columns)).alias(_POLICY)).select(
        *(name for name in REPLICATION_SCHEMA.names() if name not in ("vm_key", "rpo_target_s", "failover_test_max_age_s")),
        resolve_matched(policies, matched, "replication_rpo_seconds", twice_interval).alias("rpo_target_s"),
        resolve_matched(
            policies, matched, "failover_test_max_age_seconds", pl.lit(DEFAULT_POLICY.failover_test_max_age_seconds)
        ).alias("failover_test_max_age_s"),
        _POS,
        *(_changed(name) for name in _STRINGS),
    )


def _write_rows(table: pl.DataFrame, old: pl.DataFrame, merged: pl.DataFrame) -> pl.DataFrame:
    """`table` with the merged rows written at their positions (`_POS`) and the new VMs (null
    `_POS`) appended (see `_written`); `old` holds the rows' previous values, row for row with
    `merged` (whose string columns come with their `_changed` flags). Only values that changed
    are written; vm_id and vm_key never change for a row the table holds."""
    is_new = merged.get_column(_POS).is_null()
    any_new = bool(is_new.any())
    updated = merged.filter(~is_new) if any_new else merged
    before = old.filter(~is_new) if any_new else old
    positions = updated.get_column(_POS)
    writes: dict[str, tuple[pl.Series, pl.Series]] = {}
    for name in table.columns:
        if name in ("vm_id", "vm_key") or not updated.height:
            continue
        values = updated.get_column(name)
        if name in _STRINGS:
            # Only the values that changed (flagged by the merge): the column is copied either
            # way, but scattering strings costs per value too, and few change.
            changed = updated.get_column(_changed(name))
            if changed.any():
                writes[name] = (positions.filter(changed), values.filter(changed))
        elif not values.equals(before.get_column(name), check_dtypes=True, check_names=True, null_equal=True):
            writes[name] = (positions, values)
    added = (
        merged.filter(is_new).with_columns(vm_key().alias("vm_key")).select(REPLICATION_SCHEMA.names())
        if any_new
        else merged.clear()
    )
    return _written(table, writes, added)


def _reduce_replication(events: pl.DataFrame, window: WindowCounters) -> pl.DataFrame:
    """The batch as one row per VM: what it says about each VM, to be merged with the table.
    `events` carry their VM's row position (`_POS`) and its counters' bucket (`prev_bucket`),
    both null for a new VM; each reduced row keeps its `_POS`.
    VMs with one event in the batch (the common case: one cycle per VM per minute) are mapped
    row by row; only VMs with several events are grouped, sorted and aggregated. Both give the
    same row for a VM, whichever way its events are ordered."""
    # Compared as it comes: on the decoder's Enum a comparison with a kind is an integer one,
    # four times cheaper than casting every row to a string first.
    kind = pl.col("kind")
    staged = events.with_columns(window.bucket(_ms("ts")).alias("bucket"))
    status = kind.replace_strict(REPLICATION_STATUS, default=None)

    def count(which: str, offset: int) -> pl.Expr:
        # Every applied event counts once: duplicates were dropped by `drop_seen`, so the count
        # is the same however the events are ordered or split into batches.
        return (kind == which) & (pl.col("bucket") == pl.col("batch_bucket") - offset)

    repeated = staged.select(pl.col("vm_id").is_duplicated()).to_series()
    parts = []
    single = staged.filter(~repeated) if repeated.any() else staged
    if single.height:
        # One event: its values, or null where the aggregation below would find no row.
        ts = _ms("ts")
        has_status = pl.col("status").is_not_null()
        parts.append(
            single.with_columns(status.alias("status"))
            .with_columns(pl.max_horizontal("prev_bucket", "bucket").alias("batch_bucket"))
            .select(
                "vm_id",
                _POS,
                "cluster_id",
                "target_id",
                pl.col("technology").cast(pl.String),
                "frequency_s",
                ts.alias("first_seen_ms"),
                ts.alias("last_event_ms"),
                pl.when(kind == "cycle_completed").then(_ms("recovery_point_ts")).alias("last_recovery_point_ms"),
                pl.when(kind == "test_failover_completed").then(ts).alias("last_failover_test_ms"),
                "status",
                pl.when(has_status).then(ts).alias("status_event_ms"),
                pl.when(has_status).then(ts).alias("status_run_ms"),
                pl.lit(None, dtype=MS).alias("other_status_ms"),
                pl.lit(None, dtype=MS).alias("other_status_rank"),
                "pending_bytes",
                "vhd_bytes",
                "churn_bytes_per_s",
                "storage_path_id",
                "service_group",
                pl.col("batch_bucket").alias("window_bucket"),
                count("cycle_completed", 0).fill_null(False).cast(MS).alias("completed_cur"),
                count("cycle_completed", 1).fill_null(False).cast(MS).alias("completed_prev"),
                count("cycle_missed", 0).fill_null(False).cast(MS).alias("missed_cur"),
                count("cycle_missed", 1).fill_null(False).cast(MS).alias("missed_prev"),
            )
        )
    if repeated.any():
        # The bucket the entity's counters will be in after this batch.
        newest_bucket = pl.max_horizontal(pl.col("prev_bucket"), pl.col("bucket").max().over("vm_id"))
        # Per event, in (ts, status rank) order: its position, its VM's final status, and the
        # position of the VM's last event of another status. They are columns so that the
        # aggregations below filter on plain columns: filtering by a per-group aggregate is
        # evaluated group by group, five times slower.
        final_status = pl.col("status").drop_nulls().last().over("vm_id")
        other = pl.col("status").is_not_null() & (pl.col("status") != pl.col(_FINAL))
        last_other = pl.col(_LAST_OTHER)
        parts.append(
            staged.filter(repeated)
            .with_columns(newest_bucket.alias("batch_bucket"), status.alias("status"))
            .with_columns(pl.col("status").replace_strict(STATUS_RANK, default=None).alias("status_rank"))
            .sort("ts", "status_rank", nulls_last=False)
            .with_columns(pl.int_range(pl.len(), dtype=MS).alias(_ROW), final_status.alias(_FINAL))
            .with_columns(pl.when(other).then(pl.col(_ROW)).max().over("vm_id").alias(_LAST_OTHER))
            .group_by("vm_id")
            .agg(
                pl.col(_POS).first(),
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
                _ms("ts")
                .filter((pl.col("status") == pl.col(_FINAL)) & (pl.col(_ROW) > last_other.fill_null(-1)))
                .min()
                .alias("status_run_ms"),
                _ms("ts").filter(pl.col(_ROW) == last_other).first().alias("other_status_ms"),
                pl.col("status_rank").filter(pl.col(_ROW) == last_other).first().cast(MS).alias("other_status_rank"),
                _last_non_null("pending_bytes"),
                _last_non_null("vhd_bytes"),
                _last_non_null("churn_bytes_per_s"),
                _last_non_null("storage_path_id"),
                _last_non_null("service_group"),
                pl.col("batch_bucket").max().alias("window_bucket"),
                count("cycle_completed", 0).sum().cast(MS).alias("completed_cur"),
                count("cycle_completed", 1).sum().cast(MS).alias("completed_prev"),
                count("cycle_missed", 0).sum().cast(MS).alias("missed_cur"),
                count("cycle_missed", 1).sum().cast(MS).alias("missed_prev"),
            )
        )
    return pl.concat(parts, how="vertical")


def apply_backup(
    table: pl.DataFrame, events: pl.DataFrame, policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
) -> pl.DataFrame:
    """The table after applying a batch: as `apply_replication`, only the batch's VMs are merged
    and the other rows stay as they are, in place."""
    return write_backup(table, events, policies)[0]


def write_backup(
    table: pl.DataFrame, events: pl.DataFrame, policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
) -> tuple[pl.DataFrame, pl.Series]:
    """`apply_backup`, and the positions of the rows the batch wrote."""
    if events.is_empty():
        return table, _no_rows()
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
    touched = _touched(table, events)
    joined = touched.join(reduced, on="vm_id", how="full", coalesce=True, suffix="_new")
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
            pl.coalesce("vm_key", vm_key()).alias("vm_key"),
        )
        .pipe(_failures_after_last_success)
        .with_columns(pl.col("failure_ts").list.len().cast(MS).alias("consecutive_failures"), _max_of("last_event_ms"))
    )
    columns = set(merged.columns)
    matched = pl.col(_POLICY)
    merged = merged.with_columns(first_match(policies, columns).alias(_POLICY)).with_columns(
        identity_key(BACKUP_IDENTITY),
        resolve_matched(policies, matched, "backup_rpo_seconds", pl.lit(DEFAULT_POLICY.backup_rpo_seconds)).alias(
            "backup_rpo_s"
        ),
        resolve_matched(
            policies, matched, "restore_test_max_age_seconds", pl.lit(DEFAULT_POLICY.restore_test_max_age_seconds)
        ).alias("restore_test_max_age_s"),
        *[
            resolve_matched(
                policies, matched, f"retention_{t}", pl.lit(float(getattr(DEFAULT_POLICY, f"retention_{t}")))
            ).alias(f"retention_{t}")
            for t in TIERS
        ],
    )
    merged = merged.select(*BACKUP_SCHEMA.names(), _POS)
    written = _write_back(table, touched, merged)
    return written, _rows_written(merged, table.height, written.height)


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


def apply_storage(table: pl.DataFrame, heartbeats: pl.DataFrame) -> pl.DataFrame:
    """The storage paths after a batch of heartbeats: each report of a path replaces the one
    held if it is newer (see STORAGE_PATH_SCHEMA). Heartbeats without a `storage` list leave
    their paths as they were."""
    if heartbeats.is_empty() or "storage" not in heartbeats.columns:
        return table
    reports = (
        heartbeats.select("cluster_id", "node_id", _ms("ts").alias("last_report_ms"), "storage")
        .explode("storage")
        .drop_nulls("storage")
        .unnest("storage")
        .drop_nulls("path_id")
        .select(STORAGE_PATH_SCHEMA.names())
    )
    if reports.is_empty():
        return table
    return (
        pl.concat([table, reports.cast(STORAGE_PATH_SCHEMA)])
        .sort("last_report_ms", "node_id", nulls_last=False)
        .group_by("cluster_id", "path_id", maintain_order=True)
        .last()
        .select(STORAGE_PATH_SCHEMA.names())
    )


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
