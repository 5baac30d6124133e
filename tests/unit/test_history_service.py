"""The service with history enabled: ticks reach the store off the event loop, the API serves
them, and stopping writes the unfinished interval."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from exporters.history.store import HistoryStore
from exporters.history.tables import VM
from ingest.deadletter import MemoryDeadLetterSink
from ingest.memory import MemorySource
from rpowatch.config import History, Http, Settings
from rpowatch.demo import to_batches
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.simulator import FleetSimulator


async def test_ticks_are_written_and_served(tmp_path: Path) -> None:
    settings = Settings(http=Http(port=0), history=History(enabled=True, path=str(tmp_path), resolution=1.0))
    source = MemorySource("simulator")
    service = Service(settings, load_rule_packs(settings), [source], MemoryDeadLetterSink())
    simulator = FleetSimulator(50, start_ms=int(time.time() * 1000), seed=3)
    await service.start()
    try:
        assert service.history is not None
        started = time.time()
        while time.time() - started < 3.5:
            now_ms = int(time.time() * 1000)
            for batch in to_batches(simulator.step(now_ms), source.name, now_ms):
                await source.put(batch)
            await asyncio.sleep(0.25)
        base = f"http://127.0.0.1:{service.port}/api/v1/history"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/compliance?start=now-1h") as response:
                assert response.status == 200
                rows = json.loads(await response.text())
            assert len(rows) == 50, "every VM has at least one finished interval"
            async with session.get(f"{base}/lag?vm={rows[0]['vm']}&start=now-1h") as response:
                assert response.status == 200 and len(json.loads(await response.text())) >= 2
    finally:
        await service.stop()
    rows = HistoryStore(tmp_path).scan(VM, 0, int(time.time() * 1000) + 60_000).collect()
    assert rows.get_column("vm").n_unique() == 50
    assert rows.get_column("ts_ms").n_unique() >= 3  # one row per VM per second, the last one at stop
    assert rows.select("vm", "ts_ms").is_duplicated().sum() == 0
