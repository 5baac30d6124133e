"""kill -9 of a process writing and compacting history leaves a store that reads correctly: no
partial file, no partial interval, nothing reported written is lost, and the restart's replay
of the last intervals duplicates nothing."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl

from exporters.history import maintenance, queries
from exporters.history.queries import Window
from exporters.history.store import HistoryStore
from exporters.history.tables import ALERTS, DAY_MS, VM

ROOT = Path(__file__).resolve().parents[2]
VMS = 20_000
T0 = 20_400 * DAY_MS - 40_000  # 40 s before midnight: the run crosses a day boundary

# Writes one 1-second interval per loop (a file of VMS rows and one alert transition), merges
# small files every few intervals and seals the past day, printing what is durably written.
CHILD = textwrap.dedent(
    """
    import dataclasses, json, sys
    import polars as pl
    from exporters.history import maintenance
    from exporters.history.store import HistoryStore
    from exporters.history.writer import HistoryWriter
    from rules.views import empty_views

    root, start_s, vms, t0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = HistoryStore(root)
    writer = HistoryWriter(store, interval_ms=1000, transitions_delay_ms=0)
    base = empty_views()
    names = pl.Series([f"vm-{i:05d}" for i in range(vms)])
    policy = maintenance.Policy(min_files=4, seal_after_ms=0)
    second = start_s
    while True:
        now = t0 + second * 1000
        frame = pl.DataFrame({
            "vm": names, "hci_cluster": "c1", "target": "t", "technology": "asr", "service_group": "sg",
            "lag_seconds": pl.Series([float(second % 900)] * vms), "rpo_target_seconds": 600.0,
            "pending_bytes": pl.Series([second] * vms),
        })
        writer.add_transitions(pl.DataFrame([{
            "alertname": "A", "alert_key": f"k{second}", "hci_cluster": "c1", "severity": "critical",
            "transition": "fired", "at_ms": now, "labels": json.dumps({"vm": "vm-00001"}), "annotations": "{}",
        }]))
        writer.absorb(base.replace(now_ms=now, vm_replication=frame))
        # The previous second's interval is written once this tick started a new one.
        print(f"written {second - 1}", flush=True)
        if second % 3 == 0:
            maintenance.run(store, now, policy)
            print("maintained", flush=True)
        second += 1
    """
)


def start_child(root: Path, start_s: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(start_s), str(VMS), str(T0)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def check_store(store: HistoryStore, written: int) -> None:
    """Every file reads; every interval up to `written` is there whole, once."""
    window = Window(T0 - DAY_MS, T0 + 10 * DAY_MS)
    rows = store.scan(VM, window.start_ms, window.end_ms).collect()
    per_second = rows.group_by("ts_ms").len().sort("ts_ms")
    seconds = ((per_second.get_column("ts_ms") - T0) // 1000).to_list()
    assert seconds[: written + 1] == list(range(written + 1)), "a written interval is missing"
    assert set(per_second.get_column("len").to_list()) == {VMS}, "an interval is partial or duplicated"
    assert rows.select(pl.struct("vm", "ts_ms").n_unique()).item() == rows.height
    log = store.scan(ALERTS, window.start_ms, window.end_ms).collect()
    assert log.get_column("alert_key").n_unique() == log.height
    compliance = queries.compliance(store, window, "vm")
    assert compliance.height == VMS
    assert set(compliance.get_column("observed_seconds").to_list()) == {float(len(seconds))}


def test_kill_minus_9_while_writing_and_compacting(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    rng = random.Random(6)
    written = -1
    for _ in range(4):
        # A restart replays from a little before what was last written (at-least-once).
        child = start_child(tmp_path, max(0, written - 2))
        try:
            assert child.stdout is not None
            deadline = time.monotonic() + 60
            target = written + rng.randint(8, 16)
            while written < target and time.monotonic() < deadline:
                line = child.stdout.readline()
                if not line:
                    raise AssertionError(f"the writer died: {child.stderr.read() if child.stderr else ''}")
                if line.startswith("written "):
                    written = max(written, int(line.split()[1]))
            time.sleep(rng.uniform(0.0, 0.3))  # land somewhere in the next write or merge
        finally:
            child.kill()  # SIGKILL: no cleanup, no flush
            child.wait(timeout=30)
        check_store(store, written)
    # Finishing the compaction the kills interrupted changes no answer.
    before = queries.compliance(store, Window(T0 - DAY_MS, T0 + DAY_MS), "vm")
    maintenance.run(store, T0 + 2 * DAY_MS, maintenance.Policy(seal_after_ms=0))
    assert store.sealed_rollup("2025-11-07") is not None
    assert all(len(store.files(VM, day)) == 1 for day in store.storage.days("vm"))
    check_store(store, written)
    assert queries.compliance(store, Window(T0 - DAY_MS, T0 + DAY_MS), "vm").equals(before)
