"""Ticks over a long run: does a tick cost the same after many minutes as after a few seconds?

    python3 -m bench.tick_soak --vms 100000 --ticks 900

bench.tick times 15 ticks; a service ticks for weeks. What a tick leaves behind (tables
appended to, stores that grow) shows only over many ticks, so this runs `--ticks` of them on
the same fleet and traffic as bench.tick (`run_second` before each, untimed) as fast as they
go (simulated seconds, not wall seconds), and prints the median tick of each sixth of the run,
with the filter baseline of bench.tick timed before each tick and the largest chunk count of
the alert table and the label store. A ratio of the last sixth to the first near 1 means
nothing accumulates.
"""

from __future__ import annotations

import argparse
import statistics

from bench._common import machine_line, ms, timed
from bench.tick import NOW0_MS, TICK_STEP_MS, baseline_filter, build_state, load_engine, run_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=100_000)
    parser.add_argument("--ticks", type=int, default=900, help="simulated seconds (default: 15 minutes)")
    parser.add_argument("--vms-per-cluster", type=int, default=100)
    args = parser.parse_args()
    if args.ticks < 12:
        parser.error("--ticks must be at least 12 (six windows of two)")

    engine = load_engine()
    engine.fleet = build_state(args.vms, args.vms_per_cluster)
    print(f"# bench.tick_soak  {machine_line()}")
    print(f"{args.vms:,} VMs, {args.ticks} ticks one simulated second apart, each second's traffic applied first\n")
    print("| ticks | tick median ms | filter baseline ms | tick / filter | alert table chunks | label store chunks |")
    print("|---:|---:|---:|---:|---:|---:|")
    window = args.ticks // 6
    ticks: list[float] = []
    filters: list[float] = []
    ratios: list[float] = []
    now = NOW0_MS
    for n in range(1, args.ticks + 1):
        now += TICK_STEP_MS
        run_second(engine, now)
        filters.append(baseline_filter(engine.fleet, now))
        seconds, _ = timed(lambda: engine.tick(now))
        ticks.append(seconds)
        if n % window == 0 and len(ratios) < 6:
            tick, base = statistics.median(ticks), statistics.median(filters)
            ratios.append(tick / base)
            alerts, labels = (max(frame.n_chunks("all"), default=1) for frame in (engine.alerts, engine._labels))
            span = f"{n - window + 1}–{n}"
            print(f"| {span} | {ms(tick):.1f} | {ms(base):.2f} | {tick / base:.1f} | {alerts} | {labels} |")
            ticks, filters = [], []
    print(f"\nlast sixth / first sixth (tick / filter): {ratios[-1] / ratios[0]:.2f}")


if __name__ == "__main__":
    main()
