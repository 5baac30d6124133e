"""Bulk decoding: a batch of raw payloads in, a DataFrame of valid events and one of rejects out.

The fast path is one `pl.read_ndjson` over the concatenated payloads, numbers read as numbers
and every other field as text (or, when some number field holds something else, every field
as text), then a few vectorized passes: the casts, one row of cheap batch-wide checks, and
per-record checks only for what may fail. Only a batch that the fast path cannot read whole
(a payload that is not UTF-8, not JSON, not an object, oversized, or has a raw newline) takes
the slow path, which classifies each payload in Python, so one poison record costs its batch
a little time and never the valid records around it.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
_FUTURE_LIMIT = "__future_limit"  # epoch ms: a timestamp beyond is too far ahead


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


def _number_dtype(spec: FieldSpec) -> pl.DataType | None:
    """The dtype the typed read gives a field that is a JSON number on the wire; None: text."""
    if spec.kind == "int" or spec.name == "frequency_s":
        return pl.Int64()
    if spec.kind == "float":
        return pl.Float64()
    return None


def _read_schema(stream: Stream, typed: bool) -> dict[str, pl.DataType]:
    return {spec.name: (_number_dtype(spec) if typed else None) or pl.String() for spec in FIELDS[stream]}


def _read_columns(stream: Stream, lines: bytes, typed: bool) -> pl.DataFrame:
    """One `read_ndjson` of NDJSON lines, every field as text, or (`typed`) numbers as numbers.

    The typed read is strict on purpose. Without `ignore_errors`, polars 2.1 raises on any value
    an Int64 column cannot hold as it is (1.5, 1.0, 1e3, true, "12", [..], {..}, beyond i64) and
    on any non-number in a Float64 column (true, "1.5", [..], {..}; integers become floats), as
    it does on a line that is not a JSON object or not JSON. So a typed read that succeeds holds
    exactly what casting the text read would give, and one that raises tells the caller to read
    text, where each such value is rejected per record (`ignore_errors` would turn them into
    nulls, which read the same as absent fields). Text columns take any JSON value as text."""
    schema = _read_schema(stream, typed)
    frame = pl.read_ndjson(lines, schema=schema, ignore_errors=not typed)
    frame.columns = [_RAW + name for name in frame.columns]  # in place: cheaper than rename
    return frame


def _read_typed_or_text(stream: Stream, lines: bytes) -> tuple[pl.DataFrame, bool]:
    """The typed read, or the text read when a number field holds something else."""
    try:
        return _read_columns(stream, lines, typed=True), True
    except pl.exceptions.PolarsError:
        return _read_columns(stream, lines, typed=False), False


def _text_fields(stream: Stream) -> list[str]:
    return [spec.name for spec in FIELDS[stream] if spec.kind in ("id", "str")]


# What `read_ndjson` makes of a JSON number or boolean read into a text column.
_SCALAR_TEXT = r"^(?:-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false)$"


def _non_string_text_fields(frame: pl.DataFrame, names: list[str], buf: bytes) -> bool:
    """Whether a text field was given a JSON number or boolean (`"vm_id": 42`), which
    `read_ndjson` silently turns into text. Only fields with a value that reads like one are
    searched for in the raw bytes (ids are rarely bare numbers); a match inside a string value
    only sends the batch to the slow path, which checks each record's types exactly."""
    # The text of a number starts with "-" or a digit, so it sorts before ":"; a column with
    # no such value, and no "true" or "false", cannot hold one. Comparisons are far cheaper
    # than the regex (mostly a look at the first bytes), which then runs on the columns left.
    maybe = frame.select(
        ((pl.col(_RAW + n) < ":") | (pl.col(_RAW + n) == "true") | (pl.col(_RAW + n) == "false")).any().alias(n)
        for n in names
    ).row(0, named=True)
    names = [n for n in names if maybe[n]]
    if not names:
        return False
    looks = frame.select(pl.col(_RAW + n).str.contains(_SCALAR_TEXT).any().alias(n) for n in names).row(0, named=True)
    suspects = [n for n in names if looks[n]]
    if not suspects:
        return False
    pattern = rf'"(?:{"|".join(suspects)})"\s*:\s*[-0-9tf]'
    return bool(pl.Series([buf]).cast(pl.String).str.contains(pattern).any())


