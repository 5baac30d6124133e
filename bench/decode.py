"""Benchmark of the bulk decoder on replication batches.

    python3 -m bench.decode

Times `ingest.decode.decode_batch(Stream.REPLICATION, payloads, now_ms)` over batches of
10,000 realistic JSON payloads (the simulator's shape, about 300 bytes each), and, in the same
run and interleaved with it, the baseline `[json.loads(p) for p in payloads]` over the same
payloads: the ratio decode / json.loads is the figure to compare across runs. A second batch
with 1 % poison records (not JSON) shows what the slow path costs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from bench._common import machine_line, summary, timed
from ingest.contracts import Stream
from ingest.decode import decode_batch

NOW_MS = 1_795_000_000_000
SITES = ("sea", "ams", "fra", "lon", "syd", "sin", "tor", "dub")
REGIONS = ("westus2", "westeurope", "germanywestcentral", "uksouth", "australiaeast", "southeastasia")
SERVICES = ("sql-prod", "web-frontend", "erp", "crm", "file-services", "ad-ds", "exchange", "sap-app", "vdi")
KINDS = (("cycle_completed", 0.97), ("cycle_failed", 0.015), ("cycle_missed", 0.01), ("paused", 0.005))
GIB = 1024**3


def rfc3339(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def payloads(count: int, seed: int = 7, full: bool = False) -> list[bytes]:
    """`count` replication events as compact JSON. `full`: every field rpowatch/simulator.py
    sends (about 470 bytes); otherwise the contract's required fields plus the recovery point,
    bytes and pending bytes (about 300 bytes)."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for _ in range(count):
        c = rng.randrange(10_000)
        site = SITES[c % len(SITES)]
        cluster = f"hci-{site}-{c + 1:05d}"
        vm = f"vm-{site}{c + 1:05d}-{rng.randrange(1, 101):04d}"
        ts = NOW_MS - rng.randrange(5_000)
        asr = rng.random() < 0.2
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        frequency = rng.choice((30, 30, 300, 300, 900))
        churn = round(rng.uniform(50e3, 5e6), 1)
        event: dict[str, Any] = {
            "event_id": f"rep-{vm}-{ts}",
            "ts": rfc3339(ts),
            "vm_id": vm,
            "cluster_id": cluster,
            "target_id": f"azure:{REGIONS[c % len(REGIONS)]}" if asr else f"hci-{SITES[(c + 1) % 8]}-{c + 2:05d}",
            "technology": "asr" if asr else "hyperv_replica",
            "kind": kind,
            "frequency_s": frequency,
        }
        duration = rng.randrange(1_000, 3_000)
        if kind == "cycle_completed":
            event |= {
                "recovery_point_ts": rfc3339(ts - duration),
                "bytes": int(churn * frequency),
                "pending_bytes": int(churn * rng.uniform(0, 2)),
            }
        else:
            event |= {"pending_bytes": int(churn * frequency * 2)}
        if full:
            event |= {
                "churn_bytes_per_s": churn,
                "duration_ms": duration,
                "vhd_bytes": rng.randrange(40 * GIB, 500 * GIB),
                "storage_path_id": f"{cluster}-csv{rng.randrange(1, 4)}",
                "service_group": f"{rng.choice(SERVICES)}-{site}{c + 1:05d}-{rng.randrange(1, 26)}",
            }
        out.append(json.dumps(event, separators=(",", ":")).encode())
    return out


def poisoned(batch: list[bytes], share: float, seed: int = 11) -> list[bytes]:
    """A copy of `batch` with `share` of its records replaced by truncated (invalid) JSON."""
    rng = random.Random(seed)
    out = list(batch)
    for index in rng.sample(range(len(out)), int(len(out) * share)):
        out[index] = out[index][: len(out[index]) // 2]
    return out


def loads_all(batch: list[bytes]) -> list[object]:
    """The baseline: json.loads of every payload (a poison record costs its exception)."""
    out: list[object] = []
    for p in batch:
        try:
            out.append(json.loads(p))
        except ValueError:
            out.append(None)
    return out


def bench(batch: list[bytes], warmup: int, repeats: int) -> dict[str, Any]:
    decodes: list[float] = []
    loads: list[float] = []
    valid = rejects = 0
    for n in range(warmup + repeats):
        b, _ = timed(lambda: loads_all(batch))
        d, decoded = timed(lambda: decode_batch(Stream.REPLICATION, batch, NOW_MS))
        if n >= warmup:
            decodes.append(d)
            loads.append(b)
        valid, rejects = decoded.valid.height, decoded.rejects.height
    dec, base = summary(decodes), summary(loads)
    return {
        "records": len(batch),
        "bytes_mean": sum(map(len, batch)) / len(batch),
        "valid": valid,
        "rejects": rejects,
        "decode": dec,
        "json_loads": base,
        "ratio": dec["median_ms"] / base["median_ms"],
        "records_per_s": len(batch) / (dec["median_ms"] / 1000),
        "json_loads_records_per_s": len(batch) / (base["median_ms"] / 1000),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000, help="payloads per batch")
    parser.add_argument("--poison", type=float, default=0.01, help="share of poison records in the second batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)

    clean = payloads(args.batch)
    rows = {
        "clean, ~300 B (fast path)": bench(clean, args.warmup, args.repeats),
        f"{args.poison:.0%} poison, ~300 B (slow path)": bench(poisoned(clean, args.poison), args.warmup, args.repeats),
        "clean, simulator's full shape (fast path)": bench(payloads(args.batch, full=True), args.warmup, args.repeats),
    }
    print(f"# bench.decode  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {machine_line()}")
    print(
        f"{args.batch:,} replication payloads per batch, warm-up {args.warmup}, {args.repeats} timed rounds; "
        "baseline = json.loads of every payload of the same batch (try/except each), just before each decode"
    )
    print()
    print(
        "| batch | mean bytes | valid / rejected | decode median ms | decode p90 ms | records/s "
        "| json.loads median ms | json.loads records/s | decode / json.loads |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bytes_mean']:.0f} | {r['valid']:,} / {r['rejects']:,} | {r['decode']['median_ms']:.1f} "
            f"| {r['decode']['p90_ms']:.1f} | {r['records_per_s']:,.0f} | {r['json_loads']['median_ms']:.1f} "
            f"| {r['json_loads_records_per_s']:,.0f} | {r['ratio']:.2f} |"
        )
    clean_ms, dirty_ms = (r["decode"]["median_ms"] for r in list(rows.values())[:2])
    print(f"\nslow path: a batch with {args.poison:.0%} poison records costs {dirty_ms / clean_ms:.2f}x a clean one")


if __name__ == "__main__":
    main()
