"""`apply_replication` at the scale and in the cases the hypothesis tests of test_apply.py
draw rarely: long random sequences of batches (new VMs, a VM repeated in a batch, out-of-order
and equal timestamps, re-delivered event ids, every kind, nulls, changing links, technologies
and service groups, several policy sets), large batches, and a deliberately coarse `vm_key`
so that hash collisions between VMs are common. Each gives the state of the full-join
reference of test_apply.py, which matches VMs on `vm_id` alone."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from ingest.contracts import REPLICATION_KINDS, SCHEMAS, Stream
from rules import state
from rules.policy import DEFAULT_POLICY, Policy
from rules.state import REPLICATION_SCHEMA, FleetState
from tests.unit.test_apply import DERIVED, POLICY_SETS, S, T0, WINDOW, _same_state, old_apply_replication

DEDUPE_WINDOW_MS = 120_000


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows as the decoder hands them over (contract schema, Enums, UTC datetimes)."""
    schema = SCHEMAS[Stream.REPLICATION]
    plain = {
        name: pl.Int64 if dtype == pl.Datetime("ms", "UTC") else pl.String if isinstance(dtype, pl.Enum) else dtype
        for name, dtype in schema.items()
    }
    frame = pl.DataFrame({name: [row.get(name) for row in rows] for name in schema.names()}, schema=plain)
    return frame.cast(schema)


def random_batches(rng: random.Random, batches: int, vms: int, max_events: int) -> Iterator[pl.DataFrame]:
    """Batches over a growing set of VMs: repeats of a VM within a batch, equal and out-of-order
    timestamps (within a batch and against the table), re-delivered event ids, every kind, nulls
    in the optional fields, and links/technologies/service groups that change over time. Events
    of one VM at one instant carry the same descriptive fields, so which of them a reduction
    keeps does not depend on the (unspecified) order of equal rows."""
    fields: dict[tuple[str, int], dict[str, Any]] = {}
    sent: list[dict[str, Any]] = []
    for b in range(batches):
        known = max(2, vms * (b + 1) // batches)  # more VMs become known batch by batch
        rows = []
        for i in range(rng.randint(1, max_events)):
            if sent and rng.random() < 0.1:
                rows.append(dict(rng.choice(sent)))  # re-delivered: same event id and content
                continue
            vm = f"vm{rng.randrange(known)}"
            ts = b * 15 + rng.randint(-40, 20)  # on a coarse grid: ties are common
            kind = rng.choice(REPLICATION_KINDS)
            if (vm, ts) not in fields:
                fields[(vm, ts)] = {
                    "cluster_id": rng.choice(["hci-a", "hci-b"]) if rng.random() < 0.2 else "hci-a",
                    "target_id": rng.choice(["hci-c", "azure:westeurope"]) if rng.random() < 0.2 else "hci-c",
                    "technology": rng.choice(["hyperv_replica", "asr"]) if rng.random() < 0.2 else "asr",
                    "frequency_s": rng.choice([30, 300, 900]) if rng.random() < 0.2 else 300,
                    "pending_bytes": rng.choice([None, rng.randint(0, 10**9)]),
                    "vhd_bytes": rng.choice([None, rng.randint(0, 10**12)]),
                    "churn_bytes_per_s": rng.choice([None, rng.uniform(0, 1e7)]),
                    "storage_path_id": rng.choice(["csv1", "csv2", None]),
                    "service_group": rng.choice(["sg-web-1", "sg-db-1", None]),
                }
            rp = rng.randint(ts - 90, ts)
            row = {
                "event_id": f"e{b}-{i}" if rng.random() < 0.95 else f"e{b}-0",  # some repeated in-batch
                "ts": T0 + ts * S,
                "vm_id": vm,
                "kind": kind,
                "recovery_point_ts": T0 + rp * S if kind == "cycle_completed" or rng.random() < 0.5 else None,
                "received_at": T0 + (b * 15 + 30) * S,
                **fields[(vm, ts)],
            }
            rows.append(row)
        sent.extend(rows)
        yield _frame(rows)


def _coarse_vm_key() -> pl.Expr:
    """A vm_key with only three values: most pairs of VMs collide."""
    return pl.col("vm_id").hash() % 3


def _run(batches: Iterator[pl.DataFrame], policies: tuple[Policy, ...], step_ms: int) -> None:
    """Each batch deduplicated as the engine does, then applied with both implementations."""
    fleet = FleetState()
    old = pl.DataFrame(schema=REPLICATION_SCHEMA).drop(*DERIVED)
    now = T0
    for batch in batches:
        now += step_ms
        fleet, fresh = state.drop_seen(fleet, "replication", batch, now, DEDUPE_WINDOW_MS)
        before = fleet.replication
        fleet = replace(fleet, replication=state.apply_replication(before, fresh, policies, WINDOW))
        old = old_apply_replication(old, fresh, policies, WINDOW)
        new = fleet.replication
        _same_state(new, old, REPLICATION_SCHEMA)
        # Rows keep their positions, new VMs are appended, columns stay in one chunk.
        assert new.get_column("vm_id").head(before.height).equals(before.get_column("vm_id"))
        assert max(new.n_chunks("all"), default=1) == 1


@pytest.mark.parametrize("seed", range(40))
def test_random_batches_give_the_state_of_the_full_join(seed: int) -> None:
    rng = random.Random(seed)
    _run(random_batches(rng, 8, 30, 60), POLICY_SETS[seed % len(POLICY_SETS)], step_ms=15_000)


@pytest.mark.parametrize("seed", range(20))
def test_colliding_vm_keys_give_the_state_of_the_full_join(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "vm_key", _coarse_vm_key)
    rng = random.Random(1000 + seed)
    _run(random_batches(rng, 8, 12, 40), POLICY_SETS[seed % len(POLICY_SETS)], step_ms=15_000)


@pytest.mark.parametrize("seed", range(6))
def test_large_batches_give_the_state_of_the_full_join(seed: int) -> None:
    """Few repeats per VM, many VMs: the path the ingestion benchmark takes."""
    rng = random.Random(2000 + seed)
    _run(random_batches(rng, 6, 3000, 2500), POLICY_SETS[seed % len(POLICY_SETS)], step_ms=40_000)


def test_the_input_table_is_not_changed() -> None:
    rng = random.Random(7)
    batches = list(random_batches(rng, 3, 20, 40))
    table = state.apply_replication(pl.DataFrame(schema=REPLICATION_SCHEMA), batches[0], (DEFAULT_POLICY,), WINDOW)
    copy = table.clone()
    for batch in batches[1:]:
        state.apply_replication(table, batch, (DEFAULT_POLICY,), WINDOW)
    assert_frame_equal(table, copy, check_exact=True)
