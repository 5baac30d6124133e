"""The Kafka broker goes away mid-stream and comes back (a private broker, really stopped and
started): rpowatch keeps serving, says the source is down, does not spin, and resumes by itself
without losing a record."""

from __future__ import annotations

import asyncio
import json
import resource
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest

from ingest.kafka import start_producer
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.wiring import build_dead_letter_sink, build_sources
from rules.engine import TickResult
from tests.harness import KafkaBroker
from tests.harness.timing import record_timing
from tests.harness.wait import until

pytestmark = pytest.mark.integration


def record(i: int, cluster: str) -> bytes:
    now_ms = int(time.time() * 1000)
    return json.dumps({
        "event_id": f"vm-{i}-{now_ms}", "ts": now_ms, "vm_id": f"vm-{i:04d}", "cluster_id": cluster,
        "target_id": "hci-dr", "technology": "asr", "kind": "cycle_completed", "frequency_s": 300,
        "recovery_point_ts": now_ms - 1000,
    }).encode()



@pytest.fixture
def broker() -> Iterator[KafkaBroker]:
    t0 = time.monotonic()
    with KafkaBroker() as b:
        record_timing("kafka (private)", "start", time.monotonic() - t0)
        yield b


@pytest.fixture
async def service(broker: KafkaBroker, unique_name: str) -> AsyncIterator[tuple[Service, list[bool]]]:
    topics = {s: f"{unique_name}.{s}" for s in ("replication", "backup", "heartbeat", "dlq")}
    for name in topics.values():
        await broker.acreate_topic(name, partitions=3)
    settings = Settings(**{
        "sources": {"kafka": {
            "enabled": True, "bootstrap_servers": broker.bootstrap, "group_id": unique_name,
            "topics": {k: topics[k] for k in ("replication", "backup", "heartbeat")},
            "dead_letter_topic": topics["dlq"], "poll_timeout_ms": 100, "heartbeat_interval": "1s",
        }},
        "http": {"port": 0},
        "evaluation": {"interval": "200ms"},
    })
    ups: list[bool] = []
    sink, producer = await build_dead_letter_sink(settings)
    svc: Service | None = None

    def on_tick(_: TickResult) -> None:
        assert svc is not None
        ups.append(svc.holder.get().self_stats.source_up.get("kafka", False))

    svc = Service(settings, load_rule_packs(settings), build_sources(settings), sink, on_tick=on_tick)
    await svc.start()
    svc.topic = topics["replication"]  # type: ignore[attr-defined]
    try:
        yield svc, ups
    finally:
        await svc.stop()
        if producer is not None:
            await producer.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_broker_stopped_and_started_mid_stream(broker: KafkaBroker, service: tuple[Service, list[bool]]) -> None:
    svc, ups = service
    topic: str = svc.topic  # type: ignore[attr-defined]
    producer = await start_producer(broker.bootstrap, "outage-producer")
    try:
        for i in range(300):
            await producer.send(topic, record(i, f"hci-{i % 7}"), key=f"hci-{i % 7}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    await until(lambda: svc.engine.fleet.replication.height == 300, 30, "first 300 VMs applied")
    await until(lambda: ups and ups[-1], 10, "source_up 1")

    await asyncio.to_thread(broker.stop)
    outage_started = time.monotonic()
    await until(lambda: not ups[-1], 15, "source_up 0 while the broker is down")
    assert "rpowatch_source_up{source=\"kafka\"} 0.0" in await asyncio.to_thread(scrape, svc.port or 0)
    ready, why = svc.readiness()
    assert not ready and "kafka" in why

    # Down for longer than the session timeout: still serving, and not spinning.
    cpu_before, wall_before = cpu_seconds(), time.monotonic()
    await asyncio.sleep(12)
    cpu_ratio = (cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    assert cpu_ratio < 0.5, f"{cpu_ratio:.0%} of a core while the broker is down: a busy loop"
    assert "rpowatch_replication_lag_seconds" in await asyncio.to_thread(scrape, svc.port or 0)
    assert svc.engine.fleet.replication.height == 300  # nothing forgotten meanwhile

    await asyncio.to_thread(broker.start)
    record_timing("kafka (private)", "restart", broker.last_start_seconds or 0.0)
    producer = await start_producer(broker.bootstrap, "outage-producer-2")
    try:
        for i in range(300, 600):
            await producer.send(topic, record(i, f"hci-{i % 7}"), key=f"hci-{i % 7}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    await until(lambda: svc.engine.fleet.replication.height == 600, 60, "records after the restart applied")
    await until(lambda: ups[-1], 30, "source_up back to 1")
    assert svc.readiness() == (True, "ready")
    outage = time.monotonic() - outage_started

    # The gauge really went 0 (starting) → 1 → 0 (outage) → 1 (sampled at every tick).
    runs = [up for i, up in enumerate(ups) if i == 0 or up != ups[i - 1]]
    assert runs == [False, True, False, True], runs
    assert outage > 12
