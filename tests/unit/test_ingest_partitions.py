"""Which instances came from which partition: mapped from decoded batches, forgotten on revoke."""

from __future__ import annotations

import json

import polars as pl
import pytest

from ingest.contracts import Stream
from ingest.decode import decode_batch
from ingest.partitions import PartitionOwnership, valid_row_origins
from ingest.source import Batch

NOW = 1_795_000_000_000


def heartbeat(cluster: str, node: str = "n1") -> bytes:
    return json.dumps({"event_id": f"{cluster}:{node}", "ts": NOW, "cluster_id": cluster, "node_id": node,
                       "state": "up"}).encode()


def batch(records: list[tuple[str, int, bytes]]) -> Batch:
    return Batch("kafka", Stream.HEARTBEAT, [r[2] for r in records], [r[0] for r in records],
                 [r[1] for r in records], list(range(len(records))), NOW)


@pytest.mark.parametrize("poison", [b"", b'{"broken', b"\xff\xfe", b"[1]"])
def test_valid_rows_map_back_to_their_partition_on_both_decoder_paths(poison: bytes) -> None:
    # Rejects in between force the slow path for most of these; the mapping must still hold.
    records = [("hb", 0, heartbeat("a")), ("hb", 1, poison), ("hb", 2, heartbeat("b")),
               ("hb", 1, heartbeat("c")), ("hb", 0, b'{"event_id": "x"}'), ("hb", 2, heartbeat("d"))]
    b = batch(records)
    decoded = decode_batch(Stream.HEARTBEAT, b.payloads, NOW)
    origins = valid_row_origins(b, decoded.rejects, decoded.valid.height)
    assert origins.with_columns(decoded.valid.get_column("cluster_id")).rows() == [
        ("hb", 0, "a"), ("hb", 2, "b"), ("hb", 1, "c"), ("hb", 2, "d")]


def test_a_count_mismatch_is_an_error_not_a_silent_misattribution() -> None:
    b = batch([("hb", 0, heartbeat("a"))])
    with pytest.raises(ValueError):
        valid_row_origins(b, pl.DataFrame({"index": [], "reason": [], "detail": []}), 2)


def test_forget_drops_only_instances_seen_on_no_kept_partition() -> None:
    own = PartitionOwnership()
    first = batch([("hb", 0, heartbeat("a")), ("hb", 1, heartbeat("b")), ("hb", 0, heartbeat("a", "n2"))])
    decoded = decode_batch(Stream.HEARTBEAT, first.payloads, NOW)
    seen = own.observe(first, decoded.valid, decoded.rejects)
    assert sorted(seen.rows()) == [("hb", 0, "a"), ("hb", 1, "b")]
    # A mis-keyed producer put instance "b" on partition 2 as well.
    second = batch([("hb", 2, heartbeat("b")), ("hb", 2, heartbeat("c"))])
    decoded = decode_batch(Stream.HEARTBEAT, second.payloads, NOW)
    own.observe(second, decoded.valid, decoded.rejects)
    assert own.frame.height == 4  # distinct (topic, partition, cluster) only

    assert own.clusters([("hb", 1), ("hb", 2)]) == {"b", "c"}
    assert own.forget([("hb", 1)]) == []  # "b" is still on partition 2
    assert own.forget([("hb", 2), ("hb", 0)]) == ["a", "b", "c"]
    assert own.frame.is_empty()
