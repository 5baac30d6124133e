"""The event-id dedupe table (rules/dedupe.py) and its use by rules.state.drop_seen."""

from __future__ import annotations

from unittest import mock

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import dedupe, state
from rules.dedupe import SeenIds

T0 = 1_790_000_000_000
WINDOW = 600_000
BUCKET = WINDOW // dedupe.BUCKETS_PER_WINDOW


def events(*ids: str, cluster: str = "c1") -> pl.DataFrame:
    """A batch: `ids` in order, each with its position (`seq`) so order can be checked. An id
    written "id@cluster" belongs to that instance."""
    split = [i.split("@") if "@" in i else [i, cluster] for i in ids]
    return pl.DataFrame(
        {"event_id": [s[0] for s in split], "cluster_id": [s[1] for s in split], "seq": list(range(len(ids)))},
        schema={"event_id": pl.String, "cluster_id": pl.String, "seq": pl.Int64},
    )


def apply(seen: SeenIds, batch: pl.DataFrame, now_ms: int, window_ms: int = WINDOW) -> tuple[SeenIds, list[str]]:
    after, fresh = seen.dedupe(batch, now_ms, window_ms)
    return after, fresh.get_column("event_id").to_list()


def knows(seen: SeenIds, *ids: str) -> list[bool]:
    return seen.known(dedupe.keys(events(*ids)).get_column(dedupe.HASH)).to_list()


def test_duplicates_within_a_batch_keep_the_first_in_batch_order() -> None:
    seen, fresh = SeenIds.for_window(WINDOW).dedupe(events("b", "a", "b", "c", "a", "d"), T0, WINDOW)
    assert fresh.get_column("event_id").to_list() == ["b", "a", "c", "d"]
    assert fresh.get_column("seq").to_list() == [0, 1, 3, 5]  # the first occurrences, other columns kept
    assert len(seen) == 4


def test_duplicates_across_batches_within_the_window_are_dropped() -> None:
    seen, fresh = apply(SeenIds.for_window(WINDOW), events("a", "b"), T0)
    assert fresh == ["a", "b"]
    seen, fresh = apply(seen, events("c", "a"), T0 + 1_000)
    assert fresh == ["c"]
    # Just inside the window of the first apply: still dropped, and the drop does not refresh it.
    seen, fresh = apply(seen, events("a", "b", "c", "d"), T0 + WINDOW - 1)
    assert fresh == ["d"]


