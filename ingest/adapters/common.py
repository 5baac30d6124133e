"""Building blocks the format adapters share: reading container messages in bulk, parsing the
timestamp and enum spellings real tools produce, and writing canonical payloads.

Reading follows the bulk decoder's two paths (ingest/decode.py): the fast path turns every
message of the batch into one NDJSON line `{"records": [...]}` and reads them all with one
`pl.read_ndjson` whose schema names only the fields the adapter uses (scalars as text); a batch
the fast path cannot read whole (a message that is not UTF-8, not JSON or oversized) is
classified message by message, and the well-formed ones are read in one go again. Raw newlines
outside JSON strings are whitespace, so pretty-printed messages (`ConvertTo-Json` indents by
default) are folded onto one line without changing them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl

from ingest.contracts import EVENT_ID_MAX_CHARS
from ingest.decode import MISSING_FIELD, NOT_JSON, NOT_OBJECT, NOT_UTF8, TOO_LARGE

# Reason (metric label) for a record whose VM, instance or replica side the identity rules
# cannot name; the other reasons are the decoder's (ingest/decode.py).
UNMAPPED_IDENTITY = "unmapped_identity"

INDEX = "__index"  # position of the message in the batch
ITEM = "__item"  # position of the record in its message's records
RECORDS = "records"
BOM = b"\xef\xbb\xbf"  # Windows PowerShell 5.1 writes UTF-8 files with one

# One rejected source record: `index` of its message in the batch, `item` its position in the
# message's records (-1: the message as a whole), `stream` the stream it is counted under.
ADAPTER_REJECT_SCHEMA = pl.Schema(
    {"index": pl.Int64(), "item": pl.Int64(), "stream": pl.String(), "reason": pl.String(), "detail": pl.String()}
)

# A message is either one object or an array of them (PowerShell's ConvertTo-Json), or an object
# whose `records` array holds them (Azure Monitor's Event Hubs format).
Container = Literal["object_or_array", "records"]


@dataclass(frozen=True)
class Records:
    """`frame`: one row per source record (INDEX, ITEM, then the requested fields);
    `rejects`: ADAPTER_REJECT_SCHEMA minus `stream` (the caller knows it)."""

    frame: pl.DataFrame
    rejects: pl.DataFrame


_REJECTS_NO_STREAM = pl.Schema({k: v for k, v in ADAPTER_REJECT_SCHEMA.items() if k != "stream"})


def _fold(payload: bytes) -> bytes:
    body = payload[len(BOM) :] if payload.startswith(BOM) else payload
    return body.strip().replace(b"\r", b" ").replace(b"\n", b" ")


def _fast_lines(payloads: Sequence[bytes], container: Container, max_bytes: int) -> list[bytes] | None:
    lines: list[bytes] = []
    for payload in payloads:
        if len(payload) > max_bytes:
            return None
        body = _fold(payload)
        first = body[:1]
        if container == "records":
            if first != b"{":
                return None
            lines.append(body)
        elif first == b"[":
            lines.append(b'{"records":' + body + b"}")
        elif first == b"{":
            lines.append(b'{"records":[' + body + b"]}")
        else:
            return None
    return lines


def _read(lines: list[bytes], fields: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """One row per line; `records` is a list of structs of the fields (null when absent or not
    an array; an element that is not an object is a null struct)."""
    schema = {RECORDS: pl.List(pl.Struct(dict(fields)))}
    if not lines:
        return pl.DataFrame(schema=schema)
    return pl.read_ndjson(io.BytesIO(b"\n".join(lines)), schema=schema, ignore_errors=True)


def _classify(payload: bytes, container: Container, max_bytes: int) -> tuple[bytes | None, tuple[str, str] | None]:
    """Slow path for one message: its NDJSON line, or why it cannot be read."""
    if len(payload) > max_bytes:
        return None, (TOO_LARGE, f"{TOO_LARGE}: {len(payload)} bytes > {max_bytes}")
    body = payload[len(BOM) :] if payload.startswith(BOM) else payload
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, (NOT_UTF8, f"{NOT_UTF8}: {exc.reason} at byte {exc.start}")
    except json.JSONDecodeError as exc:
        return None, (NOT_JSON, f"{NOT_JSON}: {exc.msg} at char {exc.pos}")
    if container == "records":
        if not isinstance(value, dict):
            return None, (NOT_OBJECT, f"{NOT_OBJECT}: a JSON {type(value).__name__}, not an object with records")
        value = value.get(RECORDS)
        if not isinstance(value, list):
            # The same verdict as the fast path, which cannot tell "absent" from "not an array".
            return None, (MISSING_FIELD, f"{MISSING_FIELD}: {RECORDS} (an array of objects)")
    elif isinstance(value, dict):
        value = [value]
    elif not isinstance(value, list):
        return None, (NOT_OBJECT, f"{NOT_OBJECT}: a JSON {type(value).__name__}, not an object or array")
    return json.dumps({RECORDS: value}, separators=(",", ":")).encode(), None


def text_fields(names: Iterable[str]) -> dict[str, pl.DataType]:
    return {name: pl.String() for name in names}


def read_records(
    payloads: Sequence[bytes], container: Container, fields: Mapping[str, pl.DataType], max_bytes: int
) -> Records:
    """Every source record of the batch as a row of the fields (see the module docstring).

    Read a field as text unless it is an object or array the adapter needs the content of:
    polars writes a nested value read as text as JSON, but without escaping backslashes, so
    such text is only good for pattern matching (TimeSpans, dates), not for parsing again."""
    indices: list[int]
    rejects: list[tuple[int, int, str, str]] = []
    lines = _fast_lines(payloads, container, max_bytes)
    frame: pl.DataFrame | None = None
    if lines is not None:
        try:
            b"\n".join(lines).decode("utf-8")
            frame = _read(lines, fields)
            indices = list(range(len(payloads)))
        except (UnicodeDecodeError, pl.exceptions.PolarsError):
            frame = None
    if frame is None or frame.height != len(payloads):
        lines = []
        indices = []
        for index, payload in enumerate(payloads):
            line, why = _classify(payload, container, max_bytes)
            if why is not None:
                rejects.append((index, -1, *why))
            elif line is not None:
                lines.append(line)
                indices.append(index)
        frame = _read(lines, fields)
    frame = frame.with_columns(pl.Series(INDEX, indices, dtype=pl.Int64))
    # A `records` that is missing or not an array (the fast path reads both as null).
    if container == "records":
        for index in frame.filter(pl.col(RECORDS).is_null()).get_column(INDEX).to_list():
            rejects.append((index, -1, MISSING_FIELD, f"{MISSING_FIELD}: {RECORDS} (an array of objects)"))
    exploded = (
        frame.filter(pl.col(RECORDS).is_not_null())
        .with_columns(pl.int_ranges(0, pl.col(RECORDS).list.len(), dtype=pl.Int64).alias(ITEM))
        .explode(RECORDS, ITEM)
        .filter(pl.col(ITEM).is_not_null())
    )
    # An element that is not an object (a number, a string, null).
    for index, item in exploded.filter(pl.col(RECORDS).is_null()).select(INDEX, ITEM).iter_rows():
        rejects.append((index, item, NOT_OBJECT, f"{NOT_OBJECT}: record {item} is not an object"))
    rows = exploded.filter(pl.col(RECORDS).is_not_null()).unnest(RECORDS).select(INDEX, ITEM, *fields.keys())
    return Records(rows, pl.DataFrame(rejects, schema=_REJECTS_NO_STREAM, orient="row"))


def read_object_texts(texts: pl.Series, fields: Iterable[str]) -> pl.DataFrame:
    """Decode a column of JSON object texts (e.g. an object serialized into a JSON string) into
    text fields, one row per input row; a null, or a text that is not an object, gives nulls."""
    fields = list(fields)
    struct = pl.Struct({name: pl.String() for name in fields})
    text = pl.col("t")
    lines = pl.DataFrame({"t": texts}, schema={"t": pl.String()}).select(
        pl.when(text.str.strip_chars_start().str.starts_with("{"))
        .then(pl.lit('{"records":[') + text.str.replace_all(r"[\r\n]", " ") + pl.lit("]}"))
        .otherwise(pl.lit('{"records":[{}]}'))
        .str.join("\n")
    )
    buf = (lines.item() or "").encode()
    try:
        frame = pl.read_ndjson(io.BytesIO(buf), schema={RECORDS: pl.List(struct)}, ignore_errors=True) if buf else None
    except pl.exceptions.PolarsError:
        frame = None
    if frame is None or frame.height != texts.len():
        return pl.DataFrame({name: [None] * texts.len() for name in fields}, schema=dict.fromkeys(fields, pl.String()))
    return frame.select(pl.col(RECORDS).list.first().alias(RECORDS)).unnest(RECORDS)


# --- values ----------------------------------------------------------------------------------


def parse_timestamp_ms(raw: pl.Expr, naive_is_utc: bool) -> pl.Expr:
    """Epoch milliseconds (Int64) from the timestamp spellings of PowerShell and Azure Monitor:
    `/Date(1732442400000)/` (Windows PowerShell 5.1, with an optional `+hhmm` that does not
    change the instant), the same wrapped in 5.1's `{"value": ..., "DisplayHint": ...}` object,
    ISO 8601 / RFC 3339 with an offset (PowerShell 7, Azure), and — only when `naive_is_utc`,
    because Azure Monitor documents its times as UTC — ISO or `M/d/yyyy h:mm:ss tt` without one.
    Null when unparsable."""
    date_ms = raw.str.extract(r"^\s*\\?/Date\((-?\d+)(?:[+-]\d{4})?\)\\?/\s*$", 1)
    wrapped_ms = raw.str.extract(r"^\s*\{.*\"value\"\s*:\s*\"\\?/Date\((-?\d+)", 1)
    wrapped_iso = raw.str.extract(r"^\s*\{.*\"value\"\s*:\s*\"([0-9][^\"]*)\"", 1)
    iso = pl.coalesce(wrapped_iso, raw)
    parsed = [
        pl.coalesce(date_ms, wrapped_ms).cast(pl.Int64, strict=False),
        iso.str.to_datetime(format="%+", time_unit="ms", time_zone="UTC", strict=False).dt.epoch("ms"),
    ]
    if naive_is_utc:
        for fmt in ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%m/%d/%Y %I:%M:%S %p"):
            parsed.append(
                iso.str.to_datetime(format=fmt, time_unit="ms", strict=False)
                .dt.replace_time_zone("UTC")
                .dt.epoch("ms")
            )
    return pl.coalesce(parsed)


def parse_enum(raw: pl.Expr, names: Sequence[str]) -> pl.Expr:
    """The integer value of a .NET enum written as its number (PowerShell's default) or its name
    (PowerShell 7's `-EnumsAsStrings`, any case); null when absent or not a member."""
    by_name = {name.lower(): code for code, name in enumerate(names)}
    text = raw.str.strip_chars()
    number = text.cast(pl.Int64, strict=False)
    named = text.str.to_lowercase().replace_strict(by_name, default=None, return_dtype=pl.Int64)
    code = pl.coalesce(number, named)
    return pl.when(code.is_between(0, len(names) - 1)).then(code).otherwise(None)


def parse_timespan_ms(raw: pl.Expr) -> pl.Expr:
    """Milliseconds (Float64) of a .NET TimeSpan as ConvertTo-Json writes it — an object with
    `Ticks` (100 ns), `TotalMilliseconds`, `TotalSeconds`... — or as its string form
    `[d.]hh:mm:ss[.fffffff]`. Null when it is neither."""
    ticks = raw.str.extract(r"\"Ticks\"\s*:\s*(-?\d+)", 1).cast(pl.Float64, strict=False) / 10_000
    total_ms = raw.str.extract(r"\"TotalMilliseconds\"\s*:\s*(-?[0-9.eE+-]+)", 1).cast(pl.Float64, strict=False)
    total_s = raw.str.extract(r"\"TotalSeconds\"\s*:\s*(-?[0-9.eE+-]+)", 1).cast(pl.Float64, strict=False) * 1000
    parts = raw.str.extract_groups(r"^\s*(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d{1,7}))?\s*$")
    days = parts.struct.field("1").cast(pl.Float64, strict=False).fill_null(0)
    hours = parts.struct.field("2").cast(pl.Float64, strict=False)
    minutes = parts.struct.field("3").cast(pl.Float64, strict=False)
    seconds = parts.struct.field("4").cast(pl.Float64, strict=False)
    fraction = ("0." + parts.struct.field("5").fill_null("0")).cast(pl.Float64, strict=False)
    text_ms = (((days * 24 + hours) * 60 + minutes) * 60 + seconds + fraction) * 1000
    return pl.coalesce(ticks, total_ms, total_s, text_ms)


def event_id(prefix: str, *parts: pl.Expr) -> pl.Expr:
    """A deterministic idempotency key from the source's own ids and times, so a replayed record
    yields the same event. Keys over the contract's 128 characters (long names) are shortened
    to the prefix and a hash of the whole key."""
    key = pl.concat_str([pl.lit(prefix), *[p.cast(pl.String) for p in parts]], separator=":")
    hashed = pl.lit(prefix + ":h:") + key.hash(seed=0x7270_6F77).cast(pl.String)
    return pl.when(key.str.len_chars() > EVENT_ID_MAX_CHARS).then(hashed).otherwise(key)


def to_payloads(frame: pl.DataFrame, columns: Sequence[str]) -> list[bytes]:
    """One canonical JSON object per row (nulls are written as null, which the decoder reads as
    absent). JSON escapes newlines inside strings, so splitting on them is exact."""
    if frame.is_empty():
        return []
    return frame.select(columns).write_ndjson().encode().split(b"\n")[:-1]


def rejects_frame(rows: pl.DataFrame, stream: str) -> pl.DataFrame:
    """ADAPTER_REJECT_SCHEMA rows from a frame with INDEX, ITEM, `reason`, `detail`."""
    return rows.select(
        pl.col(INDEX).alias("index"),
        pl.col(ITEM).alias("item"),
        pl.lit(stream, dtype=pl.String).alias("stream"),
        pl.col("reason"),
        pl.col("detail"),
    ).cast(ADAPTER_REJECT_SCHEMA)


def first_failure(checks: Sequence[tuple[pl.Expr, pl.Expr]]) -> tuple[pl.Expr, pl.Expr]:
    """(reason, detail) of the first failing (condition, detail-expression) pair, per row."""
    detail = pl.coalesce([pl.when(cond.fill_null(False)).then(text) for cond, text in checks])
    return detail.str.extract(r"^([a-z_]+)", 1), detail


def quoted(column: str) -> pl.Expr:
    """` 'value'` of a text column, shortened, for a reject's detail."""
    return pl.lit(" '") + pl.col(column).str.slice(0, 80) + pl.lit("'")


def identity_checks(resolved: str, source: str, field: str, role: str) -> list[tuple[pl.Expr, pl.Expr]]:
    """Rejects for an id the identity rules did not produce: `missing_field` when the source
    value is absent, else `unmapped_identity` (see identity.py)."""
    unresolved = pl.col(resolved).is_null()
    return [
        (unresolved & pl.col(source).is_null(), pl.lit(f"{MISSING_FIELD}: {field}")),
        (unresolved, pl.lit(f"{UNMAPPED_IDENTITY}: {field}") + quoted(source) + pl.lit(f" matches no {role} identity rule")),
    ]
