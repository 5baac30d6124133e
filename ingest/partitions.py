"""Which Azure Local instances came from which Kafka partition.

Records are keyed by `cluster_id`, so a partition carries whole instances and a consumer that
owns a partition owns their state. When a rebalance takes a partition away, the instances seen
on it (and on no partition this consumer keeps) are the state to drop.

The table is a small polars frame of distinct (topic, partition, cluster_id), updated once per
batch from the decoded valid rows — never per record. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection

import polars as pl

from ingest.source import Batch

TopicPartitionKey = tuple[str, int]

OWNERSHIP_SCHEMA = pl.Schema({"topic": pl.String(), "partition": pl.Int32(), "cluster_id": pl.String()})


def valid_row_origins(batch: Batch, rejects: pl.DataFrame, valid_height: int) -> pl.DataFrame:
    """(topic, partition) of each valid row of a decoded batch, in order.

    The decoder keeps valid rows in input order and lists every other input in `rejects`
    (`index` = position in the batch), so the valid rows are the inputs whose index is not
    rejected. Raises ValueError if the counts disagree (a decoder that broke that contract)."""
    origins = pl.DataFrame(
        {"topic": batch.topics, "partition": batch.partitions},
        schema={"topic": pl.String(), "partition": pl.Int32()},
    )
    if rejects.height:
        keep = ~pl.int_range(pl.len(), dtype=pl.Int64).is_in(rejects.get_column("index").implode())
        origins = origins.filter(keep)
    if origins.height != valid_height:
        raise ValueError(
            f"decoded batch has {valid_height} valid rows but {origins.height} unrejected inputs"
        )
    return origins


class PartitionOwnership:
    def __init__(self) -> None:
        self.frame = pl.DataFrame(schema=OWNERSHIP_SCHEMA)

    def observe(self, batch: Batch, valid: pl.DataFrame, rejects: pl.DataFrame) -> pl.DataFrame:
        """Note the instances of a decoded batch; returns this batch's distinct
        (topic, partition, cluster_id) rows (OWNERSHIP_SCHEMA)."""
        if valid.is_empty():
            return pl.DataFrame(schema=OWNERSHIP_SCHEMA)
        seen = (
            valid_row_origins(batch, rejects, valid.height)
            .with_columns(valid.get_column("cluster_id"))
            .unique()
        )
        new = seen.join(self.frame, on=["topic", "partition", "cluster_id"], how="anti")
        if new.height:
            self.frame = pl.concat([self.frame, new])
        return seen

    def clusters(self, partitions: Collection[TopicPartitionKey]) -> set[str]:
        """Instances seen on any of these partitions."""
        return set(self._on(partitions).get_column("cluster_id").to_list())

    def forget(self, partitions: Collection[TopicPartitionKey]) -> list[str]:
        """Stop tracking these partitions; returns the instances seen on them and on no other
        tracked partition (the state to drop). An instance also seen on a partition kept here
        (a producer that keyed it inconsistently) stays: part of its state is still ours."""
        if not partitions:
            return []
        gone = self._on(partitions)
        kept = self.frame.join(gone.select("topic", "partition").unique(), on=["topic", "partition"], how="anti")
        self.frame = kept
        return sorted(set(gone.get_column("cluster_id").to_list()) - set(kept.get_column("cluster_id").to_list()))

    def _on(self, partitions: Collection[TopicPartitionKey]) -> pl.DataFrame:
        wanted = pl.DataFrame(
            [(t, p) for t, p in partitions], schema={"topic": pl.String(), "partition": pl.Int32()}, orient="row"
        )
        return self.frame.join(wanted, on=["topic", "partition"], how="semi")
