"""Shared fixtures: real services from tests/harness, started lazily.

Each session fixture starts its service the first time a test asks for it
and stops it when the session ends; a missing binary or jar fails the test
with a message to run scripts/install-test-deps (nothing is skipped).
Start/stop durations are reported at the end of the run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import TypeVar

import pytest

from tests.harness import Alertmanager, KafkaBroker, Mosquitto, Prometheus, Service
from tests.harness.timing import TIMINGS, record_timing

S = TypeVar("S", bound=Service)


def run_service(label: str, make: type[S]) -> Iterator[S]:
    """Construct, start, yield, and always close a service, timing each step.

    Use with ``yield from`` in a fixture.
    """
    t0 = time.monotonic()
    svc = make()
    try:
        svc.start()
        record_timing(label, "start", time.monotonic() - t0)
        yield svc
    finally:
        t1 = time.monotonic()
        svc.close()
        record_timing(label, "stop", time.monotonic() - t1)


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    yield from run_service("kafka", KafkaBroker)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    yield from run_service("mosquitto", Mosquitto)


@pytest.fixture(scope="session")
def prometheus() -> Iterator[Prometheus]:
    yield from run_service("prometheus", Prometheus)


@pytest.fixture(scope="session")
def alertmanager() -> Iterator[Alertmanager]:
    yield from run_service("alertmanager", Alertmanager)


@pytest.fixture
def unique_name() -> str:
    """A fresh name for a per-test topic, consumer group, client id, ..."""
    return f"t{uuid.uuid4().hex[:10]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.write_sep("-", "harness service timings")
    for name, phase, seconds in TIMINGS:
        terminalreporter.write_line(f"{name:<24} {phase:<8} {seconds:7.2f}s")
