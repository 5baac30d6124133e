"""What the history store holds: one table per entity kind, their schemas, keys and merge rule.

Every row has a key. Two rows with the same key are two writes of the same fact (a replay after
a crash, an interval flushed at shutdown and continued after the restart, two service instances
during a partition hand-over), so they are merged, never counted twice: `*_max` columns take
the maximum, `*_min` the minimum, and every other value column the value of the row written
last (`last_at_ms`). The merge is idempotent, commutative and associative, so it can run at
compaction, at query time, or both, in any order.

Series tables hold one row per entity per interval (`ts_ms` is the interval's start, UTC epoch
milliseconds, a multiple of `interval_ms`). The alert log holds one row per transition.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Table:
    name: str  # directory under the store's root
    schema: pl.Schema
    key: tuple[str, ...]  # identity of a row; includes the time column
    time: str  # the column files are partitioned by day and pruned on
    max_cols: tuple[str, ...] = ()
    min_cols: tuple[str, ...] = ()
    order: str | None = "last_at_ms"  # which duplicate is "last"; None when any one will do

    @property
    def last_cols(self) -> tuple[str, ...]:
        skip = set(self.key) | set(self.max_cols) | set(self.min_cols) | {self.order}
        return tuple(c for c in self.schema.names() if c not in skip)

    def merge(self, frame: pl.LazyFrame) -> pl.LazyFrame:
        """One row per key (see the module docstring); columns in schema order."""
        last: list[pl.Expr]
        if self.order is None:
            last = [pl.col(c).last() for c in self.last_cols]
            order: list[pl.Expr] = []
        else:
            last = [pl.col(c).sort_by(self.order).last() for c in self.last_cols]
            order = [pl.col(self.order).max()]
        return (
            frame.group_by(list(self.key))
            .agg(
                *[pl.col(c).max() for c in self.max_cols],
                *[pl.col(c).min() for c in self.min_cols],
                *last,
                *order,
            )
            .select(self.schema.names())
        )

    def empty(self) -> pl.DataFrame:
        return pl.DataFrame(schema=self.schema)


def _series_schema(labels: dict[str, pl.DataType], values: dict[str, pl.DataType]) -> pl.Schema:
    return pl.Schema(
        {
            "ts_ms": pl.Int64(),
            "interval_ms": pl.Int64(),
            **labels,
            **values,
            "samples": pl.Int64(),  # evaluation ticks folded into the row (informational)
            "last_at_ms": pl.Int64(),  # evaluation time of the newest of them
        }
    )


S = pl.String()

VM = Table(
    name="vm",
    schema=_series_schema(
        {"vm": S, "hci_cluster": S, "target": S, "technology": S, "service_group": S},
        {
            "lag_max_seconds": pl.Float64(),
            "lag_last_seconds": pl.Float64(),
            "rpo_target_seconds": pl.Float64(),
            "pending_bytes": pl.Int64(),
        },
    ),
    key=("vm", "ts_ms"),
    time="ts_ms",
    max_cols=("lag_max_seconds", "samples"),
)

LINK = Table(
    name="link",
    schema=_series_schema(
        {"hci_cluster": S, "target": S},
        {"saturation_max_ratio": pl.Float64(), "saturation_last_ratio": pl.Float64()},
    ),
    key=("hci_cluster", "target", "ts_ms"),
    time="ts_ms",
    max_cols=("saturation_max_ratio", "samples"),
)

CLUSTER = Table(
    name="cluster",
    schema=_series_schema(
        {"hci_cluster": S},
        {"iops_headroom_min_ratio": pl.Float64(), "iops_headroom_last_ratio": pl.Float64()},
    ),
    key=("hci_cluster", "ts_ms"),
    time="ts_ms",
    max_cols=("samples",),
    min_cols=("iops_headroom_min_ratio",),
)

NODE = Table(
    name="node",
    schema=_series_schema({"hci_cluster": S, "node": S}, {"up_min": pl.Int8(), "up_last": pl.Int8()}),
    key=("hci_cluster", "node", "ts_ms"),
    time="ts_ms",
    max_cols=("samples",),
    min_cols=("up_min",),
)

ALERTS = Table(
    name="alerts",
    schema=pl.Schema(
        {
            "at_ms": pl.Int64(),
            "alertname": S,
            "alert_key": S,
            "transition": S,  # fired | resolved
            "severity": S,
            "hci_cluster": S,
            "vm": S,  # copied out of `labels` so queries can filter without parsing JSON
            "node": S,
            "labels": S,  # JSON object
            "annotations": S,  # JSON object, with the values at the transition
        }
    ),
    key=("alertname", "alert_key", "transition", "at_ms"),
    time="at_ms",
    order=None,
)

SERIES: tuple[Table, ...] = (VM, LINK, CLUSTER, NODE)
ALL: tuple[Table, ...] = (*SERIES, ALERTS)

EPISODE = pl.Struct({"start_ms": pl.Int64(), "end_ms": pl.Int64(), "recovered": pl.Boolean()})

# Per VM per sealed day, written next to the day's compacted file; what compliance reads instead
# of 1,440 rows per VM per day. `episodes` are the day's breaches: runs of consecutive intervals
# with lag_max > RPO, [start_ms, end_ms); `recovered` is null when the run reaches the day's
# last interval (the next day says).
VM_DAILY = Table(
    name="vm_daily",
    schema=pl.Schema(
        {
            "vm": S,
            "hci_cluster": S,
            "target": S,
            "technology": S,
            "service_group": S,
            "first_ts_ms": pl.Int64(),
            "last_ts_ms": pl.Int64(),
            "observed_ms": pl.Int64(),
            "breached_ms": pl.Int64(),
            "episodes": pl.List(EPISODE),
        }
    ),
    key=("vm",),
    time="first_ts_ms",
    order=None,
)

BY_NAME: dict[str, Table] = {t.name: t for t in ALL}
