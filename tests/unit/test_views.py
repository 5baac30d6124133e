"""Pieces of rules/views.py that the rule tests reach only indirectly."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from bench.tick import NOW0_MS, build_state, due_cycles, load_engine
from rules import state
from rules.describe import LABELS_SCHEMA, alert_id
from rules.engine import TickResult
from rules.views import (
    ENTITIES,
    Aggregates,
    GatherMemo,
    JoinMemo,
    Pairing,
    ViewParams,
    Views,
    _vm,
    _with_prediction,
    summarise,
)


def table(names: list[int], collide: bool = False) -> pl.DataFrame:
    """A VM table: `vm_id` from the names, `vm_key` its hash (or one key for all: collisions)."""
    return pl.DataFrame(
        {"vm_key": [7 if collide else n for n in names], "vm_id": [f"vm{n}" for n in names]},
        schema={"vm_key": pl.UInt64, "vm_id": pl.String},
    )


def expected(rows: list[int], mine: pl.DataFrame, other: pl.DataFrame) -> list[int | None]:
    ids = other.get_column("vm_id").to_list()
    return [ids.index(v) if v in ids else None for v in mine.get_column("vm_id").gather(rows).to_list()]


def test_pairing_finds_partners_of_later_versions_of_both_tables() -> None:
    replication, backup = table([50, 10, 40]), table([40, 30, 50])
    pairing = Pairing.of(replication, backup)
    # Rows keep their positions; new VMs are appended on either side.
    later_replication, later_backup = table([50, 10, 40, 70, 30]), table([40, 30, 50, 10, 80])
    rows = pl.Series([0, 1, 2, 3, 4], dtype=pl.UInt32)
    found = pairing.partners(rows, later_replication, later_backup, of_replication=True).to_list()
    assert found == [2, 3, 0, None, 1]  # 10 got its backup since, 30 its replica; 70 has no backup
    assert found == expected(rows.to_list(), later_replication, later_backup)
    back = pairing.partners(pl.Series([3, 4], dtype=pl.UInt32), later_backup, later_replication, of_replication=False)
    assert back.to_list() == [1, None]


def test_a_hash_collision_pairs_nothing() -> None:
    replication, backup = table([1, 2], collide=True), table([3, 1], collide=True)
    pairing = Pairing.of(replication, backup)
    assert pairing.backup_row.to_list() == [1, None]
    assert pairing.replication_row.to_list() == [None, 0]


@settings(max_examples=200, deadline=None)
@given(
    first=st.lists(st.integers(0, 60), unique=True, max_size=30),
    other_first=st.lists(st.integers(0, 60), unique=True, max_size=30),
    appended=st.lists(st.integers(61, 120), unique=True, max_size=10),
    other_appended=st.lists(st.integers(0, 120), max_size=10),
    collide=st.booleans(),
)
def test_pairing_agrees_with_matching_on_vm_id(
    first: list[int], other_first: list[int], appended: list[int], other_appended: list[int], collide: bool
) -> None:
    pairing = Pairing.of(table(first, collide), table(other_first, collide))
    extra = [n for n in dict.fromkeys(other_appended) if n not in other_first]
    later, other_later = table(first + appended, collide), table(other_first + extra, collide)
    rows = list(range(later.height))
    found = pairing.partners(pl.Series(rows, dtype=pl.UInt32), later, other_later, of_replication=True)
    assert found.to_list() == expected(rows, later, other_later)
    back_rows = list(range(other_later.height))
    back = pairing.partners(pl.Series(back_rows, dtype=pl.UInt32), other_later, later, of_replication=False)
    assert back.to_list() == expected(back_rows, other_later, later)


# --- summarise: what a refresh reuses from the previous aggregates ------------------------------

def sorted_frames(a: Aggregates) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return (
        a.links.sort("link_key"),
        a.service_groups.sort("service_group", "hci_cluster"),
        a.storage_vms.sort("hci_cluster", "storage_path"),
    )


def assert_same_aggregates(reused: Aggregates, fresh: Aggregates, fleet: state.FleetState) -> None:
    """Equal sums, and per VM row the same link and the same partner in the other table."""
    for got, want in zip(sorted_frames(reused), sorted_frames(fresh)):
        assert_frame_equal(got, want)  # float sums to a relative 1e-5: their order may differ
    link_of = [reused.links.get_column("link_key").gather(reused.link_row), fresh.links.get_column("link_key").gather(fresh.link_row)]
    assert link_of[0].equals(link_of[1])
    assert link_of[0].equals(fleet.replication.get_column("link_key"))
    rows = pl.int_range(fleet.replication.height, dtype=pl.UInt32, eager=True)
    for a in (reused, fresh):
        partners = a.pairing.partners(rows, fleet.replication, fleet.backup, of_replication=True)
        assert partners.to_list() == fresh.pairing.backup_row.to_list()


def test_a_refresh_reuses_what_ingest_did_not_change_and_recomputes_the_rest() -> None:
    fleet = build_state(3_000, 100)
    first = summarise(fleet, NOW0_MS)
    # A second of steady-state traffic: lags, churn and pending bytes change, placement does not.
    events = due_cycles(fleet, NOW0_MS + 10_000)
    assert events.height > 50
    fleet = replace(fleet, replication=state.apply_replication(fleet.replication, events))
    reused = summarise(fleet, NOW0_MS + 10_000, first)
    assert reused.service_groups is first.service_groups and reused.pairing is first.pairing
    assert reused.link_row is first.link_row
    assert not reused.links.equals(first.links)  # the sums moved
    assert_same_aggregates(reused, summarise(fleet, NOW0_MS + 10_000), fleet)

    # One VM moves to another storage path and another service group: placement recomputed.
    moved = events.head(1).with_columns(
        pl.lit("elsewhere-csv9").alias("storage_path_id"), pl.lit("billing-moved-1").alias("service_group"),
        (pl.col("event_id") + "-moved"), (pl.col("ts") + pl.duration(seconds=1)),
    )
    fleet = replace(fleet, replication=state.apply_replication(fleet.replication, moved))
    after_move = summarise(fleet, NOW0_MS + 20_000, reused)
    assert after_move.service_groups is not reused.service_groups
    assert "billing-moved-1" in after_move.service_groups.get_column("service_group").to_list()
    assert_same_aggregates(after_move, summarise(fleet, NOW0_MS + 20_000), fleet)

    # New VMs (a new instance with a new link): links re-indexed, the pairing looks them up.
    newcomers = events.head(5).with_columns(
        ("new-" + pl.col("vm_id")).alias("vm_id"), pl.lit("hci-new-00001").alias("cluster_id"),
        ("new-" + pl.col("event_id")).alias("event_id"),
    )
    fleet = replace(fleet, replication=state.apply_replication(fleet.replication, newcomers))
    grown = summarise(fleet, NOW0_MS + 30_000, after_move)
    assert grown.link_row is not after_move.link_row
    assert_same_aggregates(grown, summarise(fleet, NOW0_MS + 30_000), fleet)


def test_aggregates_of_other_tables_are_not_reused() -> None:
    one, other = build_state(2_000, 100), build_state(2_100, 50)
    from_other = summarise(other, NOW0_MS, summarise(one, NOW0_MS))
    assert_same_aggregates(from_other, summarise(other, NOW0_MS), other)
    assert from_other.pairing.replication_keys.len() == other.replication.height


# --- the per-VM link figures a tick gathers, kept between ticks ------------------------------


def firing_keys(result: TickResult, alert: str) -> set[str]:
    firing = result.alerts.filter((pl.col("alertname") == alert) & (pl.col("state") == "firing"))
    return set(firing.get_column("alert_key").to_list())


def test_the_link_figures_kept_between_ticks_follow_a_change_of_capacity() -> None:
    fleet = build_state(3_000, 100)
    engine = load_engine()
    engine.fleet = fleet
    before = firing_keys(engine.tick(NOW0_MS), "ReplicationRPOAtRisk")
    engine.tick(NOW0_MS + 1_000)  # the same figures: the gather is reused
    # Every node's network capacity cut to a thousandth: links saturate, VMs fall at risk.
    engine.fleet = replace(fleet, nodes=fleet.nodes.with_columns(pl.col("net_capacity_bytes_per_s") / 1000))
    after = firing_keys(engine.tick(NOW0_MS + 2_000), "ReplicationRPOAtRisk")
    fresh = load_engine()
    fresh.fleet = engine.fleet
    assert after == firing_keys(fresh.tick(NOW0_MS + 2_000), "ReplicationRPOAtRisk")
    assert len(after) > len(before) + 100


def test_a_gather_memo_answers_for_the_figures_and_rows_it_was_made_from() -> None:
    memo = GatherMemo()
    links = pl.DataFrame({"needed": [1.0, 2.0, 3.0], "capacity": [10.0, 10.0, None]})
    rows = pl.Series([2, 0, 0, 1], dtype=pl.UInt32)
    first = memo.gathered(links, rows)
    assert first.to_dict(as_series=False) == {"needed": [3.0, 1.0, 1.0, 2.0], "capacity": [None, 10.0, 10.0, 10.0]}
    assert memo.gathered(links.clone(), rows.clone()) is first  # equal figures, equal rows
    changed = memo.gathered(links.with_columns(pl.col("capacity").fill_null(5.0)), rows)
    assert changed.get_column("capacity").to_list() == [5.0, 10.0, 10.0, 10.0]
    moved = memo.gathered(links, pl.Series([1, 1, 0, 2], dtype=pl.UInt32))
    assert moved.get_column("needed").to_list() == [2.0, 2.0, 1.0, 3.0]


def test_a_join_memo_answers_only_for_the_keys_it_was_made_from() -> None:
    memo = JoinMemo()
    left = pl.DataFrame({"k": ["a", "b", "c"]})
    right = pl.DataFrame({"k": ["c", "d", "a"]})
    first = memo.rows("x", left, right, "full")
    assert sorted(first.rows(), key=str) == sorted([("a", 0, 2), ("b", 1, None), ("c", 2, 0), ("d", None, 1)], key=str)
    assert memo.rows("x", left.clone(), right.clone(), "full") is first  # equal keys: no join
    # A key changed on either side, or another join of the same tables: joined again.
    assert memo.rows("x", left, pl.DataFrame({"k": ["c", "b"]}), "full").sort("k").rows() == [
        ("a", 0, None), ("b", 1, 1), ("c", 2, 0)
    ]
    assert memo.rows("y", left, right, "left").rows() == [("a", 0, 2), ("b", 1, None), ("c", 2, 0)]


def test_the_instance_link_and_path_views_follow_instances_and_paths_coming_and_going() -> None:
    """The views join small tables by positions kept between ticks; whatever instances and
    paths come and go, they must hold what the joins give on the tables as they are."""
    fleet = build_state(2_000, 100)
    engine = load_engine()
    engine.fleet = fleet
    engine.tick(NOW0_MS)
    paths, skews = fleet.storage_paths, fleet.clusters
    steps = [
        fleet,  # the same keys, other values
        replace(fleet, storage_paths=paths.with_columns(pl.col("free_bytes") // 2)),
        replace(fleet, storage_paths=paths.head(40), clusters=skews.head(12)),  # reports lost
        replace(
            fleet,  # a path only a node reports, an instance only its skew names, rows reordered
            storage_paths=pl.concat([paths.tail(30), paths.head(5).with_columns(pl.lit("extra-csv").alias("path_id"))]),
            clusters=pl.concat([skews.reverse(), skews.head(1).with_columns(pl.lit("hci-far-away").alias("cluster_id"))]),
        ),
        replace(fleet, nodes=fleet.nodes.filter(pl.col("cluster_id") != "hci-ams-00002")),  # an instance's nodes gone
    ]
    for step, later in enumerate(steps):
        engine.fleet = later
        now_ms = NOW0_MS + (step + 1) * 1_000
        views = engine.tick(now_ms).views
        aggregates = engine._aggregates_at(now_ms)
        reported = later.storage_paths.select(
            pl.col("cluster_id").alias("hci_cluster"), pl.col("path_id").alias("storage_path"), "free_bytes"
        )
        want_paths = reported.join(
            aggregates.storage_vms, on=["hci_cluster", "storage_path"], how="full", coalesce=True
        ).with_columns(pl.col("vms").fill_null(0))
        got_paths = views.storage_path.select(want_paths.columns)
        assert_frame_equal(got_paths.sort("hci_cluster", "storage_path"), want_paths.sort("hci_cluster", "storage_path"))
        instances = views.cluster
        nodes = later.nodes.group_by(pl.col("cluster_id").alias("hci_cluster")).agg(pl.len().alias("nodes"))
        want_instances = (
            nodes.join(aggregates.replica_vms, on="hci_cluster", how="left")
            .join(later.clusters.select(pl.col("cluster_id").alias("hci_cluster"), pl.col("clock_skew_s").alias("clock_skew_seconds")), on="hci_cluster", how="full", coalesce=True)
            .with_columns(pl.col("nodes", "replica_vms").fill_null(0))
        )
        assert_frame_equal(
            instances.select(want_instances.columns).sort("hci_cluster"), want_instances.sort("hci_cluster"), check_dtypes=False
        )
        capacity = views.cluster.select("hci_cluster", "net_capacity_bytes_per_s")
        want_links = aggregates.links.select("hci_cluster", "target").join(capacity, on="hci_cluster", how="left", maintain_order="left")
        assert_frame_equal(views.link.select("hci_cluster", "target", pl.col("capacity_bytes_per_s").alias("net_capacity_bytes_per_s")), want_links)


def test_materialising_a_per_vm_view_leaves_the_ticks_queries_as_they_were() -> None:
    """A scrape or the history writer builds the full per-VM views of a tick; the next tick
    reads those views again (annotations of alerts that ended) and must still run its narrow
    query over the state, not gather the whole frame and hash its labels."""
    fleet = build_state(2_000, 100)
    engine = load_engine()
    engine.fleet = fleet
    views = engine.tick(NOW0_MS).views
    rows = pl.Series([3, 1_500], dtype=pl.UInt32)
    before = {e: views.lazy(e, {"vm", "hci_cluster"}, rows=rows) for e in ("vm_replication", "vm_backup")}
    plans = {e: q.explain() for e, q in before.items()}
    for entity in before:
        views.of(entity)
        after = views.lazy(entity, {"vm", "hci_cluster"}, rows=rows)
        assert after.explain() == plans[entity]
        assert_frame_equal(after.collect(), before[entity].collect())
    # Frames given to `replace` are what the views show, their labels hashed for the ids.
    given = views.replace(vm_backup=views.vm_backup.head(5))
    ids = given.lazy("vm_backup", None, rows=pl.Series([0, 4], dtype=pl.UInt32)).collect()
    assert ids.get_column("vm").to_list() == views.vm_backup.get_column("vm").gather([0, 4]).to_list()
    assert ids.get_column("__identity").to_list() == fleet.backup.get_column("identity_key").gather([0, 4]).to_list()


def test_time_to_breach_is_the_earlier_of_the_two_signals() -> None:
    """The prediction as the module docstring defines it, the minimum of the trend's and the
    backlog's answers (each `rpo − lag` or +Inf), on random rows with nulls."""
    rng = random.Random(5)

    def val(lo: float, hi: float) -> float | None:
        return None if rng.random() < 0.1 else rng.uniform(lo, hi)

    n = 5_000
    base = pl.DataFrame(
        {
            "lag_seconds": [val(0, 3000) for _ in range(n)],
            "rpo_target_seconds": [val(0, 2000) for _ in range(n)],
            "frequency_s": [rng.choice([None, 30, 300, 900]) for _ in range(n)],
            "churn_bytes_per_s": [val(0, 5e6) for _ in range(n)],
            "pending_bytes": [None if rng.random() < 0.1 else rng.randrange(0, 10**10) for _ in range(n)],
            "status": ["replicating"] * n,
            "resync_needed": [False] * n,
            "missed_cycles_ratio": [0.0] * n,
            "link_key": [0] * n,
        },
        schema_overrides={"frequency_s": pl.Int64},
    )
    links = pl.DataFrame({"needed_bytes_per_s": [val(0, 1e9) for _ in range(n)], "capacity_bytes_per_s": [val(0, 1e9) for _ in range(n)]})
    got = _with_prediction(base.lazy(), links.lazy(), ViewParams()).collect().get_column("time_to_breach_seconds")

    lag, rpo, f = pl.col("lag_seconds"), pl.col("rpo_target_seconds"), pl.col("frequency_s").cast(pl.Float64)
    churn, needed, capacity = pl.col("churn_bytes_per_s").fill_null(0.0), pl.col("needed_bytes_per_s"), pl.col("capacity_bytes_per_s")
    achievable = pl.when(needed <= capacity).then(capacity - needed + churn).otherwise(capacity * churn / needed)
    transfer = pl.when(achievable > 0).then((pl.col("pending_bytes").fill_null(0).cast(pl.Float64) + churn * f) / achievable)
    until = pl.max_horizontal(rpo - lag, pl.lit(0.0))
    inf = pl.lit(float("inf"))
    trend = pl.when(lag > f * 1.5).then(until).otherwise(inf)
    backlog = pl.when((pl.max_horizontal(lag, f) + transfer > rpo).fill_null(False)).then(until).otherwise(inf)
    want = pl.concat([base, links], how="horizontal").select(pl.min_horizontal(trend, backlog)).to_series()
    assert got.eq_missing(want).all()
    assert got.is_finite().sum() > n // 10  # both answers occur


