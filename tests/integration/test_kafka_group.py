"""Two rpowatch services in one consumer group (real Kafka): they split the partitions, each owns
whole instances, and when one leaves the other rebuilds the instances it takes over by replaying
them — every VM's state and every alert intact, no phantom alert, no phantom resolve."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import polars as pl
import pytest
from aiokafka import AIOKafkaProducer

from ingest.kafka import KafkaSource, start_producer
from rpowatch.config import Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.wiring import build_dead_letter_sink, build_sources
from rules.engine import TickResult
from tests.harness import KafkaBroker
from tests.harness.wait import until

pytestmark = pytest.mark.integration

PARTITIONS = 4
FILL = 30
CLUSTERS = [f"hci-{i:02d}" for i in range(8)]  # hci-NN goes to partition NN % 4


def partition_of(cluster: str) -> int:
    return int(cluster[-2:]) % PARTITIONS


def rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s * 1000) % 1000:03d}Z"


def replication(vm: str, cluster: str, frequency: int, recovery_point_s: float, event_s: float) -> bytes:
    return json.dumps({
        "event_id": f"{vm}-{event_s}", "ts": rfc3339(event_s), "vm_id": vm, "cluster_id": cluster,
        "target_id": "hci-dr", "technology": "hyperv_replica", "kind": "cycle_completed",
        "frequency_s": frequency, "recovery_point_ts": rfc3339(recovery_point_s),
    }).encode()


def heartbeat(node: str, cluster: str, state: str, event_s: float) -> bytes:
    return json.dumps({"event_id": f"{node}-{event_s}", "ts": int(event_s * 1000), "cluster_id": cluster,
                       "node_id": node, "state": state}).encode()


def backup(vm: str, cluster: str, point_s: float) -> bytes:
    return json.dumps({"event_id": f"bk-{vm}", "ts": rfc3339(point_s + 600), "vm_id": vm, "cluster_id": cluster,
                       "job_id": f"job-{vm}", "product": "mabs", "level": "host", "kind": "succeeded",
                       "recovery_point_ts": rfc3339(point_s)}).encode()


def expected_firing(clusters: list[str]) -> set[tuple[str, str]]:
    """(alertname, entity) of what must fire for these instances."""
    out: set[tuple[str, str]] = set()
    for c in clusters:
        out |= {("ReplicationRPOBreach", f"{c}-stalled"), ("BackupRPOBreach", f"{c}-stalled"),
                ("NodeHeartbeatLost", f"{c}-n2")}
    return out


# The alerts this fleet is built to raise (the default pack has more rules; they are left out of
# the comparisons, not of the "nothing resolved" checks).
WATCHED = ("ReplicationRPOBreach", "BackupRPOBreach", "NodeHeartbeatLost")


def firing(result: TickResult) -> set[tuple[str, str]]:
    alerts = result.firing().filter(pl.col("alertname").is_in(WATCHED))
    if "labels" not in alerts.columns:  # labels are kept apart from the lifecycle table
        alerts = result.with_details(alerts)
    rows = alerts.select("alertname", "labels").iter_rows()
    return {(name, json.loads(labels).get("vm") or json.loads(labels).get("node")) for name, labels in rows}


class Recorder:
    """Every tick's transitions and readiness of one service."""

    def __init__(self) -> None:
        self.service: Service | None = None
        self.transitions: list[tuple[str, str, str]] = []  # (transition, alertname, vm or node)
        self.latest: TickResult | None = None
        self.not_ready: list[str] = []

    def __call__(self, result: TickResult) -> None:
        self.latest = result
        for name, transition, labels in result.transitions.select("alertname", "transition", "labels").iter_rows():
            parsed = json.loads(labels)
            self.transitions.append((transition, name, parsed.get("vm") or parsed.get("node")))
        if self.service is not None:
            ready, why = self.service.readiness()
            if not ready:
                self.not_ready.append(why)



def kafka_source(service: Service) -> KafkaSource:
    (source,) = service.sources
    assert isinstance(source, KafkaSource)
    return source


def metric_clusters(service: Service) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = set()
    for line in text.splitlines():
        if line.startswith("rpowatch_replication_lag_seconds{"):
            out.add(line.split('hci_cluster="', 1)[1].split('"', 1)[0])
    return out


@pytest.fixture
async def topics(kafka: KafkaBroker, unique_name: str) -> dict[str, str]:
    names = {s: f"{unique_name}.{s}" for s in ("replication", "backup", "heartbeat", "dlq")}
    for name in names.values():
        await kafka.acreate_topic(name, partitions=PARTITIONS)
    return names


