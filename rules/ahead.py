"""What `Engine.prepare` evaluates ahead of a tick, for the tick to take instead of evaluating
every row: the per-VM conditions' true rows at the tick's instant, matched with the alert
table the tick starts from (`Ahead`), and, per per-VM table, the rows written since
(`Journal`), which the tick evaluates again. `Matched` is how the tick then tells its alerts'
fate from them. See `Engine._evaluate_ahead` for why the results are exact."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from rules import state
from rules.views import ROW, Aggregates, LateRows, written_mask


@dataclass(frozen=True)
class Ahead:
    """What `Engine.prepare` found true, per per-VM query (by index), for a tick at `now_ms`,
    and the inputs it was found from besides the rows themselves. A tick at that instant with
    the same inputs evaluates only the rows written since (`Journal`) and takes the others'
    results from here.

    `parts` are the query's true (rule, row) pairs (ACTIVE_SCHEMA) with `known`: whether the
    alert table the next tick starts from (`alerts`, the one after the last tick) has that
    alert. `found` says, per row of `alerts`, whether a query found it true ahead. With them
    the tick matches its true rows with its alerts (which are new, which alerts hold) without
    a membership test of one against the other (~8 ms at a million VMs)."""

    now_ms: int
    held: tuple[str, ...]
    aggregates: Aggregates
    links: pl.DataFrame | None  # the link figures the linked queries read (None: no such query)
    parts: dict[int, pl.DataFrame]
    alerts: pl.DataFrame
    found: pl.Series | None  # None: not matched (two rows found the same alert id)
    late: LateRows | None  # views.late_rows at `now_ms` (None: no rule reads the `vm` view)


@dataclass(frozen=True)
class Written:
    """Rows written to a table since prepare: their positions, and a flag per row of the
    table (None when there are none)."""

    rows: pl.Series
    mask: pl.Series | None


@dataclass(frozen=True)
class Matched:
    """A tick's true rows matched with the alert table `Engine.prepare` matched its own with."""

    alerts: pl.DataFrame
    still: pl.Series  # per alert row: true by a row found ahead and not written since
    new_ahead: pl.DataFrame  # rows found ahead, not written since, that no alert has (ACTIVE_SCHEMA)
    fresh: pl.DataFrame  # the rows evaluated at the tick (ACTIVE_SCHEMA)

    def resolve(self) -> tuple[pl.Series, pl.DataFrame]:
        """Per alert row whether it is true now, and the true rows no alert has: the rows
        evaluated at the tick (a few thousand) are matched here, the others were ahead."""
        ids = self.alerts.get_column("alert_id")
        in_fresh = ids.is_in(self.fresh.get_column("alert_id").implode())
        known = ids.filter(in_fresh)
        new_fresh = self.fresh.filter(~pl.col("alert_id").is_in(known.implode()))
        return self.still | in_fresh, pl.concat([self.new_ahead, new_fresh])


class Journal:
    """The rows written to one per-VM table since the version `Engine.prepare` evaluated:
    `current` is the version they lead to, None once the table was replaced some other way
    (then nothing evaluated ahead of it can be used)."""

    def __init__(self, table: pl.DataFrame) -> None:
        self.current: pl.DataFrame | None = table
        self.rows: list[pl.Series] = []
        # What `since` last gave (a tick asks twice: for the conditions and for the late rows).
        self._since: Written | None = None

    def record(self, before: pl.DataFrame, after: pl.DataFrame, rows: pl.Series) -> None:
        self._since = None
        if self.current is not before:
            self.current = None
            return
        self.current = after
        if not rows.is_empty():
            self.rows.append(rows)

    def since(self, table: pl.DataFrame) -> Written | None:
        """The rows written since, if `table` is the version they lead to; else None."""
        if self.current is not table:
            return None
        if self._since is None:
            rows = pl.concat(self.rows).unique().alias(ROW) if self.rows else pl.Series(ROW, [], dtype=pl.UInt32)
            self._since = Written(rows, written_mask(table.height, rows))
        return self._since


def per_vm_table(fleet: state.FleetState, entity: str) -> pl.DataFrame:
    return fleet.replication if entity == "vm_replication" else fleet.backup


def found_ahead(alerts: pl.DataFrame, parts: dict[int, pl.DataFrame]) -> pl.Series | None:
    """Per row of `alerts`: whether one of `parts` found it true; None if two rows found the
    same alert id (a hash collision: the tick then matches by membership tests)."""
    ids = pl.concat([frame.get_column("alert_id") for frame in parts.values()])
    if ids.n_unique() != ids.len():
        return None
    return alerts.get_column("alert_id").is_in(ids.implode())
