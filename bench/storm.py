"""The disaster rpowatch watches for: a share of the fleet breaches its RPO at once.

    python3 -m bench.storm --vms 1000000 --share 0.2 1.0

A replica site going down stops every replication to it at the same moment; once the lag
passes the RPO, all those VMs breach in the same tick, and a tick must then create and label
their alerts on top of its usual work. For each `--share`, a fresh fleet of bench.tick runs a
few seconds of steady traffic, then the first share of its VMs gets a recovery point two hours
old (far past every RPO), and the following ticks are timed: the first one creates the storm's
alerts, the later ones carry them. Printed per tick: its time and phases, the alert count, the
transitions (fired) and the time to render them with labels and annotations (what the history
writer and the Alertmanager sender read, on their own threads), the preparation of the next
tick that the service runs after each (Engine.prepare, untimed in the tick) and the process's
RSS. The
`max` baseline of bench.tick (one pass over one column, whatever the data) is timed before each
tick: compare the ratios between runs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import polars as pl

from bench._common import machine_line, ms, rss_bytes, timed
from bench.tick import NOW0_MS, TICK_STEP_MS, baseline, build_state, load_engine, run_second
from rules.state import FleetState

STEADY_SECONDS = 4
HOURS_BEHIND_MS = 2 * 3_600_000  # past every RPO of bench.tick's fleet (30 min at most)
MIB = 1024**2


def stalled(fleet: FleetState, share: float, now_ms: int) -> tuple[FleetState, int]:
    """`fleet` with its first `share` of VMs two hours behind at `now_ms`, and their number."""
    stormed = int(fleet.replication.height * share)
    late = pl.int_range(pl.len()) < stormed
    replication = fleet.replication.with_columns(
        pl.when(late).then(pl.lit(now_ms - HOURS_BEHIND_MS)).otherwise(pl.col("last_recovery_point_ms"))
        .alias("last_recovery_point_ms")
    )
    return replace(fleet, replication=replication), stormed


def storm(vms: int, share: float, ticks: int, vms_per_cluster: int) -> None:
    engine = load_engine()
    engine.fleet = build_state(vms, vms_per_cluster)
    now = NOW0_MS
    for _ in range(STEADY_SECONDS):
        now += TICK_STEP_MS
        run_second(engine, now)
        engine.tick(now)
    before, rss_before = engine.alerts.height, rss_bytes()
    engine.fleet, stormed = stalled(engine.fleet, share, now)
    print(f"\n{vms:,} VMs, {stormed:,} of them ({share:.0%}) two hours behind at once; "
          f"{before:,} alerts and {rss_before / MIB:,.0f} MiB RSS before\n")
    print("| tick | ms | max ms | tick / max | aggregates | conditions | labels | lifecycle | transitions "
          "| alerts | fired | render fired ms | prepare after ms | RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in range(1, ticks + 1):
        now += TICK_STEP_MS
        base = baseline(engine.fleet)
        seconds, result = timed(lambda: engine.tick(now))
        fired = result.changes.filter(pl.col("transition") == "fired").height
        rendered, _ = timed(lambda: result.transitions)
        # As the service does after each tick: the next tick's preparation (nothing reports
        # during the storm, so the next tick evaluates no row again).
        prepared, _ = timed(lambda: engine.prepare(now, TICK_STEP_MS))
        phases = " | ".join(f"{ms(result.phases.get(p, 0.0)):.0f}"
                            for p in ("aggregates", "conditions", "labels", "lifecycle", "transitions"))
        print(f"| {n} | {ms(seconds):.0f} | {ms(base):.2f} | {seconds / base:.0f} | {phases} "
              f"| {engine.alerts.height:,} | {fired:,} | {ms(rendered):.0f} | {ms(prepared):.0f} "
              f"| {rss_bytes() / MIB:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=1_000_000)
    parser.add_argument("--share", type=float, nargs="+", default=[0.2, 1.0], help="shares of the fleet (0..1]")
    parser.add_argument("--ticks", type=int, default=5, help="ticks timed after the storm starts")
    parser.add_argument("--vms-per-cluster", type=int, default=100)
    args = parser.parse_args()
    if not all(0 < s <= 1 for s in args.share):
        parser.error("--share values must be in (0, 1]")
    print(f"# bench.storm  {machine_line()}")
    for share in args.share:
        storm(args.vms, share, args.ticks, args.vms_per_cluster)


if __name__ == "__main__":
    main()
