"""`rpowatch history ...` (contracts.md §5): lag, compliance and alert transitions from the
history store, as a table (with a chart of lag over time), CSV or JSON."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from exporters.history import maintenance, output, params, queries
from exporters.history.store import HistoryStore
from rpowatch.loading import ConfigError, load_settings

EXIT_USAGE = 2
BLOCKS = " ▁▂▃▄▅▆▇█"

history_app = typer.Typer(
    help="Lag, RPO compliance and alert transitions from the history store (table, CSV, JSON).",
    no_args_is_help=True,
)
err = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


PathOpt = Annotated[Path | None, typer.Option("--path", "-p", help="history directory")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="history object-store URL (az://, s3://, gs://, file://)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="take history.path from this configuration")]
StartOpt = Annotated[str | None, typer.Option(help="RFC 3339, a date, Unix seconds, now or now-30d")]
EndOpt = Annotated[str | None, typer.Option(help="like --start; default now")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table, csv or json")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"history: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def open_store(path: Path | None, url: str | None, config: Path | None) -> HistoryStore:
    given = [x for x in (path, url, config) if x is not None]
    if len(given) != 1:
        raise _fail("give exactly one of --path DIR, --url URL or --config FILE")
    if config is not None:
        try:
            settings = load_settings(config)
        except ConfigError as exc:
            for problem in exc.problems:
                typer.echo(str(problem), err=True)
            raise typer.Exit(EXIT_USAGE) from None
        return HistoryStore(settings.history.path, settings.history.plain_storage_options() or None)
    location = str(path) if path is not None else str(url)
    if path is not None and not path.is_dir():
        raise _fail(f"{path} is not a directory")
    return HistoryStore(location)


def _raw(**values: str | Sequence[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = [value] if isinstance(value, str) else list(value)
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _human_seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    seconds = int(round(value))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _cell(column: str, value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if column == "within_rpo_ratio":
            return f"{value * 100:.3f} %"
        if column.endswith("_seconds"):
            return _human_seconds(value)
        return f"{value:.3f}" if not value.is_integer() else f"{value:.0f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# What a table shows per kind: column → header (CSV and JSON carry every column).
DISPLAY: dict[str, dict[str, str]] = {
    "lag": {
        "time": "start (UTC)", "vm": "vm", "lag_max_seconds": "lag max", "lag_last_seconds": "lag last",
        "rpo_target_seconds": "RPO", "within_rpo": "in RPO", "pending_bytes": "pending B",
        "observed_seconds": "observed",
    },
    "compliance": {
        "vm": "vm", "hci_cluster": "hci_cluster", "service_group": "service_group", "vms": "VMs",
        "within_rpo_ratio": "within RPO", "breaches": "breaches", "recovered_breaches": "recovered",
        "longest_breach_seconds": "longest", "mean_time_to_recover_seconds": "MTTR",
        "breached_seconds": "breached", "observed_seconds": "observed",
    },
    "alerts": {
        "time": "time (UTC)", "alertname": "alert", "transition": "transition", "severity": "severity",
        "entity": "vm / node", "hci_cluster": "hci_cluster", "detail": "description",
    },
}


def render_table(kind: str, frame: pl.DataFrame, title: str) -> Table:
    shown = output.present(kind, frame)
    if "time" in shown.columns:
        shown = shown.with_columns(pl.col("time").str.slice(0, 19).str.replace("T", " "))
    if kind == "alerts":
        annotation = pl.col("annotations").str.json_path_match
        shown = shown.with_columns(
            pl.coalesce("vm", "node").alias("entity"),
            pl.coalesce(annotation("$.description"), annotation("$.summary")).alias("detail"),
        )
    if kind == "lag" and shown.get_column("vm").n_unique() == 1:
        shown = shown.drop("vm")
    if kind == "lag" and (shown.get_column("observed_seconds") == shown.get_column("interval_seconds")).all():
        shown = shown.drop("observed_seconds")  # only worth a column when --step merged intervals
    columns = {c: h for c, h in DISPLAY[kind].items() if c in shown.columns}
    cells = [[_cell(c, v) for c, v in zip(columns, row, strict=True)] for row in shown.select(list(columns)).iter_rows()]
    table = Table(title=title, title_justify="left")
    for i, (column, header) in enumerate(columns.items()):
        numeric = shown.schema[column].is_numeric()
        # Values stay whole (a cut VM id or time is useless); only the description wraps.
        widest = min(24, max((len(row[i]) for row in cells), default=1))
        table.add_column(
            header,
            justify="right" if numeric else "left",
            no_wrap=column != "detail",
            min_width=None if column == "detail" else widest,
        )
    for row in cells:
        table.add_row(*row)
    return table


def lag_chart(values: Sequence[float], rpo: Sequence[float | None], width: int, height: int = 8) -> list[tuple[str, list[bool]]]:
    """A bar chart of `values` squeezed into `width` columns (each the max of its points), with
    the RPO drawn as a dashed line where a bar does not cover it. Returns the lines top to
    bottom, each with the per-column "over RPO" flags for colouring."""
    n = len(values)
    if n == 0 or width <= 0 or height <= 0:
        return []
    width = min(width, n)
    cols: list[float] = []
    limits: list[float | None] = []
    for c in range(width):
        lo, hi = c * n // width, max(c * n // width + 1, (c + 1) * n // width)
        cols.append(max(values[lo:hi]))
        known = [r for r in rpo[lo:hi] if r is not None]
        limits.append(min(known) if known else None)
    top = max([*cols, *[r for r in limits if r is not None], 1e-9]) * 1.05
    over = [lim is not None and v > lim for v, lim in zip(cols, limits, strict=True)]
    lines: list[tuple[str, list[bool]]] = []
    for r in range(height, 0, -1):
        row_lo, row_hi = top * (r - 1) / height, top * r / height
        chars = []
        for v, lim in zip(cols, limits, strict=True):
            if v >= row_hi:
                ch = BLOCKS[-1]
            elif v > row_lo:
                ch = BLOCKS[max(1, round((v - row_lo) / (row_hi - row_lo) * 8))]
            elif lim is not None and row_lo <= lim < row_hi:
                ch = "╌"
            else:
                ch = " "
            chars.append(ch)
        lines.append(("".join(chars), over))
    return lines


def print_chart(console: Console, frame: pl.DataFrame) -> None:
    for vm in frame.get_column("vm").unique(maintain_order=True).to_list()[:5]:
        rows = frame.filter(pl.col("vm") == vm).sort("ts_ms")
        values = rows.get_column("lag_max_seconds").fill_null(0.0).to_list()
        rpo = rows.get_column("rpo_target_seconds").to_list()
        width = max(10, console.width - 10)
        chart = lag_chart(values, rpo, width)
        top = max([*values, *[r for r in rpo if r is not None], 0.0]) * 1.05
        console.print(Text(f"lag of {vm} (max per column; ╌ RPO; red: over RPO)", style="bold"))
        for i, (line, over) in enumerate(chart):
            label = _human_seconds(top * (len(chart) - i) / len(chart)) if i in (0, len(chart) // 2) else ""
            text = Text(f"{label:>8} │")
            for ch, bad in zip(line, over, strict=True):
                text.append(ch, style="red" if bad else "green" if ch not in " ╌" else "yellow")
            console.print(text)
        first, last = output.present("lag", rows.head(1)), output.present("lag", rows.tail(1))
        start, end = first.get_column("time")[0], last.get_column("time")[0]
        axis_width = len(chart[0][0]) if chart else 0
        console.print(f"{'':>8} └{'─' * axis_width}")
        console.print(f"{'':>10}{start}{end:>{max(len(end) + 1, axis_width - len(start))}}")


def emit(kind: str, frame: pl.DataFrame, fmt: Format, title: str, chart: bool = False) -> None:
    if fmt is Format.json:
        sys.stdout.write(output.to_json(kind, frame) + "\n")
        return
    if fmt is Format.csv:
        sys.stdout.write(output.to_csv(kind, frame))
        return
    console = Console()
    if frame.is_empty():
        console.print(f"{title}: no data")
        return
    if chart and kind == "lag":
        print_chart(console, frame)
    console.print(render_table(kind, frame, title))


@history_app.command("lag")
def lag_command(
    vm: Annotated[list[str], typer.Option("--vm", help="VM id (repeat for several)")],
    start: StartOpt = None,
    end: EndOpt = None,
    step: Annotated[str | None, typer.Option(help="re-aggregate to this step, e.g. 1h (default: as stored)")] = None,
    fmt: FormatOpt = Format.table,
    chart: Annotated[bool, typer.Option(help="with --format table: draw lag over time")] = True,
    path: PathOpt = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Replication lag of VMs over time: max and last per interval, against the RPO."""
    store = open_store(path, url, config)
    try:
        args = params.series_args("lag", _raw(vm=vm, start=start, end=end, step=step), _now_ms())
    except params.QueryError as exc:
        raise _fail(str(exc)) from None
    frame = queries.series(store, "lag", args.window, args.filters, args.step_ms)
    emit("lag", frame, fmt, f"lag of {', '.join(vm)}", chart=chart)


