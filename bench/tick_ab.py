"""The rule engine's tick at two versions of `rules/`, in one process, ticks alternated.

    python3 -m bench.tick_ab --baseline HEAD~3 --vms 1000000 --ticks 30

Absolute times drift a lot on a shared machine, often by more than a change saves, and two
runs of bench.tick minutes apart cannot tell a 5 % gain from the drift. Here the baseline's
`rules/` (taken from git at `--baseline` into a temporary package) and the working tree's tick
the same fleet, fed the same traffic, second after second, alternating which goes first; the
ratio per pair of ticks is what to read. Both engines must keep the same alerts (checked at
every tick): a change that alters results is not a speed-up.

Both engines run the working tree's default rule pack. The baseline must accept the working
tree's decoded events and state tables (the schemas of ingest/contracts.py and rules/state.py);
for older commits whose schemas differ, it fails at the first apply or tick.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from types import ModuleType

from bench import tick as bench_tick
from bench._common import machine_line

ROOT = Path(__file__).resolve().parent.parent
BASELINE_PACKAGE = "baseline_rules"


def import_baseline(ref: str, into: Path) -> ModuleType:
    """`rules/` at git `ref`, importable as BASELINE_PACKAGE (its own imports rewritten)."""
    archive = subprocess.run(["git", "archive", ref, "rules"], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} rules: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    package = into / BASELINE_PACKAGE
    (into / "rules").rename(package)
    for source in package.glob("*.py"):
        text = source.read_text()
        source.write_text(re.sub(r"\b(from|import) rules\b", rf"\1 {BASELINE_PACKAGE}", text))
    # A baseline imported earlier in this process (another revision) must not be reused.
    for name in [m for m in sys.modules if m == BASELINE_PACKAGE or m.startswith(f"{BASELINE_PACKAGE}.")]:
        del sys.modules[name]
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{BASELINE_PACKAGE}.engine")


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000.0


@dataclasses.dataclass
class Figures:
    """Per engine ("baseline", "current"): wall and CPU seconds and phases of each timed tick,
    and per pair of ticks the current's wall time over the baseline's."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    # CPU seconds of the work between two ticks (`run_second`: Engine.prepare, then applying
    # the second's events): what a tick saves by preparing is spent there.
    between_cpu: dict[str, list[float]]
    phases: dict[str, dict[str, list[float]]]
    ratios: list[float]


def compare(args: argparse.Namespace, tmp: Path) -> Figures:
    baseline_engine = import_baseline(args.baseline, tmp)
    baseline_pack = importlib.import_module(f"{BASELINE_PACKAGE}.pack")
    baseline_state = importlib.import_module(f"{BASELINE_PACKAGE}.state")
    from rules import engine as current_engine
    from rules import pack as current_pack

    engines = {
        "baseline": bench_tick.load_engine(baseline_engine.Engine, baseline_pack.compile_pack),
        "current": bench_tick.load_engine(current_engine.Engine, current_pack.compile_pack),
    }
    fleet = bench_tick.build_state(args.vms, args.vms_per_cluster)
    engines["current"].fleet = fleet
    fields = {f.name: getattr(fleet, f.name) for f in dataclasses.fields(baseline_state.FleetState)}
    engines["baseline"].fleet = baseline_state.FleetState(**fields)

    figures = Figures(
        {name: [] for name in engines}, {name: [] for name in engines}, {name: [] for name in engines},
        {name: {} for name in engines}, [],
    )
    now_ms = bench_tick.NOW0_MS
    for n in range(args.warmup + args.ticks):
        now_ms += bench_tick.TICK_STEP_MS
        events = bench_tick.due_cycles(engines["current"].fleet, now_ms)
        for name, engine in engines.items():
            started_cpu = time.process_time()
            bench_tick.run_second(engine, now_ms, events)
            if n >= args.warmup:
                figures.between_cpu[name].append(time.process_time() - started_cpu)
        took: dict[str, float] = {}
        for name in ["baseline", "current"] if n % 2 else ["current", "baseline"]:
            started, started_cpu = time.perf_counter(), time.process_time()
            result = engines[name].tick(now_ms)
            took[name] = time.perf_counter() - started
            if n >= args.warmup:
                figures.wall[name].append(took[name])
                figures.cpu[name].append(time.process_time() - started_cpu)
                for phase, seconds in result.phases.items():
                    figures.phases[name].setdefault(phase, []).append(seconds)
        if n >= args.warmup:
            figures.ratios.append(took["current"] / took["baseline"])
        baseline_alerts, current_alerts = (engines[name].alerts.sort("alert_id") for name in ("baseline", "current"))
        if not baseline_alerts.equals(current_alerts):
            raise SystemExit(f"the two engines' alerts differ at tick {n}: not comparable")
    return figures


def print_report(args: argparse.Namespace, f: Figures) -> None:
    print(f"# bench.tick_ab  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {machine_line()}")
    print(f"{args.vms:,} VMs, baseline rules/ at {args.baseline}, {args.ticks} ticks each (alternated), alerts equal at every tick")
    print()
    print("| | baseline | current | current / baseline |")
    print("|---|---:|---:|---:|")
    print(
        f"| tick median ms | {median_ms(f.wall['baseline']):.1f} | {median_ms(f.wall['current']):.1f} "
        f"| **{statistics.median(f.ratios):.3f}** (median of per-pair ratios; {min(f.ratios):.2f}–{max(f.ratios):.2f}) |"
    )
    print(
        f"| process CPU ms per tick | {median_ms(f.cpu['baseline']):.1f} | {median_ms(f.cpu['current']):.1f} "
        f"| {sum(f.cpu['current']) / sum(f.cpu['baseline']):.3f} (totals) |"
    )
    print(
        f"| process CPU ms between ticks (prepare, apply) | {median_ms(f.between_cpu['baseline']):.1f} "
        f"| {median_ms(f.between_cpu['current']):.1f} "
        f"| {sum(f.between_cpu['current']) / sum(f.between_cpu['baseline']):.3f} (totals) |"
    )
    whole = {name: sum(f.cpu[name]) + sum(f.between_cpu[name]) for name in ("baseline", "current")}
    print(
        f"| process CPU ms per second (tick and between) | {whole['baseline'] * 1000 / len(f.cpu['baseline']):.1f} "
        f"| {whole['current'] * 1000 / len(f.cpu['current']):.1f} | {whole['current'] / whole['baseline']:.3f} (totals) |"
    )
    for phase, seconds in f.phases["current"].items():
        if phase in f.phases["baseline"]:
            print(f"| phase {phase} ms | {median_ms(f.phases['baseline'][phase]):.2f} | {median_ms(seconds):.2f} | |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.tick_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of rules/ to compare against (default HEAD)")
    parser.add_argument("--vms", type=int, default=1_000_000)
    parser.add_argument("--vms-per-cluster", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=30, help="timed ticks per engine")
    args = parser.parse_args(argv)
    print(f"[{args.vms:,} VMs] baseline rules/ at {args.baseline}; {args.warmup} + {args.ticks} ticks each", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rpowatch-baseline-") as tmp:
        try:
            figures = compare(args, Path(tmp))
        finally:
            if tmp in sys.path:
                sys.path.remove(tmp)
    print_report(args, figures)


if __name__ == "__main__":
    main()