_FIRST_BYTE = operator.itemgetter(0)
_LAST_BYTE = operator.itemgetter(-1)


def _fast_read(stream: Stream, payloads: Sequence[bytes], limits: DecodeLimits) -> tuple[pl.DataFrame, bool] | None:
    """All payloads in one read (typed if it can be, see `_read_columns`), or None when the
    batch needs the slow path. The bool says whether the numbers were read typed."""
    # The checks on payloads run in C over the whole batch (map with builtins and itemgetter,
    # no Python frame per record); a set of first bytes is cheaper than startswith per payload.
    if max(map(len, payloads)) > limits.max_payload_bytes:
        return None
    try:
        # read_ndjson would take a JSON array or scalar line as an all-null row, so anything
        # that does not start as an object goes to the slow path (leading whitespace there is
        # fine).
        if set(map(_FIRST_BYTE, payloads)) != {ord("{")}:
            return None
        closed = set(map(_LAST_BYTE, payloads)) == {ord("}")}
    except IndexError:
        return None  # an empty payload
    buf = b"\n".join(payloads)
    lines = len(payloads)
    # A payload with a raw newline (pretty-printed JSON) goes to the slow path. When every
    # payload starts with "{" and ends with "}", such a payload has two lines that are not
    # blank, each of which the strict typed read makes a row or an error of, so the row count
    # below proves there is none, and the count of newlines (a byte loop over the whole
    # batch, the costliest check here) is left out.
    if not closed and buf.count(b"\n") != lines - 1:
        return None
    try:
        if not buf.isascii():  # ASCII is UTF-8; only other text needs the (copying) check
            buf.decode("utf-8")
        try:
            frame, typed = _read_columns(stream, buf, typed=True), True
        except pl.exceptions.PolarsError:
            # A number field holding something else, or a batch that is not all JSON objects:
            # the text read rejects the former per record, naming the field. Its row count
            # proves nothing about newlines (ignore_errors), so they are counted first.
            if closed and buf.count(b"\n") != lines - 1:
                return None
            frame, typed = _read_columns(stream, buf, typed=False), False
        if _non_string_text_fields(frame, _text_fields(stream), buf):
            return None  # the slow path names the field
    except (UnicodeDecodeError, pl.exceptions.PolarsError):
        return None
    if frame.height != lines:
        return None
    frame.insert_column(0, pl.int_range(0, lines, dtype=pl.Int64, eager=True).alias(_INDEX))
    return frame, typed