def test_ids_older_than_the_window_apply_again() -> None:
    seen, _ = apply(SeenIds.for_window(WINDOW), events("a"), T0)
    seen, _ = apply(seen, events("b"), T0 + WINDOW // 2)
    # At most one bucket past the window, `a` is forgotten; `b` (half a window old) is not.
    seen, fresh = apply(seen, events("a", "b"), T0 + WINDOW + BUCKET)
    assert fresh == ["a"]
    # And once applied again it is remembered again.
    _, fresh = apply(seen, events("a"), T0 + WINDOW + BUCKET + 1)
    assert fresh == []


def test_whole_buckets_expire_and_the_others_are_shared() -> None:
    seen = SeenIds.for_window(WINDOW)
    for n in range(12):  # one id per bucket length, over more than the window (no expiry yet)
        seen = seen.remember(dedupe.keys(events(f"e{n}")), T0 + n * BUCKET)
    now = T0 + 11 * BUCKET
    starts = [b.start_ms for b in seen.buckets]
    assert starts == sorted(starts) and len(starts) == 12
    # Only the newest bucket keeps an unsorted tail: the others were merged into their runs.
    assert [b.tail.height for b in seen.buckets] == [0] * 11 + [1]
    assert [b.run.height for b in seen.buckets] == [1] * 11 + [0]
    expired = seen.expire(now, WINDOW)
    # Kept: the buckets holding any instant after now - window.
    assert [b.start_ms for b in expired.buckets] == [s for s in starts if s + BUCKET - 1 > now - WINDOW]
    assert len(expired.buckets) in (10, 11)  # the window, plus at most the bucket straddling its start
    assert all(any(b is old for old in seen.buckets) for b in expired.buckets)  # no copies
    assert knows(expired, "e0", "e2", "e11") == [False, True, True]
    assert expired.expire(now, WINDOW) is expired  # nothing more to drop: same object


def test_drop_clusters_forgets_only_those_instances() -> None:
    seen, _ = apply(SeenIds.for_window(WINDOW), events("a@c1", "b@c2", "c@c3"), T0)
    seen, _ = apply(seen, events("d@c1", "e@c2"), T0 + 2 * BUCKET)
    dropped = seen.drop_clusters(["c1", "c3"])
    assert knows(dropped, "a", "b", "c", "d", "e") == [False, True, False, False, True]
    assert len(dropped) == 2
    _, fresh = apply(dropped, events("a@c1", "b@c2", "d@c1", "e@c2"), T0 + 3 * BUCKET)
    assert fresh == ["a", "d"]
    assert seen.drop_clusters([]) is seen
    assert knows(seen.drop_clusters(["elsewhere"]), "a", "b") == [True, True]


def test_fleet_state_drop_seen_and_drop_clusters() -> None:
    fleet = state.FleetState()
    fleet, fresh = state.drop_seen(fleet, "replication", events("a@c1", "b@c2", "a@c1"), T0, WINDOW)
    assert fresh.get_column("event_id").to_list() == ["a", "b"]
    _, again = state.drop_seen(fleet, "replication", events("a@c1", "b@c2"), T0 + 1, WINDOW)
    assert again.is_empty()
    # Streams are deduplicated separately.
    _, other = state.drop_seen(fleet, "backup", events("a@c1"), T0 + 1, WINDOW)
    assert other.get_column("event_id").to_list() == ["a"]
    handed_over = state.drop_clusters(fleet, ["c1"])
    _, replayed = state.drop_seen(handed_over, "replication", events("a@c1", "b@c2"), T0 + 2, WINDOW)
    assert replayed.get_column("event_id").to_list() == ["a"]


def test_an_old_object_answers_as_before_after_updates() -> None:
    with mock.patch.object(dedupe, "TAIL_ROWS", 3):  # so that updates also rewrite runs
        before, _ = apply(SeenIds.for_window(WINDOW), events("a@c1", "b@c2"), T0)
        size = before.estimated_size()
        after, _ = apply(before, events("c", "d", "e", "f"), T0 + 1)
        after, _ = apply(after, events("g@c2"), T0 + 2 * BUCKET)
        after = after.drop_clusters(["c1"]).expire(T0 + WINDOW + BUCKET, WINDOW)
    assert knows(before, "a", "b", "c", "g") == [True, True, False, False]
    assert len(before) == 2 and before.estimated_size() == size
    assert knows(after, "a", "b", "c", "g") == [False, False, False, True]


def test_tail_is_sorted_into_the_run_past_its_limit() -> None:
    with mock.patch.object(dedupe, "TAIL_ROWS", 4):
        seen, _ = apply(SeenIds.for_window(WINDOW), events("a", "b", "c"), T0)
        (bucket,) = seen.buckets
        assert bucket.run.is_empty() and bucket.tail.height == 3
        seen, _ = apply(seen, events("d", "e"), T0 + 1)
        (bucket,) = seen.buckets
        assert bucket.tail.is_empty() and bucket.run.height == 5
        assert bucket.run.get_column(dedupe.HASH).is_sorted()
        seen, fresh = apply(seen, events("a", "e", "f"), T0 + 2)
    assert fresh == ["f"]
    assert knows(seen, "a", "b", "c", "d", "e", "f", "g") == [True] * 6 + [False]


def test_a_clock_stepping_back_files_ids_in_an_older_bucket() -> None:
    seen, _ = apply(SeenIds.for_window(WINDOW), events("a"), T0 + 5 * BUCKET)
    seen, fresh = apply(seen, events("a", "b"), T0 + 2 * BUCKET)
    assert fresh == ["b"]
    assert [b.start_ms for b in seen.buckets] == sorted(b.start_ms for b in seen.buckets)
    _, fresh = apply(seen, events("a", "b"), T0 + 6 * BUCKET)
    assert fresh == []


def test_from_frame_matches_applying_batch_by_batch_and_size_per_id() -> None:
    n = 200_000
    frame = pl.select(
        pl.format("ev-{}", pl.int_range(n)).alias("event_id"),
        pl.format("c{}", pl.int_range(n) % 100).alias("cluster_id"),
        (T0 - WINDOW + 1 + pl.int_range(n) * (WINDOW - 1) // n).alias("seen_ms"),
    )
    built = SeenIds.from_frame(frame, WINDOW)
    assert len(built) == n and len(built.buckets) in (10, 11)
    assert all(b.run.get_column(dedupe.HASH).is_sorted() for b in built.buckets)
    assert 16 <= built.estimated_size() / n <= 40
    batch = pl.concat([frame.select("event_id", "cluster_id").gather([0, 5, n - 1]), events("new-1", "new-2").drop("seq")])
    _, fresh = built.dedupe(batch, T0, WINDOW)
    assert fresh.get_column("event_id").to_list() == ["new-1", "new-2"]
    # After the window (plus a bucket) all are forgotten.
    _, fresh = built.dedupe(batch, T0 + WINDOW + BUCKET, WINDOW)
    assert fresh.height == 5


# --- property: against a reference model -----------------------------------------------------

SMALL_WINDOW = 100
SMALL_BUCKET = dedupe.bucket_length(SMALL_WINDOW)
IDS = st.integers(0, 15)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.integers(0, 70), st.lists(IDS, max_size=8)),
        st.tuples(st.just("drop"), st.integers(0, 0), st.lists(st.integers(0, 2), max_size=2)),
    ),
    max_size=30,
)


