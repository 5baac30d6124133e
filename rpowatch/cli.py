"""`rpowatch` command line (contracts.md §5)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from rpowatch.history_cli import history_app
from rpowatch.loading import ConfigError, check, load_rule_packs, load_settings

app = typer.Typer(
    help="Streaming RPO and recoverability monitoring for VMs on Azure Local.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(history_app, name="history")
err = Console(stderr=True)

EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)],
    )
    # aiokafka logs every failed reconnect at ERROR; our source reports those itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def _fail_config(exc: ConfigError) -> typer.Exit:
    for problem in exc.problems:
        typer.echo(str(problem), err=True)
    return typer.Exit(EXIT_CONFIG)


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGINT / SIGTERM set `stop`, so shutdown runs the service's orderly stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the service: consume the configured sources, evaluate, export, alert."""
    _setup_logging(log_level)
    try:
        settings = load_settings(config)
        pack = load_rule_packs(settings)
    except ConfigError as exc:
        raise _fail_config(exc) from None
    if not settings.sources.kafka.enabled and not settings.sources.mqtt.enabled:
        typer.echo(f"{config or '<defaults>'}: sources: enable sources.kafka or sources.mqtt (or run `rpowatch demo`)", err=True)
        raise typer.Exit(EXIT_CONFIG)

    from rpowatch.service import Service
    from rpowatch.wiring import build_dead_letter_sink, build_sources

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        sink, producer = await build_dead_letter_sink(settings)
        service = Service(settings, pack, build_sources(settings), sink)
        try:
            await service.run(stop)
        finally:
            if producer is not None:
                await producer.stop()

    asyncio.run(main())


@app.command("check")
def check_command(
    file: Annotated[Path, typer.Argument(help="configuration file to validate")],
) -> None:
    """Validate a configuration file and the rule packs it names; exit 2 on any problem."""
    problems = check(file)
    if problems:
        for problem in problems:
            typer.echo(str(problem), err=True)
        typer.echo(f"{len(problems)} problem(s) found", err=True)
        raise typer.Exit(EXIT_CONFIG)
    Console().print(f"{file}: ok")


@app.command()
def demo(
    vms: Annotated[int, typer.Option(min=1, help="simulated VMs")] = 200,
    duration: Annotated[float | None, typer.Option(min=1, help="stop after this many seconds")] = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port for /metrics and the API")] = 9464,
    seed: Annotated[int, typer.Option(help="simulator seed")] = 7,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """The whole pipeline fed by a simulated fleet with scripted incidents; no broker needed."""
    _setup_logging(log_level)
    from rpowatch.demo import run_demo

    try:
        asyncio.run(run_demo(vms=vms, duration_s=duration, port=port, seed=seed))
    except ValueError as exc:  # the simulator refuses a fleet too small for its incidents
        typer.echo(f"demo: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def bridge(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")] = None,
    client_id: Annotated[
        str | None, typer.Option(help="MQTT session and Kafka client id (default: sources.mqtt.client_id + '-bridge')")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Bridge MQTT into Kafka: consume sources.mqtt and produce each record to the sources.kafka
    topic of its stream, keyed by cluster_id (idempotent producer; MQTT acknowledged only after
    Kafka has the record)."""
    _setup_logging(log_level)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise _fail_config(exc) from None

    from ingest.bridge import Bridge
    from rpowatch.wiring import bridge_settings

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await Bridge(bridge_settings(settings, client_id)).run(stop)

    asyncio.run(main())


@app.command()
def simulate(
    kafka: Annotated[str | None, typer.Option(help="Kafka bootstrap servers, e.g. 127.0.0.1:9092")] = None,
    mqtt: Annotated[str | None, typer.Option(help="MQTT broker HOST:PORT")] = None,
    rate: Annotated[float, typer.Option(min=0.1, help="simulated seconds per wall-clock second")] = 1.0,
    vms: Annotated[int, typer.Option(min=1, help="simulated VMs")] = 200,
    duration: Annotated[float | None, typer.Option(min=1, help="stop after this many seconds")] = None,
    seed: Annotated[int, typer.Option(help="simulator seed")] = 7,
    incidents: Annotated[bool, typer.Option(help="script the demo's incidents")] = True,
) -> None:
    """Produce realistic fleet traffic to a real Kafka or MQTT broker."""
    _setup_logging("warning")
    if (kafka is None) == (mqtt is None):
        typer.echo("simulate: give exactly one of --kafka BOOTSTRAP or --mqtt HOST:PORT", err=True)
        raise typer.Exit(EXIT_CONFIG)
    from rpowatch.traffic import run_simulation

    asyncio.run(
        run_simulation(kafka=kafka, mqtt=mqtt, rate=rate, vms=vms, duration_s=duration, seed=seed, incidents=incidents)
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