def settings(kafka: KafkaBroker, topics: dict[str, str], group: str, max_batch_records: int) -> Settings:
    return Settings(**{
        "sources": {"kafka": {
            "enabled": True, "bootstrap_servers": kafka.bootstrap, "group_id": group, "client_id": group,
            "topics": {k: topics[k] for k in ("replication", "backup", "heartbeat")},
            "dead_letter_topic": topics["dlq"], "poll_timeout_ms": 50, "max_batch_records": max_batch_records,
            "heartbeat_interval": "500ms", "session_timeout": "6s", "replay_window": "1h",
        }},
        "http": {"port": 0},
        # Ticks far more often than batches are applied, so a tick between two replayed batches
        # would see the half-rebuilt state if rebuilding instances were not held.
        "evaluation": {"interval": "50ms", "heartbeat_timeout": "10m"},
    })


@pytest.fixture
async def services(kafka: KafkaBroker, topics: dict[str, str], unique_name: str) -> AsyncIterator[list[tuple[Service, Recorder]]]:
    started: list[tuple[Service, Recorder, Any]] = []

    async def start(max_batch_records: int) -> tuple[Service, Recorder]:
        s = settings(kafka, topics, unique_name, max_batch_records)
        recorder = Recorder()
        sink, producer = await build_dead_letter_sink(s)
        svc = Service(s, load_rule_packs(s), build_sources(s), sink, on_tick=recorder)
        recorder.service = svc
        await svc.start()
        started.append((svc, recorder, producer))
        return svc, recorder

    holder: list[Any] = [start]
    try:
        yield holder  # type: ignore[misc]
    finally:
        for svc, _, producer in started:
            await svc.stop()
            if producer is not None:
                await producer.stop()


async def produce_fleet(producer: AIOKafkaProducer, topics: dict[str, str], clusters: list[str], flip: set[str]) -> None:
    """Per instance: a healthy VM, a stalled VM (breach of replication and backup RPO), an up node
    and a down node. Instances in `flip` also get a VM whose first record is 50 minutes old (a
    breach on its own) and whose second, FILL healthy VMs later, is fresh."""
    now = time.time()
    sends = []
    for c in clusters:
        p = partition_of(c)
        key = c.encode()
        sends += [
            (topics["replication"], replication(f"{c}-ok", c, 900, now - 60, now - 50)),
            (topics["replication"], replication(f"{c}-stalled", c, 30, now - 900, now - 890)),
            (topics["heartbeat"], heartbeat(f"{c}-n1", c, "up", now - 5)),
            (topics["heartbeat"], heartbeat(f"{c}-n2", c, "down", now - 5)),
            (topics["backup"], backup(f"{c}-ok", c, now - 3600)),
            (topics["backup"], backup(f"{c}-stalled", c, now - 30 * 3600)),
        ]
        if c in flip:
            sends += [
                (topics["replication"], replication(f"{c}-flip", c, 900, now - 3000, now - 2990)),
                *[(topics["replication"], replication(f"{c}-fill{i}", c, 900, now - 60, now - 50)) for i in range(FILL)],
                (topics["replication"], replication(f"{c}-flip", c, 900, now - 30, now - 20)),
            ]
        futures = [await producer.send(t, v, key=key, partition=p) for t, v in sends]
        for f in futures:
            await f
        sends = []


