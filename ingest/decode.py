"""Bulk decoding: a batch of raw payloads in, a DataFrame of valid events and one of rejects out.

The fast path is one `pl.read_ndjson` over the concatenated payloads with every field read as
text, then one `select` of vectorized checks and casts. Only a batch that the fast path cannot
read whole (a payload that is not UTF-8, not JSON, not an object, oversized, or has a raw
newline) takes the slow path, which classifies each payload in Python, so one poison record
costs its batch a little time and never the valid records around it.
"""

from __future__ import annotations

import io
import json
from itertools import repeat
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from ingest.contracts import (
    EVENT_ID_MAX_CHARS,
    FIELDS,
    REJECT_SCHEMA,
    SCHEMAS,
    STORAGE_DTYPE,
    TIMESTAMP,
    FieldSpec,
    Stream,
)

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_MAX_FUTURE_SKEW_MS = 5 * 60 * 1000

# Reasons are metric label values: a short, fixed vocabulary.
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
TOO_LARGE = "too_large"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
UNKNOWN_ENUM = "unknown_enum"
NEGATIVE_VALUE = "negative_value"
BAD_TIMESTAMP = "bad_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
INVALID_VALUE = "invalid_value"

REASONS = (
    NOT_UTF8,
    NOT_JSON,
    NOT_OBJECT,
    TOO_LARGE,
    MISSING_FIELD,
    WRONG_TYPE,
    UNKNOWN_ENUM,
    NEGATIVE_VALUE,
    BAD_TIMESTAMP,
    FUTURE_TIMESTAMP,
    INVALID_VALUE,
)

_RAW = "__raw_"  # prefix of the text columns read from JSON
_INDEX = "__index"


@dataclass(frozen=True)
class DecodeLimits:
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS


@dataclass(frozen=True)
class Decoded:
    """`valid` has the stream's contract schema; `rejects` has REJECT_SCHEMA, one row for each
    rejected payload, `index` being its position in the input batch."""

    stream: Stream
    valid: pl.DataFrame
    rejects: pl.DataFrame


def _raw_schema(stream: Stream) -> dict[str, pl.DataType]:
    return {spec.name: pl.String() for spec in FIELDS[stream]}


def _read_text_columns(stream: Stream, lines: bytes) -> pl.DataFrame:
    frame = pl.read_ndjson(io.BytesIO(lines), schema=_raw_schema(stream), ignore_errors=True)
    return frame.rename({name: _RAW + name for name in frame.columns})


def _text_fields(stream: Stream) -> list[str]:
    return [spec.name for spec in FIELDS[stream] if spec.kind in ("id", "str")]


# What `read_ndjson` makes of a JSON number or boolean read into a text column.
_SCALAR_TEXT = r"^(?:-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false)$"


def _non_string_text_fields(frame: pl.DataFrame, names: list[str], buf: bytes) -> bool:
    """Whether a text field was given a JSON number or boolean (`"vm_id": 42`), which
    `read_ndjson` silently turns into text. Only fields with a value that reads like one are
    searched for in the raw bytes (ids are rarely bare numbers); a match inside a string value
    only sends the batch to the slow path, which checks each record's types exactly."""
    looks = frame.select(pl.col(_RAW + n).str.contains(_SCALAR_TEXT).any().alias(n) for n in names).row(0, named=True)
    suspects = [n for n in names if looks[n]]
    if not suspects:
        return False
    pattern = rf'"(?:{"|".join(suspects)})"\s*:\s*[-0-9tf]'
    return bool(pl.Series([buf]).cast(pl.String).str.contains(pattern).any())


def _fast_read(stream: Stream, payloads: Sequence[bytes], limits: DecodeLimits) -> pl.DataFrame | None:
    """All payloads as text columns in one read, or None when the batch needs the slow path."""
    # read_ndjson would take a JSON array or scalar line as an all-null row, so anything that
    # does not start as an object goes to the slow path (leading whitespace there is fine).
    # Both checks run in C over the whole batch (map with builtins, no Python frame per record).
    if max(map(len, payloads)) > limits.max_payload_bytes or not all(map(bytes.startswith, payloads, repeat(b"{"))):
        return None
    buf = b"\n".join(payloads)
    if buf.count(b"\n") != len(payloads) - 1:
        return None  # a payload with a raw newline (pretty-printed JSON, or an empty one)
    try:
        if not buf.isascii():  # ASCII is UTF-8; only other text needs the (copying) check
            buf.decode("utf-8")
        frame = _read_text_columns(stream, buf)
        if _non_string_text_fields(frame, _text_fields(stream), buf):
            return None  # the slow path names the field
    except (UnicodeDecodeError, pl.exceptions.PolarsError):
        return None
    if frame.height != len(payloads):
        return None
    return frame.with_row_index(_INDEX).with_columns(pl.col(_INDEX).cast(pl.Int64))


