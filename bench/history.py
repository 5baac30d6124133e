"""Benchmark of the history store: 10,000 VMs x 30 days at 1-minute resolution, and the writer
at 1,000,000 VMs.

    python3 -m bench.history                     # about 3 minutes, about 2 GB of disk
    python3 -m bench.history --days 3 --writer-vms 100000   # a quick look

1. **Generate** the VM table straight into the store's file layout: one sealed `day` file per
   day (sorted by vm, ts) plus its compliance rollup, written by `maintenance.seal_frame` (what
   sealing writes). Lag is a sawtooth below the RPO (2 x the replication interval, mixed
   30/300/900 s) plus a millisecond fraction that changes every 5 minutes (about 5 bytes a row
   on disk; whole seconds would compress to 0.2), with incidents: about 2 % of VMs per day
   breach for 5 to 120 minutes, 0.3 % for 2 to 8 hours. Values come from hashing (VM, day),
   so runs are deterministic.
2. **One VM's 30-day series** (`queries.lag`, 43,200 rows) for 5 VMs; baseline, timed just
   before each query on the same files: `pl.scan_parquet(day files).filter(vm == x).collect()`.
   Also the JSON the HTTP API sends for it.
3. **Monthly compliance over all VMs** (`queries.compliance`, group_by vm, service_group,
   hci_cluster); baseline: `pl.scan_parquet(rollup files).collect()` of the rollups it reads.
   For scale: one streaming pass over the raw rows (`sum(lag_max > rpo)` over 432 M rows), and
   compliance from raw rows for one day (what a window that cuts days reads at its edges).
4. **The writer at 1,000,000 VMs**: `HistoryWriter.absorb` of one tick's views (10,000 links,
   instances and nodes too), positional fast path and join path, and a flush (one interval of
   all four tables to Parquet); baselines: `filter(lag_seconds > 60)` on the same frame (a full
   pass that allocates, as in bench.tick) and a bare `write_parquet` of the same rows. Then a
   live run: the BackgroundWriter offered one tick per second, to count skipped ticks.

Data lives in a temporary directory removed at the end (`--keep DIR` keeps it there instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from bench._common import machine_line, ms, summary, timed, uniform
from exporters.history import maintenance, output, queries
from exporters.history.queries import Window
from exporters.history.store import HistoryStore, day_of
from exporters.history.tables import DAY_MS, VM, VM_DAILY
from exporters.history.writer import BackgroundWriter, HistoryWriter
from rules import lifecycle
from rules.engine import TickResult
from rules.views import Views, empty_views

MIN_MS = 60_000
PER_DAY = 1440
T0 = 20_400 * DAY_MS  # 2025-11-08T00:00Z


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- generated history ----------------------------------------------------------------------


def vm_attributes(vms: int) -> pl.DataFrame:
    """100 VMs per instance; 20 % of instances replicate to Azure (ASR), the others to a
    partner instance (Hyper-V Replica); 10 VMs per service group; frequencies 40/40/20 %."""
    v = pl.col("v")
    cluster = (v // 100).cast(pl.String).str.zfill(4)
    return pl.DataFrame({"v": pl.int_range(0, vms, eager=True, dtype=pl.Int64)}).with_columns(
        pl.format("vm-{}-{}", cluster, (v % 100).cast(pl.String).str.zfill(2)).alias("vm"),
        pl.format("hci-{}", cluster).alias("hci_cluster"),
        pl.when(v // 100 % 5 == 0)
        .then(pl.lit("azure:westeurope"))
        .otherwise(pl.format("hci-{}", ((v // 100 + 1) % max(1, vms // 100)).cast(pl.String).str.zfill(4)))
        .alias("target"),
        pl.when(v // 100 % 5 == 0).then(pl.lit("asr")).otherwise(pl.lit("hyperv_replica")).alias("technology"),
        pl.format("sg-{}", (v // 10).cast(pl.String).str.zfill(5)).alias("service_group"),
        pl.when(v % 5 < 2).then(30).when(v % 5 < 4).then(300).otherwise(900).cast(pl.Int64).alias("freq"),
    )


def day_base(vms: int) -> pl.DataFrame:
    """The day's rows without values: VM-major, minute-minor (sorted by vm, ts)."""
    attrs = vm_attributes(vms)
    index = pl.int_range(0, vms * PER_DAY, eager=True, dtype=pl.Int64)
    base = attrs[index // PER_DAY]
    return base.with_columns((index % PER_DAY).alias("m"))


def incidents(vms: int, day: int) -> pl.DataFrame:
    """Per VM for one day: the incident's first minute and length (0: none)."""
    key = pl.int_range(0, vms, dtype=pl.Int64) * 100_003 + day
    short, long = uniform(key, 11) < 0.02, uniform(key, 14) < 0.003
    length = (
        pl.when(long)
        .then(120 + (uniform(key, 15) * 360).cast(pl.Int64))
        .when(short)
        .then(5 + (uniform(key, 13) * 115).cast(pl.Int64))
        .otherwise(0)
    )
    return pl.select((uniform(key, 12) * PER_DAY).cast(pl.Int64).alias("start"), length.alias("length"))


def day_rows(base: pl.DataFrame, day: int) -> pl.DataFrame:
    t0 = T0 + day * DAY_MS
    per_vm = incidents(int(base.get_column("v").max()) + 1, day)  # type: ignore[arg-type]
    v, m, f = pl.col("v"), pl.col("m"), pl.col("freq")
    start = pl.col("start")
    incident = (m >= start) & (m < start + pl.col("length"))
    sawtooth = f + (m * 60 + v * 7) % f  # between 1 and 2 intervals behind: within RPO
    # Ticks land on whole seconds, recovery points anywhere: a millisecond fraction per cycle.
    fraction = (uniform((v * PER_DAY + m // 5) * 31 + day, 16) * 1000).floor() / 1000
    lag = pl.when(incident).then(2 * f + (m - start + 1) * 60).otherwise(sawtooth).cast(pl.Float64) + fraction
    return pl.concat([base, per_vm[base.get_column("v")]], how="horizontal").select(
        (t0 + m * MIN_MS).alias("ts_ms"),
        pl.lit(MIN_MS, dtype=pl.Int64).alias("interval_ms"),
        "vm", "hci_cluster", "target", "technology", "service_group",
        lag.alias("lag_max_seconds"),
        (lag - (m * 13 + v) % 30 - fraction).alias("lag_last_seconds"),
        (2 * f).cast(pl.Float64).alias("rpo_target_seconds"),
        pl.when(incident).then((m - start + 1) * 50_000_000).otherwise(0).alias("pending_bytes"),
        pl.lit(60, dtype=pl.Int64).alias("samples"),
        (t0 + m * MIN_MS + 59_000).alias("last_at_ms"),
    )


def generate(store: HistoryStore, vms: int, days: int) -> dict[str, Any]:
    started = time.perf_counter()
    base = day_base(vms)
    build_s, write_s = 0.0, 0.0
    for day in range(days):
        t, rows = timed(lambda: day_rows(base, day))
        build_s += t
        t, _ = timed(lambda: maintenance.seal_frame(store, day_of(T0 + day * DAY_MS), rows, presorted=True))
        write_s += t
        if day == 0 or (day + 1) % 10 == 0:
            log(f"  day {day + 1}/{days}: {rows.height:,} rows, {time.perf_counter() - started:.0f} s so far")
    root = Path(store.location)
    vm_bytes = sum(p.stat().st_size for p in (root / VM.name).rglob("*.parquet"))
    rollup_bytes = sum(p.stat().st_size for p in (root / VM_DAILY.name).rglob("*.parquet"))
    return {
        "rows": vms * PER_DAY * days,
        "seconds": time.perf_counter() - started,
        "build_s": build_s,
        "seal_s_per_day": write_s / days,
        "vm_bytes": vm_bytes,
        "rollup_bytes": rollup_bytes,
    }


# --- queries --------------------------------------------------------------------------------


def interleaved(measured: Any, baseline: Any, repeats: int, warmup: int = 1) -> tuple[list[float], list[float], Any]:
    out = None
    for _ in range(warmup):
        baseline()
        out = measured()
    m: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        b.append(timed(baseline)[0])
        t, out = timed(measured)
        m.append(t)
    return m, b, out


def bench_lag(store: HistoryStore, vms: int, days: int, repeats: int) -> dict[str, Any]:
    window = Window(T0, T0 + days * DAY_MS)
    files = [store.storage.path(VM.name, f.day, f.name) for f in store.files_between(VM, window.start_ms, window.end_ms)]
    picks = [f"vm-{(v // 100):04d}-{v % 100:02d}" for v in random.Random(3).sample(range(vms), 5)]
    measured: list[float] = []
    base: list[float] = []
    rows = 0
    json_s: list[float] = []
    for vm in picks:
        m, b, frame = interleaved(
            lambda vm=vm: queries.lag(store, [vm], window),
            lambda vm=vm: pl.scan_parquet(files).filter(pl.col("vm") == vm).collect(),
            repeats,
        )
        measured += m
        base += b
        rows = frame.height
        json_s.append(timed(lambda: output.to_json("lag", frame))[0])
    ms_, bs = summary(measured), summary(base)
    return {"vms": picks, "rows": rows, "query": ms_, "baseline": bs, "ratio": ms_["median_ms"] / bs["median_ms"],
            "json": summary(json_s)}


def bench_compliance(store: HistoryStore, days: int, repeats: int) -> dict[str, Any]:
    window = Window(T0, T0 + days * DAY_MS)
    plan, refs = queries.compliance_plan(store, window)
    rollups = [store.storage.path(VM_DAILY.name, r.day, f"rollup-{r.uid}.parquet") for r in refs]
    out: dict[str, Any] = {"rollup_days": len(plan.rollup_days), "raw_days": len(plan.raw_days)}
    m, b, frame = interleaved(
        lambda: queries.compliance(store, window, "vm"), lambda: pl.scan_parquet(rollups).collect(), repeats
    )
    out["by_vm"] = {"query": summary(m), "baseline": summary(b), "ratio": statistics.median(m) / statistics.median(b),
                    "groups": frame.height, "breaches": int(frame.get_column("breaches").sum()),
                    "worst_within_rpo": frame.get_column("within_rpo_ratio").min()}
    for group in ("service_group", "hci_cluster"):
        m, _, frame = interleaved(lambda group=group: queries.compliance(store, window, group), lambda: None, 3, 0)
        out[f"by_{group}"] = {"query": summary(m), "groups": frame.height}
    files = [store.storage.path(VM.name, f.day, f.name) for f in store.files_between(VM, window.start_ms, window.end_ms)]
    log("  one streaming pass over the raw rows ...")
    t, breached = timed(
        lambda: pl.scan_parquet(files)
        .select((pl.col("lag_max_seconds") > pl.col("rpo_target_seconds")).sum())
        .collect(engine="streaming")
        .item()
    )
    out["raw_pass"] = {"ms": ms(t), "breached_rows": breached}
    one_day = Window(T0, T0 + DAY_MS)
    t, _ = timed(lambda: queries.compliance(store, one_day, "vm", use_rollups=False))
    out["raw_one_day"] = {"ms": ms(t)}
    return out


# --- the writer at fleet scale ----------------------------------------------------------------


def fleet_views(vms: int, now_ms: int, seed: int, shuffled: bool = False) -> Views:
    attrs = vm_attributes(vms)
    i = pl.col("v")
    replication = attrs.select(
        "vm", "hci_cluster", "target", "technology", "service_group",
        (uniform(i * 7 + seed, 21) * 2 * pl.col("freq")).alias("lag_seconds"),
        (2 * pl.col("freq")).cast(pl.Float64).alias("rpo_target_seconds"),
        (uniform(i + seed, 22) * 1e9).cast(pl.Int64).alias("pending_bytes"),
    )
    if shuffled:
        replication = replication.sample(fraction=1.0, shuffle=True, seed=seed)
    clusters = vms // 100
    c = pl.int_range(0, clusters, eager=True, dtype=pl.Int64)
    names = pl.format("hci-{}", c.cast(pl.String).str.zfill(4))
    link = pl.DataFrame({"c": c}).select(
        names.alias("hci_cluster"), pl.lit("t").alias("target"), uniform(pl.col("c") + seed, 23).alias("saturation_ratio")
    )
    cluster = pl.DataFrame({"c": c}).select(names.alias("hci_cluster"), uniform(pl.col("c") + seed, 24).alias("iops_headroom_ratio"))
    node = pl.DataFrame({"c": c}).select(
        names.alias("hci_cluster"), pl.format("n-{}", pl.col("c")).alias("node"), pl.lit(1, dtype=pl.Int8).alias("up")
    )
    base = empty_views()
    return base.replace(now_ms=now_ms, vm_replication=replication, link=link, cluster=cluster, node=node)


def bench_writer(root: Path, vms: int, repeats: int, live_s: float) -> dict[str, Any]:
    store = HistoryStore(root / "writer")
    # Views come in a different row order at every tick (they are built with hash joins).
    t_build, variants = timed(lambda: [fleet_views(vms, 0, seed, shuffled=True) for seed in range(3)])
    # Each of these has one more new VM than the one before: every tick takes the join path.
    joins = max(3, repeats // 3) + 1
    grown = [
        dataclasses.replace(
            variants[0],
            vm_replication=pl.concat(
                [
                    variants[0].vm_replication,
                    variants[0].vm_replication.head(k + 1).with_columns(pl.format("new-{}", pl.int_range(pl.len())).alias("vm")),
                ]
            ),
        )
        for k in range(joins)
    ]
    log(f"  built {vms:,}-VM views in {t_build:.1f} s")
    writer = HistoryWriter(store, interval_ms=3_600_000)  # no interval ends during the timing
    now = T0
    tick = 0

    def absorb(views: Views) -> None:
        nonlocal now, tick
        now += 1000
        tick += 1
        writer.absorb(views.replace(now_ms=now))

    replication = variants[0].vm_replication
    fast, base, _ = interleaved(lambda: absorb(variants[tick % 3]), lambda: replication.filter(pl.col("lag_seconds") > 60), repeats)
    first_join = tick
    joined, _, _ = interleaved(lambda: absorb(grown[tick - first_join]), lambda: None, joins - 1)
    assert writer.stats.fast_folds >= repeats and writer.stats.joined_folds >= 3
    flushes: list[float] = []
    raw_writes: list[float] = []
    rows = writer._acc[0].rows(0, 60_000)
    scratch = root / "raw.parquet"
    for _ in range(3):
        raw_writes.append(timed(lambda: rows.write_parquet(scratch))[0])
        flushes.append(timed(lambda: writer.flush(partial=True))[0])
        absorb(variants[0])
    file_bytes = max(p.stat().st_size for p in (root / "writer" / VM.name).rglob("*.parquet"))
    f, fs, rw = summary(fast), summary(flushes), summary(raw_writes)
    out: dict[str, Any] = {
        "vms": vms,
        "absorb_fast": f,
        "absorb_join": summary(joined),
        "baseline_filter": summary(base),
        "ratio_fast": f["median_ms"] / summary(base)["median_ms"],
        "samples_per_s_fast": vms / (f["median_ms"] / 1000),
        "samples_per_s_join": vms / (summary(joined)["median_ms"] / 1000),
        "flush": fs,
        "baseline_write": rw,
        "ratio_flush": fs["median_ms"] / rw["median_ms"],
        "vm_file_bytes": file_bytes,
    }
    for resolution_s in (1, 10, 60, 300):
        busy_s = resolution_s * f["median_ms"] / 1000 + fs["median_ms"] / 1000
        out[f"busy_share_{resolution_s}s"] = busy_s / resolution_s
    if live_s > 0:
        out["live"] = live_run(root / "live", variants, live_s)
    return out


def live_run(root: Path, variants: list[Views], seconds: float) -> dict[str, Any]:
    """One tick offered per second for `seconds`, a 10 s interval: how many ticks were skipped."""
    background = BackgroundWriter(HistoryWriter(HistoryStore(root), interval_ms=10_000))
    empty = pl.DataFrame(schema={**lifecycle.TRANSITION_SCHEMA, "labels": pl.String(), "annotations": pl.String()})
    started = time.monotonic()
    offered = 0
    offer_s: list[float] = []
    while time.monotonic() - started < seconds:
        views = variants[offered % 3].replace(now_ms=T0 + offered * 1000)
        result = TickResult(views, lifecycle.empty_alerts(), empty)
        offer_s.append(timed(lambda: background.offer(result))[0])
        offered += 1
        time.sleep(max(0.0, started + offered - time.monotonic()))
    t, _ = timed(background.close)
    stats = background.writer.stats
    return {"offered": offered, "absorbed": stats.ticks, "skipped": background.dropped,
            "intervals": stats.intervals_written, "offer_max_ms": ms(max(offer_s)), "close_ms": ms(t)}


# --- report -----------------------------------------------------------------------------------


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    g, lag, c, w = r["generate"], r["lag"], r["compliance"], r.get("writer")
    print(f"# bench.history  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {machine_line()}")
    print(f"history: {args.vms:,} VMs x {args.days} days at 1-minute resolution = {g['rows']:,} rows")
    print(
        f"generate: {g['seconds']:.0f} s ({g['build_s']:.0f} s building rows, sealing {g['seal_s_per_day']:.1f} s/day "
        f"= sorted day file + rollup); disk {g['vm_bytes'] / 2**20:.0f} MiB day files "
        f"({g['vm_bytes'] / g['rows']:.2f} B/row) + {g['rollup_bytes'] / 2**20:.1f} MiB rollups"
    )
    q, b = lag["query"], lag["baseline"]
    print(
        f"one VM's {args.days}-day series ({lag['rows']:,} rows, 5 VMs x {args.repeats}): median {q['median_ms']:.1f} ms, "
        f"p90 {q['p90_ms']:.1f} ms; baseline scan+filter {b['median_ms']:.1f} ms; ratio {lag['ratio']:.2f}; "
        f"JSON for the API {lag['json']['median_ms']:.1f} ms"
    )
    v = c["by_vm"]
    print(
        f"compliance over all VMs, {args.days} days ({c['rollup_days']} days from rollups, {c['raw_days']} raw): "
        f"group_by vm median {v['query']['median_ms']:.0f} ms (p90 {v['query']['p90_ms']:.0f}); baseline "
        f"collect of the rollups {v['baseline']['median_ms']:.0f} ms; ratio {v['ratio']:.2f}; "
        f"{v['groups']:,} VMs, {v['breaches']:,} breaches, worst {v['worst_within_rpo'] * 100:.2f} % within RPO"
    )
    print(
        f"  group_by service_group {c['by_service_group']['query']['median_ms']:.0f} ms "
        f"({c['by_service_group']['groups']:,} groups), hci_cluster {c['by_hci_cluster']['query']['median_ms']:.0f} ms "
        f"({c['by_hci_cluster']['groups']:,}); for scale: one streaming pass over the raw rows "
        f"{c['raw_pass']['ms'] / 1000:.1f} s; compliance from raw rows for one day {c['raw_one_day']['ms'] / 1000:.1f} s"
    )
    if w:
        print(
            f"writer at {w['vms']:,} VMs: absorb one tick {w['absorb_fast']['median_ms']:.0f} ms median "
            f"(p90 {w['absorb_fast']['p90_ms']:.0f}) = {w['samples_per_s_fast'] / 1e6:.1f} M samples/s "
            f"(baseline filter {w['baseline_filter']['median_ms']:.0f} ms, ratio {w['ratio_fast']:.1f}); "
            f"join path {w['absorb_join']['median_ms']:.0f} ms = {w['samples_per_s_join'] / 1e6:.1f} M samples/s; "
            f"flush {w['flush']['median_ms']:.0f} ms (bare write_parquet {w['baseline_write']['median_ms']:.0f} ms, "
            f"ratio {w['ratio_flush']:.1f}; VM file {w['vm_file_bytes'] / 2**20:.1f} MiB)"
        )
        shares = ", ".join(f"{s}s {w[f'busy_share_{s}s'] * 100:.0f} %" for s in (1, 10, 60, 300))
        print(f"  writer thread busy (absorb every tick + one flush per interval), by resolution: {shares}")
        if "live" in w:
            lv = w["live"]
            print(
                f"  live: {lv['offered']} ticks offered 1/s, {lv['absorbed']} absorbed, {lv['skipped']} skipped, "
                f"{lv['intervals']} intervals written; offer() max {lv['offer_max_ms']:.2f} ms; close {lv['close_ms']:.0f} ms"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.history", description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--writer-vms", type=int, default=1_000_000, help="0 skips the writer benchmark")
    parser.add_argument("--writer-repeats", type=int, default=10)
    parser.add_argument("--live-seconds", type=float, default=15.0)
    parser.add_argument("--keep", type=Path, help="generate into this directory and keep it")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    root = args.keep if args.keep else Path(tempfile.mkdtemp(prefix="rpowatch-bench-history-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        store = HistoryStore(root / "store")
        log(f"generating {args.vms:,} VMs x {args.days} days into {root}")
        results["generate"] = generate(store, args.vms, args.days)
        log("timing one VM's series")
        results["lag"] = bench_lag(store, args.vms, args.days, args.repeats)
        log("timing compliance")
        results["compliance"] = bench_compliance(store, args.days, max(3, args.repeats // 2))
        if args.writer_vms:
            log(f"timing the writer at {args.writer_vms:,} VMs")
            results["writer"] = bench_writer(root, args.writer_vms, args.writer_repeats, args.live_seconds)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
