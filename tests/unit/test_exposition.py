"""exporters.exposition: the scrape written by polars says what prometheus_client's own encoders
say, in both formats, for labels that need escaping and values that need spelling."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import polars as pl
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from bench.tick import NOW0_MS, build_state, load_engine
from exporters.exposition import VALUE, FrameGauge, encode, encoder_for
from exporters.metrics import RpowatchCollector
from exporters.snapshot import Snapshot, SnapshotHolder

AWKWARD = ('vm "quoted"', "vm\\back\\slashed", "vm\nnewline", "vm-ünïcödé", "")


def _registry() -> CollectorRegistry:
    """The collector over a real tick of a small fleet whose first VMs have awkward names,
    plus a histogram (a family prometheus_client writes)."""
    engine = load_engine()
    fleet = build_state(600, 100)
    ids = fleet.replication.get_column("vm_id").to_list()
    ids[: len(AWKWARD)] = AWKWARD
    engine.fleet = replace(fleet, replication=fleet.replication.with_columns(pl.Series("vm_id", ids)))
    holder = SnapshotHolder()
    holder.set(Snapshot(engine.tick(NOW0_MS)))
    registry = CollectorRegistry()
    registry.register(RpowatchCollector(holder, clock=lambda: NOW0_MS / 1000 + 2.5))
    Histogram("rpowatch_evaluation_duration_seconds", "Seconds a tick took.", registry=registry).observe(0.042)
    return registry


def _samples(families: Any) -> dict[str, tuple[str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]:
    """Per family: its type, HELP and samples (sorted; NaN as a marker)."""
    out = {}
    for family in families:
        samples = sorted(
            (s.name, tuple(sorted(s.labels.items())), -0.5 if math.isnan(s.value) else s.value) for s in family.samples
        )
        out[family.name] = (family.type, family.documentation, samples)
    return out


def test_the_text_format_says_what_prometheus_client_says() -> None:
    registry = _registry()
    fast, reference = encode(registry).decode(), generate_latest(registry).decode()
    got, want = _samples(text_string_to_metric_families(fast)), _samples(text_string_to_metric_families(reference))
    assert got == want
    assert len(got["rpowatch_replication_lag_seconds"][2]) == 600
    vms = {dict(labels)["vm"] for _, labels, _ in got["rpowatch_replication_lag_seconds"][2]}
    assert set(AWKWARD) <= vms  # escaped on the way out, read back unchanged
    assert any(value == math.inf for _, _, value in got["rpowatch_replication_time_to_breach_seconds"][2])


def test_openmetrics_says_what_prometheus_client_says_and_ends_once() -> None:
    registry = _registry()
    encoder, content_type = encoder_for("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    fast = encoder(registry).decode()
    assert fast.endswith("# EOF\n") and fast.count("# EOF") == 1
    reference = generate_openmetrics(registry).decode()
    assert _samples(parse_openmetrics(fast)) == _samples(parse_openmetrics(reference))


def test_a_frame_gauge_reads_as_ordinary_samples() -> None:
    frame = pl.DataFrame({"vm": ["a", "b"], VALUE: [1.5, float("inf")]})
    family = FrameGauge("rpowatch_x", "X.", ["vm"], frame)
    assert [(s.labels, s.value) for s in family.samples] == [({"vm": "a"}, 1.5), ({"vm": "b"}, math.inf)]
    assert family.text() == b'rpowatch_x{vm="a"} 1.5\nrpowatch_x{vm="b"} +Inf\n'


@pytest.mark.parametrize("accept", ["", "text/plain; version=0.0.4", "*/*"])
def test_the_text_format_is_the_default(accept: str) -> None:
    encoder, content_type = encoder_for(accept)
    assert content_type.startswith("text/plain")
    assert "# EOF" not in encoder(_registry()).decode()
