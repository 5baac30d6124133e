"""What an adapter is: real telemetry in, canonical payloads (per stream) and rejects out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Protocol

import polars as pl

from ingest.adapters.common import ADAPTER_REJECT_SCHEMA, INDEX, ITEM, to_payloads
from ingest.contracts import Stream
from ingest.source import Batch

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # an Event Hubs message is at most 1 MB (Premium: 20 MB)


@dataclass(frozen=True)
class Adapted:
    """Canonical JSON payloads of one stream, and for each where it came from: `origins[i]` is
    the index of its message in the source batch, `items[i]` the position of its source record
    in that message (one source record may yield several events)."""

    stream: Stream
    payloads: list[bytes]
    origins: list[int]
    items: list[int]

    @classmethod
    def of(cls, stream: Stream, events: pl.DataFrame, columns: list[str]) -> Adapted:
        """From a frame of canonical columns plus INDEX and ITEM."""
        return cls(
            stream,
            to_payloads(events, columns),
            events.get_column(INDEX).to_list(),
            events.get_column(ITEM).to_list(),
        )


@dataclass(frozen=True)
class AdapterResult:
    """`adapted`: events per stream; `rejects`: ADAPTER_REJECT_SCHEMA, source records that
    cannot become events (unreadable, unmappable, malformed); `ignored`: well-formed source
    records that carry nothing rpowatch models (documented per format in docs/adapters.md)."""

    adapted: dict[Stream, Adapted] = field(default_factory=dict)
    rejects: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ADAPTER_REJECT_SCHEMA))
    ignored: int = 0


class Adapter(Protocol):
    """One input format. `adapt` is pure and CPU-bound (called in a worker thread, never on the
    event loop); it never raises on bad input — every source record ends up as events, a reject,
    or ignored. `default_stream` is the stream a message that cannot be read at all counts under."""

    format: str
    default_stream: Stream

    def adapt(self, batch: Batch) -> AdapterResult: ...

    def locate(self, payload: bytes, items: Sequence[int]) -> list[tuple[bytes, str]]:
        """For each position in `items`, the source record of a message (for its dead letter)
        and a label saying where it was (`records[3]`); -1 means the whole message, returned
        byte for byte, as is a message that is itself the record."""
        ...


def records_of(value: object, key: str | None) -> list[object]:
    """The records of a parsed message: `value[key]` (Azure), or the array / single object /
    PowerShell 5.1 `{"value": [...], "Count": n}` wrapper (key None)."""
    if key is not None:
        inner = value.get(key) if isinstance(value, dict) else None
        return inner if isinstance(inner, list) else []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        inner = value.get("value")
        if isinstance(inner, list) and "Count" in value:
            return inner
        return [value]
    return []


def locate_records(payload: bytes, items: Sequence[int], key: str | None) -> list[tuple[bytes, str]]:
    """`Adapter.locate` for messages shaped as `records_of` reads them (parsed once)."""
    if all(item < 0 for item in items):
        return [(payload, "")] * len(items)
    body = payload[3:] if payload.startswith(b"\xef\xbb\xbf") else payload
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return [(payload, "")] * len(items)
    records = records_of(value, key)
    whole = key is None and isinstance(value, dict) and records == [value]
    out: list[tuple[bytes, str]] = []
    for item in items:
        if item < 0 or whole:
            out.append((payload, ""))  # the message is the record: byte for byte
            continue
        label = f"{key}[{item}]" if key else f"[{item}]"
        if item >= len(records):
            out.append((payload, label))
        else:
            out.append((json.dumps(records[item], separators=(",", ":"), ensure_ascii=False).encode(), label))
    return out