# --- the `vm` view: both kinds of protection side by side, for VMs out of policy ----------------

_FLEET = build_state(1_200, 100)


def vm_view_by_join(fleet: state.FleetState, now_ms: int) -> pl.DataFrame:
    """What `vm` must hold, by the obvious full join on `vm_id` (late: behind its RPO; a null
    RPO is neither late nor within it)."""
    def side(table: pl.DataFrame, last: str, rpo: str, prefix: str) -> pl.DataFrame:
        late = pl.coalesce(last, "first_seen_ms") < now_ms - pl.col(rpo) * 1000
        return table.select("vm_id", pl.col("cluster_id").alias(f"{prefix}_cluster"), late.alias(f"{prefix}_late"), pl.lit(True).alias(f"{prefix}_has"))

    joined = side(fleet.replication, "last_recovery_point_ms", "rpo_target_s", "r").join(
        side(fleet.backup, "last_success_ms", "backup_rpo_s", "b"), on="vm_id", how="full", coalesce=True
    )
    return joined.filter(pl.col("r_late").fill_null(False) | pl.col("b_late").fill_null(False)).select(
        pl.col("vm_id").alias("vm"),
        pl.coalesce("r_cluster", "b_cluster").alias("hci_cluster"),
        (pl.col("r_late") == False).fill_null(False).alias("replica_within_rpo"),  # noqa: E712
        (pl.col("b_late") == False).fill_null(False).alias("backup_within_rpo"),  # noqa: E712
        pl.col("r_has").fill_null(False).alias("replicated"),
        pl.col("b_has").fill_null(False).alias("backed_up"),
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    replicas_then=st.integers(600, 1_200),
    backups_then=st.integers(600, 1_200),
    clock_s=st.integers(0, 7_200),
)
def test_the_vm_view_agrees_with_a_join_on_vm_id(seed: int, replicas_then: int, backups_then: int, clock_s: int) -> None:
    """On random fleets: VMs missing from either table, null RPOs, and rows appended to both
    tables since the pairing was made (looked up at the tick, not paired)."""
    rng = random.Random(seed)
    keep = pl.Series([rng.random() < 0.8 for _ in range(_FLEET.backup.height)])
    null_rpo = pl.Series([rng.random() < 0.05 for _ in range(_FLEET.replication.height)])
    backup = _FLEET.backup.filter(keep).sample(fraction=1.0, shuffle=True, seed=seed)
    replication = _FLEET.replication.with_columns(
        pl.when(null_rpo).then(None).otherwise(pl.col("rpo_target_s")).alias("rpo_target_s")
    )
    now_ms = NOW0_MS + clock_s * 1000
    earlier = replace(_FLEET, replication=replication.head(replicas_then), backup=backup.head(backups_then))
    fleet = replace(_FLEET, replication=replication, backup=backup)
    aggregates = summarise(earlier, now_ms)
    if not aggregates.pairing.reusable(fleet.replication, fleet.backup):  # too many rows since
        aggregates = replace(summarise(fleet, now_ms), pairing=aggregates.pairing)
    got = _vm(fleet, now_ms, aggregates).sort("vm")
    want = vm_view_by_join(fleet, now_ms).sort("vm")
    assert_frame_equal(got, want)
    assert got.height > 0


