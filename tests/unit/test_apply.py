"""`apply_replication` and `apply_backup` merge only the rows a batch touches: against a copy of
the previous implementation (a full outer join of the whole table with the batch, every row
rewritten), which is the reference for what the state must be."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from ingest.contracts import BACKUP_KINDS, REPLICATION_KINDS, SCHEMAS, Stream
from rules import state
from rules.policy import DEFAULT_POLICY, Policy, PolicyMatch, glob_regex, resolve
from rules.state import BACKUP_SCHEMA, REPLICATION_SCHEMA, WindowCounters

T0 = 1_795_600_000_000
S = 1000
WINDOW = WindowCounters(60_000)  # short, so that batches move the counters across buckets

# --- the reference: the implementation before rows were merged in place -----------------------
# Copied as it was (only renamed), with the helpers it used, so that later changes to
# rules/state.py or rules/policy.py cannot move the reference along with them.

MS = pl.Int64
# Hashes added to the tables since; checked against their definitions instead.
DERIVED = ("vm_key", "identity_key")
OLD_REPLICATION_NAMES = [name for name in REPLICATION_SCHEMA.names() if name not in DERIVED]
OLD_BACKUP_NAMES = [name for name in BACKUP_SCHEMA.names() if name not in DERIVED]
_MATCH_COLUMNS = {"vm": "vm_id", "service_group": "service_group", "hci_cluster": "cluster_id", "technology": "technology"}


def _old_matches(match: PolicyMatch, available: set[str]) -> pl.Expr:
    cond = pl.lit(True)
    for key, column in _MATCH_COLUMNS.items():
        pattern = getattr(match, key)
        if pattern is None:
            continue
        if column not in available:
            cond = cond & pl.lit(False)
            continue
        regex = glob_regex(pattern)
        cond = cond & pl.col(column).cast(pl.String).str.contains(regex).fill_null(False)
    return cond


def _old_resolve(policies: tuple[Policy, ...], columns: set[str], attribute: str, fallback: pl.Expr) -> pl.Expr:
    expr: pl.Expr = fallback
    for policy in reversed(policies):
        value = getattr(policy, attribute)
        then = fallback if value is None else pl.lit(float(value))
        expr = pl.when(_old_matches(policy.match, columns)).then(then).otherwise(expr)
    return expr


def _ms(column: str) -> pl.Expr:
    return pl.col(column).dt.epoch("ms")


def _last_non_null(column: str) -> pl.Expr:
    return pl.col(column).drop_nulls().last()


def _newer(column: str) -> pl.Expr:
    new = pl.col(f"{column}_new")
    newer = pl.col("last_event_ms_new") >= pl.col("last_event_ms").fill_null(-(2**62))
    return pl.when(new.is_not_null() & newer.fill_null(False)).then(new).otherwise(pl.col(column)).alias(column)


def _max_of(column: str) -> pl.Expr:
    return pl.max_horizontal(pl.col(column), pl.col(f"{column}_new")).alias(column)


def _min_of(column: str) -> pl.Expr:
    return pl.min_horizontal(pl.col(column), pl.col(f"{column}_new")).alias(column)


def _old_link_key() -> pl.Expr:
    return pl.concat_str([pl.col("cluster_id"), pl.col("target_id")], separator="\x1f").hash()


def old_apply_replication(
    table: pl.DataFrame,
    events: pl.DataFrame,
    policies: tuple[Policy, ...] = (DEFAULT_POLICY,),
    window: WindowCounters = WindowCounters(3_600_000),
) -> pl.DataFrame:
    if events.is_empty():
        return table
    kind = pl.col("kind").cast(pl.String)
    bucket = window.bucket(_ms("ts"))
    newest_bucket = pl.max_horizontal(pl.col("prev_bucket"), bucket.max().over("vm_id"))
    previous = table.select("vm_id", pl.col("window_bucket").alias("prev_bucket"))
    staged = (
        events.join(previous, on="vm_id", how="left")
        .with_columns(newest_bucket.alias("batch_bucket"), bucket.alias("bucket"))
    )

    def count(which: str, offset: int) -> pl.Expr:
        return ((kind == which) & (pl.col("bucket") == pl.col("batch_bucket") - offset)).sum()

    status = kind.replace_strict(state.REPLICATION_STATUS, default=None)
    final_status = pl.col("status").drop_nulls().last()
    position = pl.int_range(pl.len())
    last_other = position.filter(pl.col("status").is_not_null() & (pl.col("status") != final_status)).max()
    reduced = (
        staged.with_columns(status.alias("status"))
        .with_columns(pl.col("status").replace_strict(state.STATUS_RANK, default=None).alias("status_rank"))
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
    rank_new = pl.col("status_new").replace_strict(state.STATUS_RANK, default=-1)
    rank_old = pl.col("status").replace_strict(state.STATUS_RANK, default=-1)
    old_event = pl.col("status_event_ms").fill_null(-(2**62))
    new_event = pl.col("status_event_ms_new")
    takes_status = (
        pl.col("status_new").is_not_null() & ((new_event > old_event) | ((new_event == old_event) & (rank_new >= rank_old)))
    ).fill_null(False)
    status_changed = takes_status & (pl.col("status_new") != pl.col("status").fill_null(""))
    other_ms = pl.col("other_status_ms")
    interrupted = (
        (other_ms > old_event) | ((other_ms == old_event) & (pl.col("other_status_rank") > rank_old))
    ).fill_null(False)
    old_bucket = pl.col("window_bucket")
    bucket_now = pl.coalesce("window_bucket_new", "window_bucket")

    def shifted(cur: str, prev: str) -> list[pl.Expr]:
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
        _old_link_key().alias("link_key"),
        _old_resolve(policies, columns, "replication_rpo_seconds", twice_interval).alias("rpo_target_s"),
        _old_resolve(
            policies, columns, "failover_test_max_age_seconds", pl.lit(DEFAULT_POLICY.failover_test_max_age_seconds)
        ).alias("failover_test_max_age_s"),
    ).select(OLD_REPLICATION_NAMES)


def old_apply_backup(
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
        *[tier_delta(t) for t in state.TIERS],
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
        .list.tail(state.MAX_FAILURES_KEPT)
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
                for t in state.TIERS
            ],
            (pl.col("tiers_reported").fill_null(False) | pl.col("tiers_reported_new").fill_null(False)).alias(
                "tiers_reported"
            ),
        )
        .pipe(_old_failures_after_last_success)
        .with_columns(pl.col("failure_ts").list.len().cast(MS).alias("consecutive_failures"), _max_of("last_event_ms"))
    )
    columns = set(merged.columns)
    return merged.with_columns(
        _old_resolve(policies, columns, "backup_rpo_seconds", pl.lit(DEFAULT_POLICY.backup_rpo_seconds)).alias(
            "backup_rpo_s"
        ),
        _old_resolve(
            policies, columns, "restore_test_max_age_seconds", pl.lit(DEFAULT_POLICY.restore_test_max_age_seconds)
        ).alias("restore_test_max_age_s"),
        *[
            _old_resolve(
                policies, columns, f"retention_{t}", pl.lit(float(getattr(DEFAULT_POLICY, f"retention_{t}")))
            ).alias(f"retention_{t}")
            for t in state.TIERS
        ],
    ).select(OLD_BACKUP_NAMES)


def _old_failures_after_last_success(frame: pl.DataFrame) -> pl.DataFrame:
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


# --- generated batches -----------------------------------------------------------------------

VMS = [f"vm{i}" for i in range(6)]
CLUSTERS = ["hci-a", "hci-b"]
SERVICES = ["sg-web-1", "sg-db-1", None]

POLICY_SETS: list[tuple[Policy, ...]] = [
    (DEFAULT_POLICY,),
    (
        Policy(name="db", match=PolicyMatch(service_group="sg-db-*"), replication_rpo_seconds=120,
               backup_rpo_seconds=3600, retention_weekly=4),
        Policy(name="vm3", match=PolicyMatch(vm="vm3"), failover_test_max_age_seconds=86_400,
               restore_test_max_age_seconds=7200, retention_daily=3),
        Policy(name="b-asr", match=PolicyMatch(hci_cluster="hci-b", technology="asr"), replication_rpo_seconds=900),
        Policy(name="vm?", match=PolicyMatch(vm="vm?"), backup_rpo_seconds=60, retention_yearly=1),
    ),
    (Policy(name="none", match=PolicyMatch(vm="nomatch")), Policy(name="rest", replication_rpo_seconds=45)),
]


@st.composite
def replication_batches(draw: st.DrawFn, batches: int) -> list[pl.DataFrame]:
    """Batches of replication events over a few VMs, with equal timestamps likely (status ties,
    out-of-order events across batches) and new VMs appearing in later batches. Events of one
    VM at one instant carry the same descriptive fields: which of them an aggregation keeps is
    then the same in any order (the order of equal (ts, rank) rows is not specified)."""
    fields: dict[tuple[str, int], dict[str, Any]] = {}
    out = []
    for b in range(batches):
        rows = []
        for i in range(draw(st.integers(1, 12))):
            vm = draw(st.sampled_from(VMS[: 3 + 2 * b]))  # more VMs become known batch by batch
            # On a coarse grid, so that equal times (within a batch and with the table) are common.
            ts = draw(st.integers(0, 20)) * 10
            kind = draw(st.sampled_from(REPLICATION_KINDS))
            if (vm, ts) not in fields:
                fields[(vm, ts)] = {
                    "cluster_id": draw(st.sampled_from(CLUSTERS)),
                    "target_id": draw(st.sampled_from(["hci-c", "azure:westeurope"])),
                    "technology": draw(st.sampled_from(["hyperv_replica", "asr"])),
                    "frequency_s": draw(st.sampled_from([30, 300, 900])),
                    "pending_bytes": draw(st.none() | st.integers(0, 10**9)),
                    "vhd_bytes": draw(st.none() | st.integers(0, 10**12)),
                    "churn_bytes_per_s": draw(st.none() | st.floats(0, 1e7, allow_nan=False)),
                    "storage_path_id": draw(st.sampled_from(["csv1", "csv2", None])),
                    "service_group": draw(st.sampled_from(SERVICES)),
                }
            rp = draw(st.integers(max(0, ts - 90), ts))
            rows.append({
                "event_id": f"e{b}-{i}",
                "ts": T0 + ts * S,
                "vm_id": vm,
                "kind": kind,
                "recovery_point_ts": T0 + rp * S if kind == "cycle_completed" or draw(st.booleans()) else None,
                "received_at": T0 + 300 * S,
                **fields[(vm, ts)],
            })
        out.append(_frame(rows, Stream.REPLICATION))
    return out


@st.composite
def backup_batches(draw: st.DrawFn, batches: int) -> list[pl.DataFrame]:
    clusters: dict[tuple[str, int], str] = {}
    out = []
    for b in range(batches):
        rows = []
        for i in range(draw(st.integers(1, 12))):
            vm = draw(st.sampled_from(VMS[: 3 + 2 * b]))
            ts = draw(st.integers(0, 200))
            kind = draw(st.sampled_from(BACKUP_KINDS))
            needs_rp = kind in ("succeeded", "warning", "recovery_point_expired")
            rp = draw(st.integers(max(0, ts - 90), ts))
            rows.append({
                "event_id": f"b{b}-{i}",
                "ts": T0 + ts * S,
                "cluster_id": clusters.setdefault((vm, ts), draw(st.sampled_from(CLUSTERS))),
                "vm_id": vm,
                "job_id": f"j{i}",
                "product": "mabs",
                "level": "host",
                "kind": kind,
                "recovery_point_ts": T0 + rp * S if needs_rp or draw(st.booleans()) else None,
                "retention_tier": draw(st.sampled_from([None, "daily", "weekly", "monthly", "yearly"])),
                "received_at": T0 + 300 * S,
            })
        out.append(_frame(rows, Stream.BACKUP))
    return out


def _frame(rows: list[dict[str, Any]], stream: Stream) -> pl.DataFrame:
    schema = SCHEMAS[stream]
    columns = {name: [row.get(name) for row in rows] for name in schema.names()}
    frame = pl.DataFrame(
        {name: values for name, values in columns.items()},
        schema={name: (pl.Int64 if dtype == pl.Datetime("ms", "UTC") else pl.String if isinstance(dtype, pl.Enum) else dtype)
                for name, dtype in schema.items()},
    )
    return frame.cast(schema)


def _same_state(new: pl.DataFrame, old: pl.DataFrame, schema: pl.Schema) -> None:
    assert new.schema == schema
    assert new.get_column("vm_id").is_unique().all()
    assert new.get_column("vm_key").equals(new.select(state.vm_key()).to_series())
    identity = state.REPLICATION_IDENTITY if schema == REPLICATION_SCHEMA else state.BACKUP_IDENTITY
    assert new.get_column("identity_key").equals(new.select(state.identity_key(identity)).to_series())
    assert_frame_equal(new.drop(*DERIVED).sort("vm_id"), old.sort("vm_id"), check_exact=True)


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(batches=replication_batches(3), policies=st.sampled_from(POLICY_SETS))
def test_apply_replication_gives_the_state_of_the_full_join(batches: list[pl.DataFrame], policies: tuple[Policy, ...]) -> None:
    new = pl.DataFrame(schema=REPLICATION_SCHEMA)
    old = pl.DataFrame(schema=REPLICATION_SCHEMA).drop(*DERIVED)
    for batch in batches:
        new = state.apply_replication(new, batch, policies, WINDOW)
        old = old_apply_replication(old, batch, policies, WINDOW)
        _same_state(new, old, REPLICATION_SCHEMA)


@settings(max_examples=200, deadline=None)
@given(batches=backup_batches(3), policies=st.sampled_from(POLICY_SETS))
def test_apply_backup_gives_the_state_of_the_full_join(batches: list[pl.DataFrame], policies: tuple[Policy, ...]) -> None:
    new = pl.DataFrame(schema=BACKUP_SCHEMA)
    old = pl.DataFrame(schema=BACKUP_SCHEMA).drop(*DERIVED)
    for batch in batches:
        new = state.apply_backup(new, batch, policies)
        old = old_apply_backup(old, batch, policies)
        _same_state(new, old, BACKUP_SCHEMA)


@settings(max_examples=100, deadline=None)
@given(batches=replication_batches(2), data=st.data())
def test_a_batch_in_any_order_gives_the_same_replication_state(batches: list[pl.DataFrame], data: st.DataObject) -> None:
    first, second = batches
    table = state.apply_replication(pl.DataFrame(schema=REPLICATION_SCHEMA), first, window=WINDOW)
    order = data.draw(st.permutations(range(second.height)))
    a = state.apply_replication(table, second, window=WINDOW)
    b = state.apply_replication(table, second[list(order)], window=WINDOW)
    assert_frame_equal(a.sort("vm_id"), b.sort("vm_id"), check_exact=True)


def _events(*events: tuple[str, int, str]) -> pl.DataFrame:
    """(vm, ts in s, kind) events of one instance, with recovery points where required."""
    return _frame(
        [
            {"event_id": f"{vm}-{ts_s}-{kind}", "ts": T0 + ts_s * S, "vm_id": vm, "cluster_id": "hci-a",
             "target_id": "hci-c", "technology": "hyperv_replica", "kind": kind, "frequency_s": 30,
             "recovery_point_ts": T0 + (ts_s - 2) * S if kind == "cycle_completed" else None,
             "received_at": T0 + 300 * S}
            for vm, ts_s, kind in events
        ],
        Stream.REPLICATION,
    )


@pytest.mark.parametrize("batches", [
    # A status of higher rank at the table's status time, then the table's status again: the
    # table's run was interrupted (the batch's first event is of yet another status).
    [[("x", 10, "paused")], [("x", 5, "cycle_completed"), ("x", 10, "cycle_failed"), ("x", 20, "paused")]],
    # The same with a lower rank: it sorts before the table's event and does not interrupt.
    [[("x", 10, "cycle_failed")], [("x", 5, "paused"), ("x", 10, "cycle_completed"), ("x", 20, "cycle_failed")]],
    # Status ties inside one batch, across VMs of both reductions (single and repeated).
    [[("x", 10, "cycle_completed"), ("x", 10, "cycle_failed"), ("y", 10, "paused")],
     [("x", 10, "resumed"), ("y", 10, "cycle_missed"), ("z", 30, "resync_required"), ("z", 30, "paused")]],
    # Counters across buckets of the 60 s window, and events older than the table's bucket.
    [[("x", 150, "cycle_completed"), ("x", 190, "cycle_missed")],
     [("x", 50, "cycle_completed"), ("y", 200, "cycle_missed")],
     [("x", 260, "cycle_completed"), ("x", 100, "cycle_missed"), ("y", 70, "cycle_completed")]],
])
def test_handpicked_batches_give_the_state_of_the_full_join(batches: list[list[tuple[str, int, str]]]) -> None:
    new = pl.DataFrame(schema=REPLICATION_SCHEMA)
    old = pl.DataFrame(schema=REPLICATION_SCHEMA).drop(*DERIVED)
    for batch in batches:
        events = _events(*batch)
        new = state.apply_replication(new, events, window=WINDOW)
        old = old_apply_replication(old, events, window=WINDOW)
        _same_state(new, old, REPLICATION_SCHEMA)


# --- row order --------------------------------------------------------------------------------


def _events_for(vms: list[str], ts_s: int, kind: str = "cycle_completed") -> pl.DataFrame:
    return _frame(
        [
            {"event_id": f"{vm}-{ts_s}", "ts": T0 + ts_s * S, "vm_id": vm, "cluster_id": "hci-a", "target_id": "hci-c",
             "technology": "hyperv_replica", "kind": kind, "frequency_s": 30, "recovery_point_ts": T0 + (ts_s - 2) * S,
             "pending_bytes": ts_s, "received_at": T0 + ts_s * S}
            for vm in vms
        ],
        Stream.REPLICATION,
    )


def test_untouched_rows_keep_their_positions_and_new_vms_are_appended() -> None:
    known = [f"vm{i:03d}" for i in range(200)]
    table = state.apply_replication(pl.DataFrame(schema=REPLICATION_SCHEMA), _events_for(known, 10))
    order = table.get_column("vm_id")
    snapshot = table.clone()
    touched = known[5::7]
    batch = pl.concat([_events_for(touched, 20), _events_for(["new-b", "new-a"], 20), _events_for(touched[:3], 21, "paused")])
    after = state.apply_replication(table, batch)

    assert after.height == table.height + 2
    assert after.get_column("vm_id").head(table.height).equals(order)
    assert sorted(after.get_column("vm_id").tail(2).to_list()) == ["new-a", "new-b"]
    untouched = ~pl.col("vm_id").is_in(touched)
    assert_frame_equal(after.head(table.height).filter(untouched), table.filter(untouched))
    last_event = dict(after.select("vm_id", "last_event_ms").iter_rows())
    assert {vm: last_event[vm] for vm in touched} == {vm: T0 + (21 if vm in touched[:3] else 20) * S for vm in touched}
    # The table handed in is a snapshot someone may hold: it must not have changed.
    assert_frame_equal(table, snapshot)


def test_untouched_backup_rows_keep_their_positions_and_the_input_is_not_changed() -> None:
    def events(vms: list[str], ts_s: int, kind: str) -> pl.DataFrame:
        return _frame(
            [{"event_id": f"{vm}-{ts_s}-{kind}", "ts": T0 + ts_s * S, "cluster_id": "hci-a", "vm_id": vm, "job_id": "j",
              "product": "mabs", "level": "host", "kind": kind, "received_at": T0 + ts_s * S,
              "recovery_point_ts": T0 + ts_s * S if kind == "succeeded" else None} for vm in vms],
            Stream.BACKUP,
        )

    known = [f"vm{i:03d}" for i in range(100)]
    table = state.apply_backup(pl.DataFrame(schema=BACKUP_SCHEMA), events(known, 10, "succeeded"))
    snapshot = table.clone()
    failing = known[3::10]
    after = state.apply_backup(table, pl.concat([events(failing, 20, "failed"), events(["new"], 20, "failed")]))
    assert after.get_column("vm_id").head(table.height).equals(table.get_column("vm_id"))
    assert after.get_column("vm_id").tail(1).to_list() == ["new"]
    counts = dict(after.select("vm_id", "consecutive_failures").iter_rows())
    assert all(counts[vm] == (1 if vm in failing else 0) for vm in known)
    assert after.filter(pl.col("vm_id").is_in(failing)).get_column("failure_ts").to_list() == [[T0 + 20 * S]] * len(failing)
    assert_frame_equal(table, snapshot)


def test_a_table_grown_by_many_batches_stays_compact() -> None:
    table = pl.DataFrame(schema=REPLICATION_SCHEMA)
    for n in range(30):
        table = state.apply_replication(table, _events_for([f"vm{n}", "vm0"], 10 + n))
    assert table.height == 30
    assert max(table.n_chunks("all")) == 1
    assert table.get_column("vm_id").to_list() == [f"vm{n}" for n in range(30)]


@pytest.mark.parametrize("pattern, values, expected", [
    ("sg-db-1", ["sg-db-1", "sg-db-10", None, "x"], [True, False, False, False]),
    ("sg-*-1", ["sg-db-1", "sg-web-1", "sg-1", None], [True, True, False, False]),
    ("vm?", ["vm1", "vm12", "vm", "VM1"], [True, False, False, False]),
    ("a.b+c", ["a.b+c", "axb+c", "a.bbc"], [True, False, False]),
])
def test_policy_patterns_match_whole_values(pattern: str, values: list[str | None], expected: list[bool]) -> None:
    policies = (Policy(name="p", match=PolicyMatch(service_group=pattern), backup_rpo_seconds=5),)
    frame = pl.DataFrame({"service_group": values}, schema={"service_group": pl.String})
    got = frame.select(resolve(policies, {"service_group"}, "backup_rpo_seconds", pl.lit(0.0))).to_series()
    assert got.to_list() == [5.0 if hit else 0.0 for hit in expected]
    old = frame.select(_old_resolve(policies, {"service_group"}, "backup_rpo_seconds", pl.lit(0.0))).to_series()
    assert got.equals(old)
