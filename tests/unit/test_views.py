"""Pieces of rules/views.py that the rule tests reach only indirectly."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.views import KeyIndex


def table(keys: list[int]) -> pl.DataFrame:
    return pl.DataFrame({"vm_key": keys, "vm_id": [f"vm{k}" for k in keys]}, schema={"vm_key": pl.UInt64, "vm_id": pl.String})


def test_key_index_finds_rows_of_a_later_version_of_the_table() -> None:
    index = KeyIndex.of(table([50, 10, 40]))
    later = table([50, 10, 40, 70, 20])  # rows keep their positions; new VMs are appended
    found = index.find(later, pl.Series([20, 10, 99, 70], dtype=pl.UInt64))
    assert sorted(found.to_list()) == [1, 3, 4]  # 10 at row 1, 70 and 20 appended; 99 absent


def test_key_index_scans_when_the_table_shrank() -> None:
    index = KeyIndex.of(table([50, 10, 40]))
    assert index.find(table([40, 10]), pl.Series([10], dtype=pl.UInt64)).to_list() == [1]


@settings(max_examples=200, deadline=None)
@given(
    first=st.lists(st.integers(0, 60), unique=True, max_size=30),
    appended=st.lists(st.integers(61, 120), unique=True, max_size=10),
    wanted=st.lists(st.integers(0, 130), unique=True, max_size=20),
)
def test_key_index_agrees_with_a_scan(first: list[int], appended: list[int], wanted: list[int]) -> None:
    index = KeyIndex.of(table(first))
    later = table(first + appended)
    found = index.find(later, pl.Series(wanted, dtype=pl.UInt64)).to_list()
    keys = later.get_column("vm_key").to_list()
    assert sorted(found) == sorted(keys.index(k) for k in wanted if k in keys)