# --- labels and annotations rendered for many alerts at once ------------------------------------


def test_rendering_many_alerts_at_once_equals_rendering_each_alone() -> None:
    """The describer reads the rows of all rules of one entity in one query and slices them
    per rule; the result must be what rendering each alert on its own gives, whatever the
    order of the rows and however the rules interleave."""
    engine = load_engine()
    engine.fleet = build_state(2_000, 100)
    result = engine.tick(NOW0_MS + 7_200_000)
    views, describer = result.views, engine._describer
    active, _ = engine._active(views, [])
    rules = active.get_column("rule").unique()
    assert rules.len() >= 6  # several rules of several entities
    rows = active.group_by("rule").head(7).sample(fraction=1.0, shuffle=True, seed=4)
    def identities(views: Views, rows: pl.DataFrame) -> pl.DataFrame:
        return describer.identities(views, rows).identity

    for render in (identities, describer.annotations):
        together = render(views, rows).sort("alert_id")
        alone = pl.concat([render(views, rows.slice(i, 1)) for i in range(rows.height)]).sort("alert_id")
        assert_frame_equal(together, alone)
        assert together.height == rows.height


def test_labels_rebuilt_from_the_alert_key_equal_labels_rendered_from_the_views() -> None:
    """An alert's labels are rebuilt when read from its rule and `alert_key`; they must be the
    very JSON rendering them from the entity's view at birth gives, for every rule and entity
    (keys of one and of four values, empty values)."""
    engine = load_engine()
    engine.fleet = build_state(2_000, 100)
    result = engine.tick(NOW0_MS + 7_200_000)
    views, describer = result.views, engine._describer
    active, _ = engine._active(views, [])
    assert active.get_column("rule").n_unique() >= 6

    def from_views(index: int, part: pl.DataFrame) -> pl.DataFrame:
        names = ENTITIES[describer.rules[index].spec.entity].labels
        values = [pl.col(c).cast(pl.String).fill_null("").alias(c) for c in names]
        return part.select(alert_id(describer.rules[index].spec.entity, describer.salts[index]),
                           describer._label_json(index, values).alias("labels"))

    want = describer._render(views, active, describer._identity_reads, from_views, LABELS_SCHEMA)
    rows = result.alerts.filter(pl.col("alert_id").is_in(active.get_column("alert_id").implode()))
    got = describer.labels(rows.select("alert_id", "rule", "alert_key"))
    assert got.height == want.height == active.height
    assert_frame_equal(got.sort("alert_id"), want.sort("alert_id"))
    # A key of one value is that value, whatever it holds (it is never split).
    index = next(i for i, r in enumerate(describer.rules) if ENTITIES[r.spec.entity].labels == ("hci_cluster",))
    odd = pl.DataFrame({"alert_id": [7], "rule": [index], "alert_key": ["hci\x1fa"]},
                       schema={"alert_id": pl.UInt64, "rule": pl.UInt16, "alert_key": pl.String})
    (labels,) = describer.labels(odd).get_column("labels").to_list()
    assert json.loads(labels)["hci_cluster"] == "hci\x1fa"
    assert labels == pl.select(describer._label_json(index, [pl.lit("hci\x1fa").alias("hci_cluster")])).item()