@history_app.command("compliance")
def compliance_command(
    group_by: Annotated[str, typer.Option("--group-by", help="vm, hci_cluster or service_group")] = "vm",
    start: StartOpt = None,
    end: EndOpt = None,
    vm: Annotated[list[str] | None, typer.Option("--vm", help="only these VMs")] = None,
    hci_cluster: Annotated[list[str] | None, typer.Option("--hci-cluster", help="only these instances")] = None,
    service_group: Annotated[list[str] | None, typer.Option("--service-group", help="only these groups")] = None,
    fmt: FormatOpt = Format.table,
    path: PathOpt = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Share of time within RPO, breaches, longest breach, mean time to recover (default: 30 days)."""
    store = open_store(path, url, config)
    raw = _raw(group_by=group_by, start=start, end=end, vm=vm, hci_cluster=hci_cluster, service_group=service_group)
    try:
        args = params.compliance_args(raw, _now_ms())
    except params.QueryError as exc:
        raise _fail(str(exc)) from None
    frame = queries.compliance(store, args.window, args.group_by, args.filters)
    emit("compliance", frame, fmt, f"RPO compliance by {group_by}")


@history_app.command("alerts")
def alerts_command(
    alertname: Annotated[list[str] | None, typer.Option(help="only these alerts")] = None,
    vm: Annotated[list[str] | None, typer.Option("--vm", help="only alerts about these VMs")] = None,
    hci_cluster: Annotated[list[str] | None, typer.Option("--hci-cluster", help="only these instances")] = None,
    node: Annotated[list[str] | None, typer.Option(help="only these nodes")] = None,
    severity: Annotated[list[str] | None, typer.Option(help="critical, warning, info")] = None,
    transition: Annotated[str | None, typer.Option(help="fired or resolved")] = None,
    start: StartOpt = None,
    end: EndOpt = None,
    fmt: FormatOpt = Format.table,
    path: PathOpt = None,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Alert transitions (fired, resolved) with their values (default: the last 7 days)."""
    store = open_store(path, url, config)
    raw = _raw(
        alertname=alertname, vm=vm, hci_cluster=hci_cluster, node=node, severity=severity,
        transition=transition, start=start, end=end,
    )
    try:
        args = params.alert_args(raw, _now_ms())
    except params.QueryError as exc:
        raise _fail(str(exc)) from None
    frame = queries.alerts(store, args.window, args.filters)
    emit("alerts", frame, fmt, "alert transitions")


@history_app.command("compact")
def compact_command(
    path: PathOpt = None,
    config: ConfigOpt = None,
    min_files: Annotated[int | None, typer.Option(min=2, help="merge a day's small files from this many")] = None,
    seal_after: Annotated[str | None, typer.Option(help="seal a day this long after it ends (e.g. 10m, 0s)")] = None,
    retention: Annotated[str | None, typer.Option(help="remove days older than this (e.g. 400d)")] = None,
) -> None:
    """Compact, seal (with compliance rollups) and prune a local store now (the service does it itself)."""
    store = open_store(path, None, config)
    # Defaults: the configuration's `history` section when --config is given, else its defaults.
    history = load_settings(config).history
    try:
        policy = maintenance.Policy(
            min_files=min_files or history.compaction.min_files,
            seal_after_ms=_duration_ms("--seal-after", seal_after, history.compaction.seal_after),
            retention_ms=_duration_ms("--retention", retention, history.retention) or 1,
            max_sort_rows=history.compaction.max_sort_rows,
        )
    except params.QueryError as exc:
        raise _fail(str(exc)) from None
    report = maintenance.run(store, _now_ms(), policy)
    typer.echo(f"{store.location}: {report}")


def _duration_ms(name: str, text: str | None, default_s: float) -> int:
    if text is None:
        return round(default_s * 1000)
    if text.strip() in ("0", "0s", "0m"):
        return 0
    return params.parse_duration_ms(name, text)
