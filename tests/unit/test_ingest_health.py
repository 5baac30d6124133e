"""Per (source, stream) accepted / rejected counts over five minutes, as the engine's `sources` frame."""

from __future__ import annotations

import polars as pl

from ingest.health import BUCKET_MS, SOURCE_HEALTH_SCHEMA, WINDOW_MS, SourceHealth, source_health_frame
from rules.views import SOURCES_SCHEMA

T0 = 1_795_000_000_000


def test_schema_is_the_one_the_engine_reads() -> None:
    assert SOURCE_HEALTH_SCHEMA == SOURCES_SCHEMA


def test_registered_streams_appear_before_their_first_record() -> None:
    health = SourceHealth()
    health.register("kafka", ["replication", "heartbeat"])
    frame = source_health_frame(health, {"kafka": True}, T0)
    assert frame.schema == SOURCE_HEALTH_SCHEMA
    assert frame.rows() == [
        ("kafka", "heartbeat", None, True, None, 0, 0),
        ("kafka", "replication", None, True, None, 0, 0),
    ]


def test_counts_cover_the_last_five_minutes_and_expire() -> None:
    health = SourceHealth()
    health.record("kafka", "replication", accepted=90, rejected=10, at_ms=T0)
    health.record("kafka", "replication", accepted=5, rejected=95, at_ms=T0 + 3 * 60_000)
    health.record("mqtt", "heartbeat", accepted=7, rejected=0, at_ms=T0 + 3 * 60_000)

    frame = source_health_frame(health, {"kafka": False, "mqtt": True}, T0 + 4 * 60_000)
    rows = {(r["source"], r["stream"]): r for r in frame.iter_rows(named=True)}
    assert rows[("kafka", "replication")] == {
        "source": "kafka", "stream": "replication", "partition": None, "up": False,
        "last_event_ms": T0 + 3 * 60_000, "accepted_recent": 95, "rejected_recent": 105,
    }
    assert rows[("mqtt", "heartbeat")]["up"] is True
    assert rows[("mqtt", "heartbeat")]["accepted_recent"] == 7

    # Six minutes after the first batch, only the second one is within the window.
    later = source_health_frame(health, {}, T0 + 6 * 60_000)
    kafka = later.filter((pl.col("source") == "kafka") & (pl.col("stream") == "replication"))
    assert kafka.select("accepted_recent", "rejected_recent").row(0) == (5, 95)
    assert kafka.get_column("up").to_list() == [False]  # an unknown source is not up

    # And after nine, nothing: the last event time stays.
    quiet = source_health_frame(health, {}, T0 + 3 * 60_000 + WINDOW_MS + BUCKET_MS)
    assert quiet.filter(pl.col("stream") == "replication").select("accepted_recent", "rejected_recent", "last_event_ms").row(0) == (
        0, 0, T0 + 3 * 60_000)


def test_an_empty_batch_is_not_an_event() -> None:
    health = SourceHealth()
    health.record("kafka", "backup", accepted=0, rejected=0, at_ms=T0)
    assert source_health_frame(health, {}, T0).get_column("last_event_ms").to_list() == [None]


def test_memory_is_bounded_by_buckets_not_batches() -> None:
    health = SourceHealth()
    for i in range(10_000):  # a batch every 100 ms for 1000 s
        health.record("kafka", "replication", accepted=1, rejected=0, at_ms=T0 + i * 100)
    buckets = health._counts[("kafka", "replication", None)].buckets
    assert len(buckets) <= WINDOW_MS // BUCKET_MS + 1
    assert health.recent("kafka", "replication", T0 + 10_000 * 100)[0] in range(2_900, 3_001)


def test_counts_are_kept_per_partition_of_a_batch() -> None:
    health = SourceHealth()
    health.register("kafka", ["replication"])
    # Records from partitions 0 and 2; the two from partition 2 at positions 3 and 4 rejected.
    health.record_batch("kafka", "replication", [0, 0, 0, 2, 2, 2], rejected=[3, 4], at_ms=T0)
    frame = source_health_frame(health, {"kafka": True}, T0)
    assert frame.select("partition", "accepted_recent", "rejected_recent").rows() == [(0, 3, 0), (2, 1, 2)]
    # The placeholder row of the registered stream went once partitions were seen.
    assert frame.get_column("partition").null_count() == 0


def test_a_source_without_partitions_keeps_one_row_per_stream() -> None:
    health = SourceHealth()
    health.register("mqtt", ["heartbeat"])
    health.record_batch("mqtt", "heartbeat", [-1, -1, -1], rejected=[1], at_ms=T0)
    assert source_health_frame(health, {}, T0).select("partition", "accepted_recent", "rejected_recent").rows() == [
        (None, 2, 1)
    ]
