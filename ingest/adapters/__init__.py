"""Adapters for real telemetry formats: payloads in a tool's own format in, canonical events out.

A Kafka topic or MQTT topic filter is configured with a `format`; its batches arrive with
`Batch.format` set, and `adapt_and_decode` (run in a worker thread) turns one batch into, per
stream, the decoded valid events and the dead letters:

  1. the format's adapter reads the whole batch in bulk and yields canonical JSON payloads per
     stream, each with the index of its message in the batch and the position of its source
     record in that message, plus the source records it rejects (unreadable, unmappable);
  2. the canonical decoder (ingest/decode.py) validates the payloads exactly as if a producer
     had sent them, so every contract check applies unchanged;
  3. rejects of both steps become dead letters of the source record, with the origin topic,
     partition and offset of its message, and a reason from the decoder's vocabulary (plus
     `unmapped_identity`).

Formats: `hyperv_replica_json` (ingest/adapters/hyperv.py) and `azure_diagnostics`
(ingest/adapters/azure_diagnostics.py); docs/adapters.md maps them field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from ingest.adapters.azure_diagnostics import AzureDiagnosticsAdapter, AzureDiagnosticsSettings
from ingest.adapters.base import DEFAULT_MAX_MESSAGE_BYTES, Adapted, Adapter, AdapterResult
from ingest.adapters.common import UNMAPPED_IDENTITY
from ingest.adapters.hyperv import HyperVReplicaAdapter, HyperVSettings
from ingest.adapters.identity import IdentityRule, IdentitySettings
from ingest.contracts import REJECT_SCHEMA, SCHEMAS, Stream
from ingest.decode import DecodeLimits, decode_batch
from ingest.source import Batch

__all__ = [
    "CANONICAL",
    "FORMATS",
    "UNMAPPED_IDENTITY",
    "Adapter",
    "AdapterResult",
    "AdapterSettings",
    "IdentityRule",
    "IdentitySettings",
    "StreamOutcome",
    "adapt_and_decode",
    "build_adapters",
]

CANONICAL = "canonical"
FORMATS = (CANONICAL, HyperVReplicaAdapter.format, AzureDiagnosticsAdapter.format)


@dataclass(frozen=True)
class AdapterSettings:
    """Everything the adapters are configured with (built from rpowatch's settings)."""

    identity: IdentitySettings = field(default_factory=IdentitySettings)
    hyperv_default_frequency_s: int | None = 300
    asr_frequency_s: int = 900
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def build_adapters(settings: AdapterSettings = AdapterSettings()) -> dict[str, Adapter]:
    """The adapter of every non-canonical format, by format name."""
    adapters: list[Adapter] = [
        HyperVReplicaAdapter(
            HyperVSettings(settings.identity, settings.hyperv_default_frequency_s, settings.max_message_bytes)
        ),
        AzureDiagnosticsAdapter(
            AzureDiagnosticsSettings(settings.identity, settings.asr_frequency_s, settings.max_message_bytes)
        ),
    ]
    return {adapter.format: adapter for adapter in adapters}


@dataclass(frozen=True)
class StreamOutcome:
    """One stream's share of an adapted batch. `valid` has the stream's contract schema;
    `dead_letters` is a batch of the rejected source records (with their messages' origin
    topic, partition and offset) and `rejects` (REJECT_SCHEMA) indexes into it. `decoded` is
    the batch of canonical payloads the decoder read (each with its message's topic and
    partition) and `decoded_rejects` the decoder's rejects of it, so `valid` relates to
    `decoded` exactly as a canonical batch's decode relates to it (Kafka's partition
    ownership relies on that)."""

    stream: Stream
    valid: pl.DataFrame
    rejects: pl.DataFrame
    dead_letters: Batch
    decoded: Batch
    decoded_rejects: pl.DataFrame


def adapt_and_decode(
    adapter: Adapter, batch: Batch, limits: DecodeLimits = DecodeLimits()
) -> tuple[list[StreamOutcome], int]:
    """Adapt and decode one batch (see the module docstring); also returns how many source
    records were ignored. Never raises on bad input."""
    result = adapter.adapt(batch)
    streams = list(result.adapted)
    for name in result.rejects.get_column("stream").unique(maintain_order=True).to_list():
        if Stream(name) not in streams:
            streams.append(Stream(name))
    outcomes = []
    for stream in streams:
        adapted = result.adapted.get(stream) or Adapted(stream, [], [], [])
        rejects = result.rejects.filter(pl.col("stream") == stream.value).select("index", "item", "reason", "detail")
        canonical = Batch(
            source=batch.source,
            stream=stream,
            payloads=adapted.payloads,
            topics=[batch.topics[i] for i in adapted.origins],
            partitions=[batch.partitions[i] for i in adapted.origins],
            offsets=[batch.offsets[i] for i in adapted.origins],
            received_at_ms=batch.received_at_ms,
        )
        if adapted.payloads:
            decoded = decode_batch(stream, adapted.payloads, batch.received_at_ms, limits)
            valid, decoded_rejects = decoded.valid, decoded.rejects
        else:
            valid, decoded_rejects = pl.DataFrame(schema=SCHEMAS[stream]), pl.DataFrame(schema=REJECT_SCHEMA)
        if decoded_rejects.height:
            at = decoded_rejects.get_column("index").to_list()
            mapped = pl.DataFrame(
                {
                    "index": [adapted.origins[i] for i in at],
                    "item": [adapted.items[i] for i in at],
                    "reason": decoded_rejects.get_column("reason"),
                    "detail": decoded_rejects.get_column("detail"),
                },
                schema={"index": pl.Int64, "item": pl.Int64, "reason": pl.String, "detail": pl.String},
            )
            rejects = pl.concat([rejects, mapped])
        letters, letter_batch = _dead_letters(adapter, batch, stream, rejects)
        outcomes.append(StreamOutcome(stream, valid, letters, letter_batch, canonical, decoded_rejects))
    return outcomes, result.ignored


def _dead_letters(adapter: Adapter, batch: Batch, stream: Stream, rejects: pl.DataFrame) -> tuple[pl.DataFrame, Batch]:
    """The rejected source records as a batch of their own (one row each in `rejects`, which
    then indexes into it). A record is dead-lettered once, with its first reason; a message that
    holds several rejected records is parsed once for all of them."""
    rejects = rejects.unique(subset=["index", "item"], keep="first", maintain_order=True).sort("index", "item")
    payloads: list[bytes] = []
    details: list[str] = []
    for (index,), group in rejects.group_by("index", maintain_order=True):
        located = adapter.locate(batch.payloads[int(index)], group.get_column("item").to_list())
        for (record, label), detail in zip(located, group.get_column("detail").to_list(), strict=True):
            payloads.append(record)
            details.append(f"{detail} (at {label})" if label else detail)
    origins = rejects.get_column("index").to_list()
    letters = Batch(
        source=batch.source,
        stream=stream,
        payloads=payloads,
        topics=[batch.topics[i] for i in origins],
        partitions=[batch.partitions[i] for i in origins],
        offsets=[batch.offsets[i] for i in origins],
        received_at_ms=batch.received_at_ms,
        format=batch.format,
    )
    frame = pl.DataFrame(
        {"index": list(range(len(payloads))), "reason": rejects.get_column("reason").to_list(), "detail": details},
        schema=REJECT_SCHEMA,
    )
    return frame, letters
