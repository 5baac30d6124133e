"""Turning what people type (URL parameters, command-line options) into query arguments, with
errors that say what to fix. Shared by the HTTP API and the CLI so both accept the same forms.

Times: RFC 3339 (`2026-11-24T10:00:00Z`, `...+01:00`), a date (`2026-11-24`, midnight UTC),
Unix seconds (`1795000000`, fractions allowed; values above 10^11 are taken as milliseconds,
which is what Grafana's `${__from}` gives), `now`, or `now-<duration>` (`now-30d`).
Durations: `250ms`, `30s`, `5m`, `1h`, `2d` or a number of seconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from exporters.history.compliance import GROUP_BY
from exporters.history.queries import (
    ALERT_FILTERS,
    COMPLIANCE_FILTERS,
    SERIES_FILTERS,
    Window,
)
from exporters.history.store import MAX_MS
from rules.pack import parse_duration

DEFAULT_RANGE_MS = 24 * 3_600_000
MAX_POINTS = 200_000
_RELATIVE = re.compile(r"^now\s*(?:-\s*(.+))?$")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
MS_THRESHOLD = 100_000_000_000


class QueryError(ValueError):
    """A parameter is missing or malformed; the message says which and how to fix it."""


def parse_duration_ms(name: str, text: str) -> int:
    value = text.strip()
    weeks = re.fullmatch(r"(\d+(?:\.\d+)?)\s*w", value)  # Grafana's $__interval can say 1w
    try:
        seconds = float(weeks.group(1)) * 7 * 86_400 if weeks else parse_duration(value)
    except ValueError:
        raise QueryError(f"{name}={text!r} is not a duration; use e.g. 30s, 5m, 1h or 2d") from None
    ms = round(seconds * 1000)
    if ms <= 0:
        raise QueryError(f"{name}={text!r} must be longer than zero")
    return ms


def parse_time(name: str, text: str, now_ms: int) -> int:
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        return now_ms - (parse_duration_ms(name, relative.group(1)) if relative.group(1) else 0)
    if _NUMBER.match(value):
        number = float(value)
        return round(number) if number >= MS_THRESHOLD else round(number * 1000)
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            return round(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise QueryError(
            f"{name}={text!r} is not a time; use RFC 3339 with an offset (2026-11-24T10:00:00Z), "
            "a date (2026-11-24), Unix seconds, now or now-30d"
        )
    return round(parsed.timestamp() * 1000)


def window(start: str | None, end: str | None, now_ms: int, default_range_ms: int = DEFAULT_RANGE_MS) -> Window:
    end_ms = parse_time("end", end, now_ms) if end else now_ms
    start_ms = parse_time("start", start, now_ms) if start else end_ms - default_range_ms
    for name, value in (("start", start_ms), ("end", end_ms)):
        if not 0 <= value <= MAX_MS:
            raise QueryError(f"{name} is out of range; give a time between 1970 and 9999")
    if end_ms <= start_ms:
        raise QueryError(f"start ({start or 'default'}) must be before end ({end or 'now'})")
    return Window(start_ms, end_ms)


@dataclass(frozen=True)
class SeriesArgs:
    name: str
    window: Window
    filters: dict[str, list[str]]
    step_ms: int | None


@dataclass(frozen=True)
class ComplianceArgs:
    window: Window
    group_by: str
    filters: dict[str, list[str]]


@dataclass(frozen=True)
class AlertArgs:
    window: Window
    filters: dict[str, list[str]]


Params = Mapping[str, Sequence[str]]


def _single(params: Params, name: str) -> str | None:
    values = [v for v in params.get(name, []) if v != ""]
    if len(values) > 1:
        raise QueryError(f"{name} given {len(values)} times; give it once")
    return values[0] if values else None


def _filters(params: Params, allowed: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in allowed:
        values = [v for raw in params.get(name, []) for v in raw.split(",") if v != ""]
        if values:
            out[name] = values
    return out


def _check_known(params: Params, allowed: Sequence[str]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise QueryError(f"unknown parameter {', '.join(unknown)}; this query takes {', '.join(allowed)}")


def series_args(name: str, params: Params, now_ms: int) -> SeriesArgs:
    """`/api/v1/history/lag|link|cluster|node`: labels to filter by, start, end, step."""
    labels = SERIES_FILTERS[name]
    _check_known(params, (*labels, "start", "end", "step"))
    filters = _filters(params, labels)
    if name == "lag" and "vm" not in filters:
        raise QueryError("vm is required: give vm=<VM id> (several: vm=a&vm=b or vm=a,b)")
    w = window(_single(params, "start"), _single(params, "end"), now_ms)
    step_text = _single(params, "step")
    step_ms = parse_duration_ms("step", step_text) if step_text else None
    if step_ms is not None and (w.end_ms - w.start_ms) // step_ms > MAX_POINTS:
        need = -(-(w.end_ms - w.start_ms) // MAX_POINTS) // 1000
        raise QueryError(f"step={step_text} gives more than {MAX_POINTS} points; use step of at least {need}s")
    return SeriesArgs(name, w, filters, step_ms)


def compliance_args(params: Params, now_ms: int) -> ComplianceArgs:
    _check_known(params, ("group_by", *COMPLIANCE_FILTERS, "start", "end"))
    group_by = _single(params, "group_by") or "vm"
    if group_by not in GROUP_BY:
        raise QueryError(f"group_by={group_by!r} is not supported; use one of {', '.join(GROUP_BY)}")
    w = window(_single(params, "start"), _single(params, "end"), now_ms, default_range_ms=30 * 86_400_000)
    return ComplianceArgs(w, group_by, _filters(params, COMPLIANCE_FILTERS))


def alert_args(params: Params, now_ms: int) -> AlertArgs:
    _check_known(params, (*ALERT_FILTERS, "start", "end"))
    filters = _filters(params, ALERT_FILTERS)
    bad = set(filters.get("transition", [])) - {"fired", "resolved"}
    if bad:
        raise QueryError(f"transition={','.join(sorted(bad))} is not one; use fired or resolved")
    w = window(_single(params, "start"), _single(params, "end"), now_ms, default_range_ms=7 * 86_400_000)
    return AlertArgs(w, filters)