def cluster_of(i: int) -> str:
    return f"c{i % 3}"


@settings(max_examples=300, deadline=None)
@given(STEPS, st.integers(1, 6))
def test_matches_a_reference_model(steps: list[tuple[str, int, list[int]]], tail_rows: int) -> None:
    """Reference: a dict id -> when it was last applied. An id applied less than the window ago
    must be dropped; one applied at least a window and a bucket ago (or never, or forgotten by
    drop_clusters) must apply; in between either is right. Every old object must keep
    answering as it did."""
    model: dict[int, int] = {}
    seen = SeenIds.for_window(SMALL_WINDOW)
    now = T0
    snapshots: list[tuple[SeenIds, list[bool]]] = []
    every = [f"id{i}@{cluster_of(i)}" for i in range(16)]
    with mock.patch.object(dedupe, "TAIL_ROWS", tail_rows):
        for op, dt, values in steps:
            if op == "drop":
                clusters = sorted({f"c{v}" for v in values})
                seen = seen.drop_clusters(clusters)
                model = {i: t for i, t in model.items() if cluster_of(i) not in clusters}
            else:
                now += dt
                seen, fresh = apply(seen, events(*(f"id{i}@{cluster_of(i)}" for i in values)), now, SMALL_WINDOW)
                assert len(fresh) == len(set(fresh))
                assert fresh == [f for f in dict.fromkeys(f"id{i}" for i in values) if f in fresh]  # batch order
                for i in dict.fromkeys(values):
                    applied = f"id{i}" in fresh
                    age = now - model[i] if i in model else None
                    if age is not None and age < SMALL_WINDOW:
                        assert not applied, f"id{i} applied {age} ms ago was not dropped"
                    if age is None or age >= SMALL_WINDOW + SMALL_BUCKET:
                        assert applied, f"id{i} (age {age}) was dropped"
                    if applied:
                        model[i] = now
            snapshots.append((seen, knows(seen, *every)))
    for old, answers in snapshots:
        assert knows(old, *every) == answers
