"""An in-process source: batches pushed by the caller (the demo's simulator, tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ingest.source import Batch


class MemorySource:
    def __init__(self, name: str = "simulator", max_pending_batches: int = 64) -> None:
        self.name = name
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=max_pending_batches)
        self.committed = 0

    @property
    def up(self) -> bool:
        return True

    async def put(self, batch: Batch) -> None:
        """Waits while the pipeline is behind: the producer is slowed, nothing is dropped."""
        await self._queue.put(batch)

    async def batches(self) -> AsyncIterator[Batch]:
        while True:
            yield await self._queue.get()

    async def commit(self, batch: Batch) -> None:
        self.committed += len(batch)

    async def close(self) -> None:
        return None
