"""`rpowatch demo`: the real pipeline, fed in-process by the fleet simulator."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections import defaultdict, deque

import polars as pl
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ingest.contracts import Stream
from ingest.deadletter import MemoryDeadLetterSink
from ingest.memory import MemorySource
from ingest.source import Batch
from rpowatch.config import Evaluation, History, Http, Settings
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.simulator import Emitted, FleetSimulator, Incident
from rules.engine import TickResult

STEP_S = 0.5
DEMO_HEARTBEAT_TIMEOUT_S = 15.0
DEMO_HISTORY_RESOLUTION_S = 10.0


def to_batches(emitted: list[Emitted], source: str, received_at_ms: int) -> list[Batch]:
    by_stream: dict[Stream, list[Emitted]] = defaultdict(list)
    for e in emitted:
        by_stream[e.stream].append(e)
    return [
        Batch(
            source,
            stream,
            [e.payload for e in items],
            [f"rpowatch/{e.key}/{e.node_id}/{stream.value}" for e in items],
            [-1] * len(items),
            [-1] * len(items),
            received_at_ms,
        )
        for stream, items in by_stream.items()
    ]


def _identity(labels_json: str) -> str:
    labels = json.loads(labels_json)
    for key in ("vm", "node"):
        if key in labels:
            return f"{labels[key]} ({labels.get('hci_cluster', '')})"
    return ", ".join(f"{k}={v}" for k, v in labels.items() if k not in ("alertname", "severity", "service"))


class DemoDisplay:
    """Live terminal summary; on a non-terminal, one plain line per alert transition."""

    def __init__(self, console: Console, incidents: tuple[Incident, ...], started: float, port: int) -> None:
        self.console = console
        self.incidents = incidents
        self.started = started
        self.port = port
        self.log: deque[str] = deque(maxlen=12)
        self.last: TickResult | None = None
        self.fired = 0
        self.resolved = 0
        self.live: Live | None = None

    def update(self, result: TickResult) -> None:
        elapsed = time.time() - self.started
        for name, transition, labels in result.transitions.select("alertname", "transition", "labels").iter_rows():
            line = f"t+{elapsed:5.1f}s  {transition.upper():8} {name:28} {_identity(labels)}"
            self.log.append(line)
            if transition == "fired":
                self.fired += 1
            else:
                self.resolved += 1
            if self.live is None:
                self.console.print(line, highlight=False, soft_wrap=True)  # one line per transition, for grep
        self.last = result
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Group:
        result = self.last
        elapsed = time.time() - self.started
        header = Text(
            f"rpowatch demo · t+{elapsed:.0f}s · metrics http://127.0.0.1:{self.port}/metrics · Ctrl-C to stop",
            style="bold",
        )
        incidents = Table(title="scripted incidents", title_justify="left", expand=True)
        for col in ("incident", "when", "what"):
            incidents.add_column(col)
        for inc in self.incidents:
            active = inc.start_s <= elapsed < inc.end_s
            incidents.add_row(
                Text(inc.name, style="yellow" if active else "dim"),
                f"{inc.start_s:.0f}–{inc.end_s:.0f}s",
                inc.description,
            )
        firing = Table(title="firing alerts", title_justify="left", expand=True)
        for col in ("alert", "severity", "entity", "for"):
            firing.add_column(col)
        if result is not None:
            now_s = result.now_ms / 1000
            rows = result.with_details(result.firing().sort("alertname").head(15))
            for name, severity, labels, fired in rows.select("alertname", "severity", "labels", "fired_at_ms").iter_rows():
                style = "red" if severity == "critical" else "yellow"
                firing.add_row(Text(name, style=style), severity, _identity(labels), f"{now_s - fired / 1000:.0f}s")
            views = result.views
            stats = Text(
                f"VMs {views.vm_replication.height} · nodes {views.node.height} · links {views.link.height} · "
                f"firing {result.firing().height} · tick {result.duration_s * 1000:.1f} ms · "
                f"fired {self.fired} · resolved {self.resolved}"
            )
        else:
            stats = Text("waiting for the first evaluation …")
        return Group(header, stats, incidents, firing, Text("\n".join(self.log) or "no alert transitions yet"))


async def run_demo(vms: int, duration_s: float | None, port: int, seed: int) -> None:
    console = Console()
    # History in a throw-away directory, at 10 s so /api/v1/history/... has data within the minute.
    history_dir = tempfile.mkdtemp(prefix="rpowatch-demo-history-")
    settings = Settings(
        http=Http(port=port),
        # A small fleet: its link sums cost nothing, so the scripted timeline stays exact.
        evaluation=Evaluation(heartbeat_timeout=DEMO_HEARTBEAT_TIMEOUT_S, aggregate_refresh=0),
        history=History(enabled=True, path=history_dir, resolution=DEMO_HISTORY_RESOLUTION_S),
    )
    pack = load_rule_packs(settings)
    source = MemorySource("simulator")
    started = time.time()
    simulator = FleetSimulator(vms, start_ms=int(started * 1000), seed=seed)
    display = DemoDisplay(console, simulator.incidents, started, port)
    service = Service(settings, pack, [source], MemoryDeadLetterSink(), on_tick=display.update)
    stop = asyncio.Event()
    from rpowatch.cli import install_signal_handlers

    install_signal_handlers(stop)
    await service.start()
    display.port = service.port or port

    async def feed() -> None:
        while True:
            now_ms = int(time.time() * 1000)
            for batch in to_batches(simulator.step(now_ms), source.name, now_ms):
                await source.put(batch)
            await asyncio.sleep(STEP_S)

    feeder = asyncio.create_task(feed(), name="simulator")
    if not console.is_terminal:
        console.print(f"rpowatch demo: {vms} VMs, metrics at http://127.0.0.1:{display.port}/metrics")
    try:
        if console.is_terminal:
            with Live(display.render(), console=console, refresh_per_second=2) as live:
                display.live = live
                await _wait(stop, duration_s)
            display.live = None
        else:
            await _wait(stop, duration_s)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await service.stop()
        shutil.rmtree(history_dir, ignore_errors=True)
    firing = display.last.firing() if display.last is not None else pl.DataFrame()
    console.print(
        f"demo finished after {time.time() - started:.0f}s: {display.fired} alerts fired, "
        f"{display.resolved} resolved, {firing.height} firing at the end."
    )


async def _wait(stop: asyncio.Event, duration_s: float | None) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=duration_s)
    except TimeoutError:
        pass