def _slow_read(
    stream: Stream, payloads: Sequence[bytes], limits: DecodeLimits
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Classify each payload; the well-formed objects are then read in one go as above."""
    indices: list[int] = []
    lines: list[bytes] = []
    rejects: list[tuple[int, str, str]] = []
    text_fields = _text_fields(stream)
    for index, payload in enumerate(payloads):
        if len(payload) > limits.max_payload_bytes:
            rejects.append(
                (index, TOO_LARGE, f"{TOO_LARGE}: {len(payload)} bytes > {limits.max_payload_bytes}")
            )
            continue
        try:
            value = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            rejects.append((index, NOT_UTF8, f"{NOT_UTF8}: {exc.reason} at byte {exc.start}"))
            continue
        except json.JSONDecodeError as exc:
            rejects.append((index, NOT_JSON, f"{NOT_JSON}: {exc.msg} at char {exc.pos}"))
            continue
        if not isinstance(value, dict):
            rejects.append((index, NOT_OBJECT, f"{NOT_OBJECT}: a JSON {type(value).__name__}"))
            continue
        not_text = [name for name in text_fields if value.get(name) is not None and not isinstance(value[name], str)]
        if not_text:
            rejects.append((index, WRONG_TYPE, f"{WRONG_TYPE}: {not_text[0]} must be a string"))
            continue
        indices.append(index)
        lines.append(json.dumps(value, separators=(",", ":")).encode())
    if lines:
        frame = _read_text_columns(stream, b"\n".join(lines))
    else:
        frame = pl.DataFrame(schema={_RAW + k: v for k, v in _raw_schema(stream).items()})
    frame = frame.with_columns(pl.Series(_INDEX, indices, dtype=pl.Int64))
    reject_frame = pl.DataFrame(rejects, schema=REJECT_SCHEMA, orient="row")
    return frame, reject_frame


# --- per-field typing and checks ----------------------------------------------------------------


def _parse_timestamp(raw: pl.Expr) -> pl.Expr:
    epoch_ms = raw.str.contains(r"^-?\d{1,15}$")
    return (
        pl.when(epoch_ms)
        .then(raw.cast(pl.Int64, strict=False).cast(TIMESTAMP))
        .otherwise(raw.str.to_datetime(format="%+", time_unit="ms", time_zone="UTC", strict=False))
    )


def _typed(spec: FieldSpec) -> pl.Expr:
    raw = pl.col(_RAW + spec.name)
    match spec.kind:
        case "id" | "str":
            return raw
        case "ts":
            return _parse_timestamp(raw)
        case "int":
            return raw.cast(pl.Int64, strict=False)
        case "float":
            return raw.cast(pl.Float64, strict=False)
        case "enum":
            if spec.name == "frequency_s":
                return raw.cast(pl.Int64, strict=False)
            return raw.cast(pl.Enum(list(spec.choices)), strict=False)
        case "storage":
            return raw  # decoded separately: see _decode_storage
    raise AssertionError(spec.kind)


def _checks(spec: FieldSpec, received_at_ms: int, limits: DecodeLimits) -> list[tuple[str, pl.Expr]]:
    """(detail, failing-condition) pairs for one field, in the order they are reported."""
    raw = pl.col(_RAW + spec.name)
    typed = pl.col(spec.name)
    present = raw.is_not_null()
    out: list[tuple[str, pl.Expr]] = []
    if spec.required:
        out.append((f"{MISSING_FIELD}: {spec.name}", ~present | (raw == "")))
    if spec.required_for_kinds:
        needed = pl.col(_RAW + "kind").is_in(list(spec.required_for_kinds))
        out.append((f"{MISSING_FIELD}: {spec.name} (required for this kind)", needed & ~present))
    match spec.kind:
        case "id":
            # A nested object or array arrives here as its JSON text.
            out.append((f"{WRONG_TYPE}: {spec.name} must be a string", present & raw.str.contains(r"^[\[{]")))
            if spec.name == "event_id":
                out.append(
                    (
                        f"{INVALID_VALUE}: event_id longer than {EVENT_ID_MAX_CHARS} characters",
                        raw.str.len_chars() > EVENT_ID_MAX_CHARS,
                    )
                )
        case "enum":
            choices = ", ".join(spec.choices)
            out.append((f"{UNKNOWN_ENUM}: {spec.name} must be one of {choices}", present & typed.is_null()))
            if spec.name == "frequency_s":
                out.append(
                    (
                        f"{UNKNOWN_ENUM}: {spec.name} must be one of {choices}",
                        present & ~typed.is_in([int(c) for c in spec.choices]).fill_null(False),
                    )
                )
        case "int" | "float":
            word = "an integer" if spec.kind == "int" else "a number"
            bad_type = present & typed.is_null()
            if spec.kind == "float":
                bad_type = bad_type | (present & typed.is_not_null() & ~typed.is_finite())
            out.append((f"{WRONG_TYPE}: {spec.name} must be {word}", bad_type))
            out.append((f"{NEGATIVE_VALUE}: {spec.name} must be >= 0", typed < 0))
        case "ts":
            out.append(
                (
                    f"{BAD_TIMESTAMP}: {spec.name} must be RFC 3339 with an offset or epoch milliseconds",
                    present & typed.is_null(),
                )
            )
            limit = received_at_ms + limits.max_future_skew_ms
            out.append(
                (
                    f"{FUTURE_TIMESTAMP}: {spec.name} is more than "
                    f"{limits.max_future_skew_ms // 1000} s ahead of arrival",
                    typed.dt.epoch("ms") > limit,
                )
            )
        case "str" | "storage":
            pass
    return out


def _decode_storage(frame: pl.DataFrame) -> pl.DataFrame:
    """Decode the heartbeat's nested `storage` list; a malformed one rejects its record."""
    raw_name = _RAW + "storage"
    raw = frame.get_column(raw_name)
    try:
        decoded = raw.str.json_decode(STORAGE_DTYPE)
        bad = pl.Series("__storage_bad", [False] * frame.height)
    except pl.exceptions.PolarsError:
        values: list[object] = []
        flags: list[bool] = []
        for text in raw.to_list():
            try:
                values.append(None if text is None else pl.Series([text]).str.json_decode(STORAGE_DTYPE)[0])
                flags.append(False)
            except pl.exceptions.PolarsError:
                values.append(None)
                flags.append(True)
        decoded = pl.Series(values, dtype=STORAGE_DTYPE)
        bad = pl.Series("__storage_bad", flags)
    return frame.with_columns(decoded.alias("storage"), bad)


def _validate(
    stream: Stream, frame: pl.DataFrame, received_at_ms: int, limits: DecodeLimits
) -> tuple[pl.DataFrame, pl.DataFrame]:
    specs = FIELDS[stream]
    typed_cols = [_typed(spec).alias(spec.name) for spec in specs if spec.kind != "storage"]
    frame = frame.with_columns(typed_cols)
    checks = [c for spec in specs for c in _checks(spec, received_at_ms, limits)]
    if any(spec.kind == "storage" for spec in specs):
        frame = _decode_storage(frame)
        checks.append((f"{WRONG_TYPE}: storage must be a list of storage path objects", pl.col("__storage_bad")))
    # Whether a record fails any check is one boolean pass; the text naming the first failed
    # check is built for the failing records only (usually none).
    frame = frame.with_columns(pl.any_horizontal([cond.fill_null(False) for _, cond in checks]).alias("__bad"))
    bad = frame.filter(pl.col("__bad"))
    detail = pl.coalesce([pl.when(cond.fill_null(False)).then(pl.lit(text)) for text, cond in checks])
    rejects = bad.select(pl.col(_INDEX).alias("index"), detail.alias("detail")).select(
        "index", pl.col("detail").str.extract(r"^([a-z_]+)", 1).alias("reason"), "detail"
    )
    valid = (frame.filter(~pl.col("__bad")) if bad.height else frame).select(
        *[pl.col(spec.name) for spec in specs],
        pl.lit(received_at_ms).cast(TIMESTAMP).alias("received_at"),
    )
    return valid.cast(SCHEMAS[stream]), rejects


def decode_batch(
    stream: Stream,
    payloads: Sequence[bytes],
    received_at_ms: int,
    limits: DecodeLimits = DecodeLimits(),
) -> Decoded:
    """Decode and validate one batch. Never raises on bad input: every payload ends up either
    in `valid` or in `rejects` with a reason."""
    if not payloads:
        return Decoded(stream, pl.DataFrame(schema=SCHEMAS[stream]), pl.DataFrame(schema=REJECT_SCHEMA))
    fast = _fast_read(stream, payloads, limits)
    if fast is not None:
        frame, early_rejects = fast, pl.DataFrame(schema=REJECT_SCHEMA)
    else:
        frame, early_rejects = _slow_read(stream, payloads, limits)
    valid, rejects = _validate(stream, frame, received_at_ms, limits)
    all_rejects = pl.concat([early_rejects, rejects]).sort("index")
    return Decoded(stream, valid, all_rejects)
