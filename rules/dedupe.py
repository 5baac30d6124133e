"""The event ids applied recently, so that a replayed or re-delivered event counts only once.

At steady state a million VMs send ~15,000 events/s, so a 10-minute window holds ~9 M ids.
Three choices keep that table small and each batch cheap:

- Ids are kept as 64-bit hashes (`Expr.hash`), not strings: 16 bytes per id with the hash of
  the id's instance (which lets a partition hand-over forget an instance's ids). The hash is
  only ever compared within this process, so polars' per-version hash is good enough. Two ids
  sharing a hash make the second look like a duplicate: with n ids remembered per window, the
  odds of any such pair in a window are about n² / 2⁶⁵ (9 M ids: ~2e-6), and the cost of one is
  a single event not counted.
- Ids live in time buckets of a tenth of the window (by the time they were applied), and expiry
  drops whole buckets instead of filtering millions of rows. A tenth bounds both the number of
  buckets searched per batch (at most 11) and how long an id can outlive the window (one
  bucket: ids older than the window may still be remembered for up to a tenth of it more, which
  only errs towards dropping a very late replay; ids inside the window are always remembered).
  A fixed length (60 s, say) would make that overshoot 6x a 10 s window, and a 1 h window cost
  61 searches per batch.
- Each bucket is a run sorted by hash; the newest bucket also has a short unsorted tail of the
  latest additions. A batch is tested with one binary search per run (`search_sorted` of the
  batch's sorted hashes: the cost grows with the batch, not with the table) and a scan of the
  one tail. The tail is merged into its run once it passes TAIL_ROWS rows, and when its bucket
  stops being the newest, so a whole run is rewritten every dozen large batches, not each one.
  Measured in one run at 8.9 M ids and 10,000-event batches: `is_in` of the batch against all
  hashes, or an anti-join, hashes the 8.9 M side every time (~500 ms); scanning all hashes with
  an `is_in` of the batch ~31 ms; the binary searches ~17-21 ms, and ~4 ms for a whole
  100-event batch, where a scan still costs the full 31 ms.

Objects are immutable: every update returns a new SeenIds that shares the frames it did not
change, so a FleetState snapshot held by a reader never changes underneath it.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection
from dataclasses import dataclass, replace

import polars as pl

HASH = "id_hash"
CLUSTER = "cluster_hash"
KEY_SCHEMA = pl.Schema({HASH: pl.UInt64(), CLUSTER: pl.UInt64()})

BUCKETS_PER_WINDOW = 10
# Rows the newest bucket takes unsorted before they are merged into its run: large enough that
# a run of ~900 k rows is rewritten only every ~13 batches of 10,000 events, small enough that
# scanning the tail costs well under a millisecond.
TAIL_ROWS = 131_072
# A tail grown by many small batches is copied into one chunk past this many pieces, so that
# scans do not walk thousands of one-row chunks.
TAIL_CHUNKS = 16


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=KEY_SCHEMA)


def _key_exprs() -> list[pl.Expr]:
    # Cast to String first so that a categorical column hashes its text, not its code.
    return [
        pl.col("event_id").cast(pl.String).hash().alias(HASH),
        pl.col("cluster_id").cast(pl.String).hash().alias(CLUSTER),
    ]


def keys(events: pl.DataFrame) -> pl.DataFrame:
    """Per event: the hashes of its `event_id` and `cluster_id` (columns HASH, CLUSTER)."""
    return events.select(_key_exprs())


def cluster_hashes(cluster_ids: Collection[str]) -> pl.Series:
    """The CLUSTER hashes of these instance ids, as `keys` computes them."""
    return pl.Series(CLUSTER, list(cluster_ids), dtype=pl.String).hash()


def _in_sorted(run: pl.Series, needles: pl.Series) -> pl.Series:
    """The needles present in `run` (sorted ascending), by one binary search each."""
    if run.is_empty() or needles.is_empty():
        return needles.clear()
    at = run.search_sorted(needles, side="left").clip(upper_bound=run.len() - 1)
    return needles.filter(run.gather(at) == needles)


@dataclass(frozen=True)
class Bucket:
    """The ids applied in [start_ms, start_ms + bucket length): `run` sorted by HASH, `tail`
    the latest additions in arrival order."""

    start_ms: int
    run: pl.DataFrame
    tail: pl.DataFrame

    @property
    def height(self) -> int:
        return self.run.height + self.tail.height

    def matches(self, needles: pl.Series) -> list[pl.Series]:
        """The needles (distinct, sorted) this bucket holds, one Series per part."""
        found = [_in_sorted(self.run.get_column(HASH), needles)]
        if not self.tail.is_empty():
            tail = self.tail.get_column(HASH)
            found.append(tail.filter(tail.is_in(needles.implode())))
        return found

    def add(self, rows: pl.DataFrame) -> Bucket:
        tail = pl.concat([self.tail, rows])
        if tail.height > TAIL_ROWS:
            return replace(self, tail=tail).sealed()
        if tail.n_chunks() > TAIL_CHUNKS:
            tail = tail.rechunk()
        return replace(self, tail=tail)

    def sealed(self) -> Bucket:
        """With the tail sorted into the run. A merge of two sorted frames is linear: about
        half the time of sorting their concatenation again."""
        if self.tail.is_empty():
            return self
        return replace(self, run=self.run.merge_sorted(self.tail.sort(HASH), HASH), tail=_empty())

    def without(self, clusters: pl.Series) -> Bucket:
        """This bucket without the ids of these instances (the same object if it has none)."""
        wanted = clusters.implode()
        drop_run = self.run.get_column(CLUSTER).is_in(wanted)
        drop_tail = self.tail.get_column(CLUSTER).is_in(wanted)
        if not (drop_run.any() or drop_tail.any()):
            return self
        # A filter keeps the order, so the run stays sorted.
        return replace(self, run=self.run.filter(~drop_run), tail=self.tail.filter(~drop_tail))


def bucket_length(window_ms: int) -> int:
    return max(1, window_ms // BUCKETS_PER_WINDOW)


@dataclass(frozen=True)
class SeenIds:
    """Event ids applied recently (see the module docstring), in buckets ordered by start."""

    bucket_ms: int
    buckets: tuple[Bucket, ...] = ()

    @classmethod
    def for_window(cls, window_ms: int) -> SeenIds:
        """Empty, with buckets sized for this window. The length stays with the object: called
        later with another window, expiry is still right, give or take one such bucket."""
        return cls(bucket_length(window_ms))

    @classmethod
    def from_frame(cls, seen: pl.DataFrame, window_ms: int) -> SeenIds:
        """Built at once from ids already applied: columns event_id, cluster_id and seen_ms
        (when each was applied). For benchmarks and tests, which need millions of them."""
        length = bucket_length(window_ms)
        start = (pl.col("seen_ms") // length * length).alias("start_ms")
        staged = seen.select(*_key_exprs(), start)
        parts = staged.partition_by("start_ms", as_dict=True, include_key=False)
        buckets = [Bucket(int(key[0]), part.sort(HASH), _empty()) for key, part in parts.items()]
        return cls(length, tuple(sorted(buckets, key=lambda b: b.start_ms)))

    def __len__(self) -> int:
        return sum(b.height for b in self.buckets)

    def estimated_size(self) -> int:
        """Bytes held by the frames (frames shared with other snapshots count in each)."""
        return sum(int(b.run.estimated_size()) + int(b.tail.estimated_size()) for b in self.buckets)

    def expire(self, now_ms: int, window_ms: int) -> SeenIds:
        """Without the buckets whose every id was applied at or before `now_ms - window_ms`
        (the ids of the bucket straddling that instant stay until the whole bucket is out)."""
        kept = tuple(b for b in self.buckets if b.start_ms + self.bucket_ms - 1 > now_ms - window_ms)
        return self if len(kept) == len(self.buckets) else replace(self, buckets=kept)

    def known(self, hashes: pl.Series) -> pl.Series:
        """Per hash (HASH values, in order): whether it is remembered."""
        if not self.buckets or hashes.is_empty():
            return pl.Series(hashes.name, [False] * hashes.len(), dtype=pl.Boolean)
        # Sorted needles make successive binary searches touch nearby memory.
        needles = hashes.unique().sort()
        found = pl.concat([part for b in self.buckets for part in b.matches(needles)])
        if found.is_empty():  # the usual case: nothing to look up the batch in
            return pl.repeat(False, hashes.len(), dtype=pl.Boolean, eager=True).alias(hashes.name)
        return hashes.is_in(found.implode())

    def remember(self, rows: pl.DataFrame, now_ms: int) -> SeenIds:
        """With these keys (columns HASH, CLUSTER) applied at `now_ms`."""
        if rows.is_empty():
            return self
        start = now_ms // self.bucket_ms * self.bucket_ms
        starts = [b.start_ms for b in self.buckets]
        at = bisect.bisect_left(starts, start)
        if at < len(starts) and starts[at] == start:
            buckets = (*self.buckets[:at], self.buckets[at].add(rows), *self.buckets[at + 1 :])
        else:  # usually a new newest bucket; an older one only if the clock stepped back
            buckets = (*self.buckets[:at], Bucket(start, _empty(), _empty()).add(rows), *self.buckets[at:])
        # Only the newest bucket keeps a tail, so a batch scans one tail at most: the others
        # are sealed when they stop being the newest (once per bucket length).
        last = len(buckets) - 1
        return replace(self, buckets=tuple(b if n == last else b.sealed() for n, b in enumerate(buckets)))

    def drop_clusters(self, cluster_ids: Collection[str]) -> SeenIds:
        """Without the ids of these instances: if one comes back, its replayed events apply."""
        if not cluster_ids:
            return self
        clusters = cluster_hashes(cluster_ids)
        kept = tuple(b for b in (b.without(clusters) for b in self.buckets) if b.height > 0)
        return replace(self, buckets=kept)

    def dedupe(self, events: pl.DataFrame, now_ms: int, window_ms: int) -> tuple[SeenIds, pl.DataFrame]:
        """The events whose `event_id` was not applied within the last `window_ms` before
        `now_ms` (of ids repeated within the batch, the first, in batch order), and the ids
        remembered once they are applied."""
        current = self.expire(now_ms, window_ms)
        batch = keys(events)
        hashes = batch.get_column(HASH)
        fresh = hashes.is_first_distinct() & ~current.known(hashes)
        if fresh.all():  # the usual case: no copy of the batch (its strings) by a filter
            return current.remember(batch, now_ms), events
        return current.remember(batch.filter(fresh), now_ms), events.filter(fresh)
