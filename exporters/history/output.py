"""Query results as people and Grafana read them: times in RFC 3339, seconds not milliseconds,
one flat object per row (JSON), or CSV."""

from __future__ import annotations

import json
import math
from typing import Any

import polars as pl

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"


def _time(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Datetime("ms", "UTC")).dt.to_string(_TIME_FORMAT).alias("time")


def _seconds(column: str, name: str) -> pl.Expr:
    return (pl.col(column).cast(pl.Float64) / 1000.0).alias(name)


def present(kind: str, frame: pl.DataFrame) -> pl.DataFrame:
    """The columns a user sees for `kind` (lag, link, cluster, node, alerts, compliance)."""
    if kind == "compliance":
        return frame
    if kind == "alerts":
        return frame.select(
            _time("at_ms"), "alertname", "transition", "severity", "hci_cluster", "vm", "node", "labels", "annotations"
        )
    skip = {"ts_ms", "interval_ms", "observed_ms", "samples", "last_at_ms"}
    rest = [c for c in frame.columns if c not in skip]
    return frame.select(
        _time("ts_ms"),
        *rest,
        _seconds("interval_ms", "interval_seconds"),
        _seconds("observed_ms", "observed_seconds"),
    )


def to_records(kind: str, frame: pl.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows; alert labels and annotations as objects."""
    rows = present(kind, frame).to_dicts()
    if kind == "alerts":
        for row in rows:
            row["labels"] = json.loads(row["labels"]) if row["labels"] else {}
            row["annotations"] = json.loads(row["annotations"]) if row["annotations"] else {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):  # NaN and ±Inf are not JSON
                row[key] = None
    return rows


def to_json(kind: str, frame: pl.DataFrame) -> str:
    if kind == "alerts":  # labels and annotations become objects, so through Python
        return json.dumps(to_records(kind, frame), allow_nan=False)
    # polars writes rows of flat objects itself, NaN and ±Inf as null, ten times faster.
    return present(kind, frame).write_json()


def to_csv(kind: str, frame: pl.DataFrame) -> str:
    return present(kind, frame).write_csv()