async def test_two_services_split_the_partitions_and_one_takes_over_when_the_other_leaves(
    kafka: KafkaBroker, topics: dict[str, str], services: Any
) -> None:
    start = services[0]
    # A replays in batches of 3 records: its ticks (every 50 ms) fall between the two records of
    # a "flip" VM when it takes those instances over.
    a, a_rec = await start(3)
    await until(lambda: len(kafka_source(a).owned_partitions) == 3 * PARTITIONS, 30, "A owns every partition")
    b, b_rec = await start(10_000)
    all_partitions = {(t, p) for t in (topics["replication"], topics["backup"], topics["heartbeat"]) for p in range(PARTITIONS)}

    def split() -> bool:
        owned_a, owned_b = kafka_source(a).owned_partitions, kafka_source(b).owned_partitions
        return bool(owned_a) and bool(owned_b) and owned_a | owned_b == all_partitions and not owned_a & owned_b

    await until(split, 30, "A and B split the partitions")
    # The range assignor gives each member the same partition numbers of every topic.
    parts_a = {p for _, p in kafka_source(a).owned_partitions}
    parts_b = {p for _, p in kafka_source(b).owned_partitions}
    assert parts_a.isdisjoint(parts_b) and len(kafka_source(a).owned_partitions) == 3 * len(parts_a)
    clusters_a = [c for c in CLUSTERS if partition_of(c) in parts_a]
    clusters_b = [c for c in CLUSTERS if partition_of(c) in parts_b]

    producer = await start_producer(kafka.bootstrap, "group-test")
    try:
        await produce_fleet(producer, topics, CLUSTERS, flip=set(clusters_b))
    finally:
        await producer.stop()

    # Each member alerts on exactly its own instances.
    await until(lambda: a_rec.latest is not None and firing(a_rec.latest) == expected_firing(clusters_a), 30, "A's alerts")
    await until(lambda: b_rec.latest is not None and firing(b_rec.latest) == expected_firing(clusters_b), 30, "B's alerts")
    assert await asyncio.to_thread(metric_clusters, a) == set(clusters_a)
    assert await asyncio.to_thread(metric_clusters, b) == set(clusters_b)

    # B leaves: A takes over B's instances by replaying their partitions.
    await b.stop()
    await until(lambda: kafka_source(a).owned_partitions == all_partitions, 30, "A owns every partition again")
    await until(lambda: a_rec.latest is not None and firing(a_rec.latest) == expected_firing(CLUSTERS), 30,
                "A alerts on every instance")
    await until(lambda: not kafka_source(a).rebuilding, 10, "A done rebuilding")
    assert kafka_source(a).replays >= 3 * len(parts_b)  # every gained partition was replayed

    # Every VM, node and backup chain of B's instances is in A's state, flip VMs fresh.
    fleet = a.engine.fleet
    assert set(fleet.replication.get_column("vm_id")) == {
        f"{c}-{v}" for c in CLUSTERS for v in ("ok", "stalled")} | {
        f"{c}-{v}" for c in clusters_b for v in ("flip", *(f"fill{i}" for i in range(FILL)))}
    assert fleet.nodes.height == 2 * len(CLUSTERS)
    assert fleet.backup.height == 2 * len(CLUSTERS)
    assert await asyncio.to_thread(metric_clusters, a) == set(CLUSTERS)
    assert any("rebuilding" in why for why in a_rec.not_ready), "readiness never reported the rebuild"
    assert a.readiness() == (True, "ready")

    # Nothing ever resolved (no phantom resolve on hand-over), and the flip VMs never fired:
    # while their instances were rebuilt, a half-replayed state was never evaluated.
    for rec in (a_rec, b_rec):
        assert [t for t in rec.transitions if t[0] == "resolved"] == []
        assert [t for t in rec.transitions if t[2].endswith("-flip")] == []
    fired_a = {(name, who) for transition, name, who in a_rec.transitions if transition == "fired" and name in WATCHED}
    assert fired_a == expected_firing(CLUSTERS)


async def test_instances_a_service_gets_back_are_rebuilt_again(
    kafka: KafkaBroker, topics: dict[str, str], services: Any
) -> None:
    """A loses half its partitions to B and drops those instances; when B leaves again (within
    the dedupe window), A's replay must rebuild them although A applied those very records
    before."""
    start = services[0]
    producer = await start_producer(kafka.bootstrap, "group-test")
    try:
        await produce_fleet(producer, topics, CLUSTERS, flip=set())
    finally:
        await producer.stop()
    a, a_rec = await start(10_000)
    await until(lambda: a_rec.latest is not None and firing(a_rec.latest) == expected_firing(CLUSTERS), 30,
                "A alerts on every instance")
    b, _ = await start(10_000)
    await until(lambda: bool(kafka_source(b).owned_partitions) and not kafka_source(b).rebuilding, 30, "B took its share")
    parts_b = {p for _, p in kafka_source(b).owned_partitions}
    clusters_a = [c for c in CLUSTERS if partition_of(c) not in parts_b]
    await until(lambda: a_rec.latest is not None and firing(a_rec.latest) == expected_firing(clusters_a), 30,
                "A dropped B's instances")
    assert set(a.engine.fleet.replication.get_column("cluster_id")) == set(clusters_a)

    await b.stop()
    await until(lambda: len(kafka_source(a).owned_partitions) == 3 * PARTITIONS and not kafka_source(a).rebuilding, 30,
                "A owns and rebuilt every partition")
    await until(lambda: a_rec.latest is not None and firing(a_rec.latest) == expected_firing(CLUSTERS), 30,
                "A alerts on every instance again")
    assert set(a.engine.fleet.replication.get_column("cluster_id")) == set(CLUSTERS)
    assert [t for t in a_rec.transitions if t[0] == "resolved"] == []
