"""The vectorized alert lifecycle against a plain reference model (hypothesis state machine)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rules import lifecycle

KEYS = ["a", "b", "c"]
ID = {k: 1000 + i for i, k in enumerate(KEYS)}  # alert ids
KEY = {i: k for k, i in ID.items()}


@dataclass
class Model:
    state: str
    active_at: int
    fired_at: int | None
    last_true: int
    resolved_at: int | None


def reference_step(model: dict[str, Model], active: set[str], now: int, for_ms: int, keep_ms: int, retention_ms: int) -> None:
    """Prometheus's alerting-rule semantics, one alert at a time."""
    for key in sorted(set(model) | active):
        prev = model.get(key)
        if key in active:
            fresh = prev is None or prev.state == lifecycle.RESOLVED
            active_at = now if fresh or prev is None else prev.active_at
            was_firing = prev is not None and prev.state == lifecycle.FIRING
            firing = was_firing or now - active_at >= for_ms
            fired_at = (prev.fired_at if was_firing and prev is not None else now) if firing else None
            model[key] = Model(lifecycle.FIRING if firing else lifecycle.PENDING, active_at, fired_at, now, None)
        elif prev is None:
            continue
        elif prev.state == lifecycle.PENDING:
            del model[key]
        elif prev.state == lifecycle.FIRING:
            if now - prev.last_true >= keep_ms:
                prev.state, prev.resolved_at = lifecycle.RESOLVED, now
        elif prev.resolved_at is not None and now - prev.resolved_at >= retention_ms:
            del model[key]


class LifecycleMachine(RuleBasedStateMachine):
    @initialize(for_ms=st.sampled_from([0, 1000, 3000]), keep_ms=st.sampled_from([0, 2000]),
                retention_ms=st.sampled_from([1000, 5000]))
    def setup(self, for_ms: int, keep_ms: int, retention_ms: int) -> None:
        self.for_ms, self.keep_ms, self.retention_ms = for_ms, keep_ms, retention_ms
        self.now = 1_000_000
        self.active: set[str] = set()
        self.model: dict[str, Model] = {}
        self.table = lifecycle.empty_alerts()
        self.timing = pl.DataFrame({"rule": [0], "for_ms": [for_ms], "keep_firing_for_ms": [keep_ms]}, schema=lifecycle.TIMING_SCHEMA)
        self.transitions: list[tuple[str, str]] = []

    @rule(keys=st.sets(st.sampled_from(KEYS)))
    def set_condition(self, keys: set[str]) -> None:
        self.active = keys

    @rule(dt=st.integers(0, 4000))
    def tick(self, dt: int) -> None:
        self.now += dt
        before = {k: m.state for k, m in self.model.items()}
        keys = sorted(self.active)
        active = pl.DataFrame(
            {"alert_id": [ID[k] for k in keys], "rule": [0] * len(keys), "row": list(range(len(keys)))},
            schema=lifecycle.ACTIVE_SCHEMA,
        )
        known = set(self.table.get_column("alert_key").to_list())
        fresh = [k for k in keys if k not in known]
        new = pl.DataFrame(
            {"alert_id": [ID[k] for k in fresh], "rule": [0] * len(fresh), "alertname": ["R"] * len(fresh),
             "alert_key": fresh, "hci_cluster": ["c"] * len(fresh), "severity": ["warning"] * len(fresh)},
            schema=lifecycle.NEW_SCHEMA,
        )
        self.table, changes = lifecycle.advance(self.table, active, new, self.now, self.timing, self.retention_ms)
        transitions = changes.with_columns(pl.col("alert_id").replace_strict(KEY, return_dtype=pl.String).alias("alert_key"))
        reference_step(self.model, self.active, self.now, self.for_ms, self.keep_ms, self.retention_ms)
        after = {k: m.state for k, m in self.model.items()}
        expected = sorted(
            [(k, "fired") for k, s in after.items() if s == lifecycle.FIRING and before.get(k) != lifecycle.FIRING]
            + [(k, "resolved") for k, s in after.items() if s == lifecycle.RESOLVED and before.get(k) == lifecycle.FIRING]
        )
        assert sorted(transitions.select("alert_key", "transition").rows()) == expected

    @invariant()
    def table_matches_model(self) -> None:
        if not hasattr(self, "model"):
            return
        got = {
            key: (state, active_at, fired_at, resolved_at)
            for key, state, active_at, fired_at, resolved_at in self.table.select(
                "alert_key", "state", "active_at_ms", "fired_at_ms", "resolved_at_ms"
            ).iter_rows()
        }
        want = {k: (m.state, m.active_at, m.fired_at, m.resolved_at) for k, m in self.model.items()}
        assert got == want


LifecycleMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestLifecycle = LifecycleMachine.TestCase
