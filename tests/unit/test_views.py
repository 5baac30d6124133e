"""Pieces of rules/views.py that the rule tests reach only indirectly."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from bench.tick import NOW0_MS, build_state, due_cycles
from rules import state
from rules.views import Aggregates, Pairing, summarise


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
