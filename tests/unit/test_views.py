"""Pieces of rules/views.py that the rule tests reach only indirectly."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.views import Pairing


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
