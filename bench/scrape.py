"""What one /metrics scrape costs at fleet scale, and how much the polars writer saves.

    python3 -m bench.scrape --sizes 2000 100000
    python3 -m bench.scrape --sizes 1000000 --per-vm violating none
    python3 -m bench.scrape --sizes 1000000 --per-vm violating --storm 1.0 --max-vms 20000 --no-baseline

For each size: bench.tick's fleet, one tick, then the scrape's body rendered from the service's
collector with every `export.per_vm` setting, by `exporters.exposition.encode` (what /metrics
serves) and by prometheus_client's own `generate_latest` (the baseline, same process, same
snapshot), alternated, median of `--repeats`; with the body's lines and megabytes, and what
gzip (at the level /metrics uses when the scraper accepts it, as Prometheus does) adds in
seconds and leaves in megabytes. `--storm SHARE` scrapes after that share of the fleet fell two
hours behind (bench.storm), when `violating` covers it all; `--max-vms` sets export.max_vms.
"""

from __future__ import annotations

import argparse
import gzip
import statistics

from prometheus_client import CollectorRegistry, generate_latest

from bench._common import machine_line, timed
from bench.storm import stalled
from bench.tick import NOW0_MS, build_state, load_engine
from exporters.exposition import encode
from exporters.http import GZIP_LEVEL
from exporters.metrics import RpowatchCollector
from exporters.snapshot import Snapshot, SnapshotHolder


def scrape_clock() -> float:
    """The scrape happens 2.5 s after the tick."""
    return NOW0_MS / 1000 + 2.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--per-vm", nargs="+", choices=("all", "violating", "none"), default=["all", "violating", "none"],
        help="export.per_vm settings to measure (a million VMs with `all` takes minutes)",
    )
    parser.add_argument("--max-vms", type=int, default=None, help="export.max_vms (default: no cap)")
    parser.add_argument("--storm", type=float, default=0.0, help="share of the fleet two hours behind (0..1)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip prometheus_client's encoder (minutes for a body of millions of lines)")
    args = parser.parse_args()
    print(f"# bench.scrape  {machine_line()}")
    print(f"storm share {args.storm:g}, export.max_vms {args.max_vms or 'none'}\n")
    print(
        "| VMs | export.per_vm | lines | MB | encode s | prometheus_client s | **encode / prometheus_client** |"
        " gzip s | gzip MB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        engine = load_engine()
        engine.fleet = build_state(size, 100)
        if args.storm:
            engine.fleet, _ = stalled(engine.fleet, args.storm, NOW0_MS)
        holder = SnapshotHolder()
        holder.set(Snapshot(engine.tick(NOW0_MS)))
        for per_vm in args.per_vm:
            registry = CollectorRegistry()
            registry.register(RpowatchCollector(holder, per_vm, clock=scrape_clock, export_max_vms=args.max_vms))
            fast: list[float] = []
            slow: list[float] = []
            body = b""
            for _ in range(args.repeats):
                seconds, body = timed(lambda: encode(registry))
                fast.append(seconds)
                if args.baseline:
                    seconds, _ = timed(lambda: generate_latest(registry))
                    slow.append(seconds)
            f = statistics.median(fast)
            s = statistics.median(slow) if slow else 0.0
            zipped: list[float] = []
            compressed = b""
            for _ in range(args.repeats):
                seconds, compressed = timed(lambda: gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0))
                zipped.append(seconds)
            lines = body.count(b"\n")
            baseline = f"{s:.2f} | **{f / s:.3f}**" if slow else "— | —"
            print(
                f"| {size:,} | {per_vm} | {lines:,} | {len(body) / 1e6:.1f} | {f:.2f} | {baseline} |"
                f" {statistics.median(zipped):.2f} | {len(compressed) / 1e6:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
