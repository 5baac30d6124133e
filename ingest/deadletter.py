"""Dead-letter sinks: rejected records, byte for byte, with headers saying where from and why."""

from __future__ import annotations

import base64
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ingest.source import Batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    payload: bytes
    headers: dict[str, str]


def dead_letters(batch: Batch, rejects: pl.DataFrame) -> list[DeadLetter]:
    """The rejected records of `batch` with their origin headers (rejects: REJECT_SCHEMA)."""
    out = []
    for index, reason, detail in rejects.select("index", "reason", "detail").iter_rows():
        out.append(
            DeadLetter(
                payload=batch.payloads[index],
                headers={
                    "rpowatch.source": batch.source,
                    "rpowatch.stream": batch.stream.value,
                    "rpowatch.origin.topic": batch.topics[index],
                    "rpowatch.origin.partition": str(batch.partitions[index]),
                    "rpowatch.origin.offset": str(batch.offsets[index]),
                    "rpowatch.reason": reason,
                    "rpowatch.detail": detail,
                },
            )
        )
    return out


class KafkaDeadLetterSink:
    """Produces dead letters to a Kafka topic, keyed like their origin would be (unknown here,
    so by origin topic and partition) and acknowledged by the broker before we commit past
    them. `producer` is a started `aiokafka.AIOKafkaProducer` owned by the caller."""

    def __init__(self, producer: Any, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def send(self, batch: Batch, rejects: pl.DataFrame) -> None:
        futures = []
        for letter in dead_letters(batch, rejects):
            headers = [(k, v.encode()) for k, v in letter.headers.items()]
            futures.append(await self._producer.send(self._topic, letter.payload, headers=headers))
        for future in futures:
            await future

    async def close(self) -> None:
        return None


class FileDeadLetterSink:
    """Appends dead letters to a JSON-lines file (payload base64-encoded, since it may not be
    text): for deployments without Kafka, e.g. MQTT only."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    async def send(self, batch: Batch, rejects: pl.DataFrame) -> None:
        lines = [
            json.dumps({"headers": d.headers, "payload_base64": base64.b64encode(d.payload).decode()})
            for d in dead_letters(batch, rejects)
        ]
        with self._path.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    async def close(self) -> None:
        return None


class MemoryDeadLetterSink:
    """Keeps the most recent dead letters in memory (the demo, and tests)."""

    def __init__(self, keep: int = 1000) -> None:
        self.letters: deque[DeadLetter] = deque(maxlen=keep)

    async def send(self, batch: Batch, rejects: pl.DataFrame) -> None:
        self.letters.extend(dead_letters(batch, rejects))

    async def close(self) -> None:
        return None