class _NotJsonConstant(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON has no such values."""


def _not_json_constant(name: str) -> None:
    raise _NotJsonConstant(name)


def _slow_read(
    stream: Stream, payloads: Sequence[bytes], limits: DecodeLimits
) -> tuple[pl.DataFrame, pl.DataFrame, bool]:
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
            value = json.loads(payload.decode("utf-8"), parse_constant=_not_json_constant)
        except UnicodeDecodeError as exc:
            rejects.append((index, NOT_UTF8, f"{NOT_UTF8}: {exc.reason} at byte {exc.start}"))
            continue
        except json.JSONDecodeError as exc:
            rejects.append((index, NOT_JSON, f"{NOT_JSON}: {exc.msg} at char {exc.pos}"))
            continue
        except _NotJsonConstant as exc:
            rejects.append((index, NOT_JSON, f"{NOT_JSON}: {exc} is not a JSON value"))
            continue
        if not isinstance(value, dict):
            rejects.append((index, NOT_OBJECT, f"{NOT_OBJECT}: a JSON {type(value).__name__}"))
            continue
        not_text = [name for name in text_fields if value.get(name) is not None and not isinstance(value[name], str)]
        if not_text:
            rejects.append((index, WRONG_TYPE, f"{WRONG_TYPE}: {not_text[0]} must be a string"))
            continue
        try:
            # A number too large for a double (1e400) parses as infinity, which JSON cannot
            # write back and polars refuses: the record is rejected, not the batch.
            line = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:
            rejects.append((index, INVALID_VALUE, f"{INVALID_VALUE}: a number out of range"))
            continue
        indices.append(index)
        lines.append(line)
    if lines:
        frame, typed = _read_typed_or_text(stream, b"\n".join(lines))
    else:
        frame, typed = pl.DataFrame(schema={_RAW + k: v for k, v in _read_schema(stream, False).items()}), False
    frame = frame.with_columns(pl.Series(_INDEX, indices, dtype=pl.Int64))
    reject_frame = pl.DataFrame(rejects, schema=REJECT_SCHEMA, orient="row")
    return frame, reject_frame, typed


# --- per-field typing and checks ----------------------------------------------------------------


def _parse_timestamp(raw: pl.Expr) -> pl.Expr:
    """RFC 3339 with an offset, or epoch milliseconds (an integer, read as its text)."""
    epoch_ms = raw.str.contains(r"^-?\d{1,15}$")
    # No cache: nearly every timestamp of a batch is distinct, so a cache only adds hashing.
    rfc3339 = raw.str.to_datetime(format="%+", time_unit="ms", time_zone="UTC", strict=False, cache=False)
    return pl.when(epoch_ms).then(raw.cast(pl.Int64, strict=False).cast(TIMESTAMP)).otherwise(rfc3339)


# The spelling nearly every producer uses, `2026-11-25T09:46:30.123Z` (ASCII digits only; a
# leap second, :60, is left to the full parse).
_COMMON_TIMESTAMP = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-5][0-9]\.[0-9]{3}Z"


@functools.cache
def _parse_common_timestamp(name: str) -> pl.Expr:
    """Field `name` if in the common spelling, else null; for every value it parses, the same
    instant as `_parse_timestamp` (which also rejects what this does: no such day, hour 24),
    at half its cost: the whole seconds go through a cache (a batch holds few distinct
    seconds) and the milliseconds are added as a number."""
    raw = pl.col(_RAW + name)
    seconds = raw.str.slice(0, 19).str.to_datetime(
        "%Y-%m-%dT%H:%M:%S", time_unit="ms", time_zone="UTC", strict=False, cache=True
    )
    millis = raw.str.slice(20, 3).cast(pl.Int64, strict=False)
    common = raw.str.contains(f"^{_COMMON_TIMESTAMP}$")
    return pl.when(common).then(seconds + pl.duration(milliseconds=millis)).alias(name)


_COMMON_TIMESTAMP_RE = re.compile(_COMMON_TIMESTAMP)


def _starts_common(frame: pl.DataFrame, name: str) -> bool:
    """Whether the first value of timestamp field `name` has the common spelling."""
    first = frame.get_column(_RAW + name).first(ignore_nulls=True)
    return isinstance(first, str) and _COMMON_TIMESTAMP_RE.fullmatch(first) is not None


def _typed(spec: FieldSpec) -> pl.Expr:
    """The contract-typed column of a field (see `_validate` for the common timestamp
    spelling). Numbers the typed read already typed cast for free."""
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


class _Check(NamedTuple):
    """One check of one field. `fails` is per record; `may_fail` is one boolean for the batch,
    true whenever some record fails (and possibly when none does), and cheaper: most are
    statistics (null counts, least or greatest value) rather than a pass over the values."""

    detail: str
    fails: pl.Expr
    may_fail: pl.Expr


def _check(detail: str, fails: pl.Expr, may_fail: pl.Expr | None = None) -> _Check:
    return _Check(detail, fails, fails.any() if may_fail is None else may_fail)


def _checks(spec: FieldSpec, limits: DecodeLimits, typed_read: bool) -> list[_Check]:
    """The checks of one field, in the order they are reported. `typed_read`: numbers were
    read typed, so their wrong-type checks cannot fail and are left out (a JSON number is
    always finite: polars refuses 1e400 as it refuses any bad JSON)."""
    raw = pl.col(_RAW + spec.name)
    typed = pl.col(spec.name)
    present = raw.is_not_null()
    # Present but not typed (not parsed or not a choice): the typed column's extra nulls.
    unparsed = present & typed.is_null(), typed.null_count() > raw.null_count()
    numeric = typed_read and _number_dtype(spec) is not None
    out: list[_Check] = []
    if spec.required:
        detail = f"{MISSING_FIELD}: {spec.name}"
        if numeric:
            out.append(_check(detail, ~present, raw.null_count() > 0))
        else:
            out.append(_check(detail, ~present | (raw == ""), (raw.null_count() > 0) | (raw == "").any()))
    if spec.required_for_kinds:
        needed = pl.col(_RAW + "kind").is_in(list(spec.required_for_kinds))
        out.append(_check(f"{MISSING_FIELD}: {spec.name} (required for this kind)", needed & ~present))
    match spec.kind:
        case "id":
            # A nested object or array arrives here as its JSON text.
            nested = raw.str.starts_with("{") | raw.str.starts_with("[")  # cheaper than a regex
            out.append(_check(f"{WRONG_TYPE}: {spec.name} must be a string", nested))
            if spec.name == "event_id":
                out.append(
                    _check(
                        f"{INVALID_VALUE}: event_id longer than {EVENT_ID_MAX_CHARS} characters",
                        raw.str.len_chars() > EVENT_ID_MAX_CHARS,
                        raw.str.len_bytes().max() > EVENT_ID_MAX_CHARS,  # never fewer bytes than characters
                    )
                )
        case "enum":
            choices = ", ".join(spec.choices)
            if not numeric:
                out.append(_check(f"{UNKNOWN_ENUM}: {spec.name} must be one of {choices}", *unparsed))
            if spec.name == "frequency_s":
                out.append(
                    _check(
                        f"{UNKNOWN_ENUM}: {spec.name} must be one of {choices}",
                        present & ~typed.is_in([int(c) for c in spec.choices]).fill_null(False),
                    )
                )
        case "int" | "float":
            if not numeric:
                word = "an integer" if spec.kind == "int" else "a number"
                if spec.kind == "int":
                    out.append(_check(f"{WRONG_TYPE}: {spec.name} must be {word}", *unparsed))
                else:
                    infinite = present & typed.is_not_null() & ~typed.is_finite()
                    out.append(_check(f"{WRONG_TYPE}: {spec.name} must be {word}", unparsed[0] | infinite))
            out.append(_check(f"{NEGATIVE_VALUE}: {spec.name} must be >= 0", typed < 0, typed.min() < 0))
        case "ts":
            detail = f"{BAD_TIMESTAMP}: {spec.name} must be RFC 3339 with an offset or epoch milliseconds"
            out.append(_check(detail, *unparsed))
            limit = pl.col(_FUTURE_LIMIT)
            out.append(
                _check(
                    f"{FUTURE_TIMESTAMP}: {spec.name} is more than "
                    f"{limits.max_future_skew_ms // 1000} s ahead of arrival",
                    typed.dt.epoch("ms") > limit,
                    typed.max().dt.epoch("ms") > limit.first(),
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


@functools.cache
def _plan(
    stream: Stream, limits: DecodeLimits, typed_read: bool
) -> tuple[tuple[tuple[str, pl.Expr], ...], tuple[_Check, ...], tuple[pl.Expr, ...]]:
    """The expressions of `_validate` that do not depend on the batch, built once: building
    them costs about as much as evaluating them over a batch of ten thousand records."""
    specs = FIELDS[stream]
    typed = [(spec.name, _typed(spec).alias(spec.name)) for spec in specs if spec.kind != "storage"]
    checks = [c for spec in specs for c in _checks(spec, limits, typed_read)]
    if any(spec.kind == "storage" for spec in specs):
        checks.append(_check(f"{WRONG_TYPE}: storage must be a list of storage path objects", pl.col("__storage_bad")))
    output = [pl.col(spec.name) for spec in specs]
    return tuple(typed), tuple(checks), tuple(output)


def _validate(
    stream: Stream, frame: pl.DataFrame, received_at_ms: int, limits: DecodeLimits, typed_read: bool
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The valid records, typed per the contract schema, and the rejected ones (REJECT_SCHEMA).
    The columns of the valid frame have the schema's types by construction (`_typed`)."""
    specs = FIELDS[stream]
    typed, checks, output = _plan(stream, limits, typed_read)
    # A producer writes one timestamp spelling, so a timestamp column whose first value has
    # the common one is parsed the cheap way; should that leave a present value unparsed, the
    # column is parsed again in full below. (The first value only picks the cheaper way.)
    common = [spec.name for spec in specs if spec.kind == "ts" and _starts_common(frame, spec.name)]
    columns = [_parse_common_timestamp(name) if name in common else expr for name, expr in typed]
    # The limit of the future-timestamp checks is one value in a column, so that the checks
    # themselves do not depend on the batch.
    frame = frame.with_columns(*columns, pl.lit(received_at_ms + limits.max_future_skew_ms).alias(_FUTURE_LIMIT))
    again = [n for n in common if frame.get_column(n).null_count() > frame.get_column(_RAW + n).null_count()]
    if again:
        frame = frame.with_columns(_parse_timestamp(pl.col(_RAW + name)).alias(name) for name in again)
    if any(spec.kind == "storage" for spec in specs):
        frame = _decode_storage(frame)
    # Which checks may fail at all is one row of booleans (null: an empty batch); a clean
    # batch fails none and is valid as it is. Only the checks that may fail are then evaluated
    # per record: whether a record fails any, and the text naming the first it fails (checks
    # that fail nowhere name nothing, so leaving them out changes no detail).
    hits = frame.select(check.may_fail.alias(str(n)) for n, check in enumerate(checks)).row(0)
    failing = [check for check, hit in zip(checks, hits) if hit]
    if failing:
        fails = [check.fails.fill_null(False) for check in failing]
        frame = frame.with_columns(pl.any_horizontal(fails).alias("__bad"))
        detail = pl.coalesce([pl.when(cond).then(pl.lit(check.detail)) for cond, check in zip(fails, failing)])
        rejects = (
            frame.filter(pl.col("__bad"))
            .select(pl.col(_INDEX).alias("index"), detail.alias("detail"))
            .select("index", pl.col("detail").str.extract(r"^([a-z_]+)", 1).alias("reason"), "detail")
        )
        frame = frame.filter(~pl.col("__bad"))
    else:
        rejects = pl.DataFrame(schema=REJECT_SCHEMA)
    valid = frame.select(*output, pl.lit(received_at_ms).cast(TIMESTAMP).alias("received_at"))
    return valid, rejects


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
        (frame, typed), early_rejects = fast, pl.DataFrame(schema=REJECT_SCHEMA)
    else:
        frame, early_rejects, typed = _slow_read(stream, payloads, limits)
    valid, rejects = _validate(stream, frame, received_at_ms, limits, typed)
    if early_rejects.is_empty():
        all_rejects = rejects  # already in index order
    else:
        all_rejects = pl.concat([early_rejects, rejects]).sort("index")
    return Decoded(stream, valid, all_rejects)
