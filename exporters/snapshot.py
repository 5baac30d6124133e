"""The immutable state the exporters read: the latest rule-engine result plus the service's own
counters, swapped in whole after every evaluation tick.

Scrapes run in a worker thread and the Alertmanager sender and HTTP API on the event loop, so
nothing they read may change under them. `Snapshot` is frozen and its polars frames are never
mutated (the engine replaces whole tables), and `SelfStats` holds copies of the counters.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from rules.engine import TickResult, empty_result


@dataclass(frozen=True)
class SelfStats:
    """The service's own counters and gauges at one moment (copies, never mutated)."""

    events_total: dict[tuple[str, str], int] = field(default_factory=dict)  # (stream, source)
    events_invalid_total: dict[tuple[str, str], int] = field(default_factory=dict)  # (stream, reason)
    source_up: dict[str, bool] = field(default_factory=dict)
    source_last_event_seconds: dict[str, float] = field(default_factory=dict)
    alertmanager_notifications_total: dict[str, int] = field(default_factory=dict)  # by url
    alertmanager_notifications_failed_total: dict[str, int] = field(default_factory=dict)  # by url


@dataclass(frozen=True)
class Snapshot:
    result: TickResult
    self_stats: SelfStats = field(default_factory=SelfStats)


class SnapshotHolder:
    """Holds the current `Snapshot`.

    `set` and `get` are a single attribute store and load, which are atomic in CPython (the GIL
    serialises them), so a reader in any thread sees either the old or the new snapshot whole,
    without a lock. Readers must call `get()` once and use that object for a whole scrape or
    request, so everything they produce comes from one instant.
    """

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._snapshot = snapshot if snapshot is not None else Snapshot(empty_result(), SelfStats())

    def get(self) -> Snapshot:
        return self._snapshot

    def set(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot


class SelfCounters:
    """Mutable counters the ingest sources and the Alertmanager sender update; `freeze()` copies
    them into a `SelfStats` for the next snapshot.

    Safe to call from several threads: sources may run consumers in threads while the sender
    runs on the event loop. The lock is held only for dictionary updates.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], int] = {}
        self._invalid: dict[tuple[str, str], int] = {}
        self._source_up: dict[str, bool] = {}
        self._source_last_event: dict[str, float] = {}
        self._notifications: dict[str, int] = {}
        self._notifications_failed: dict[str, int] = {}

    def count_events(self, stream: str, source: str, n: int = 1) -> None:
        """`n` records of `stream` accepted from `source`."""
        with self._lock:
            key = (stream, source)
            self._events[key] = self._events.get(key, 0) + n

    def count_invalid(self, stream: str, reason: str, n: int = 1) -> None:
        """`n` records of `stream` rejected (sent to dead letters) for `reason`."""
        with self._lock:
            key = (stream, reason)
            self._invalid[key] = self._invalid.get(key, 0) + n

    def set_source_up(self, source: str, up: bool) -> None:
        with self._lock:
            self._source_up[source] = up

    def mark_source_event(self, source: str, seconds: float) -> None:
        """`source` delivered a record at Unix time `seconds` (wall clock of receipt)."""
        with self._lock:
            # Progress only moves forward, even if callers report out of order.
            self._source_last_event[source] = max(seconds, self._source_last_event.get(source, seconds))

    def count_notification(self, url: str, ok: bool, n: int = 1) -> None:
        """`n` alerts posted to the Alertmanager at `url`; `ok=False` also counts them failed,
        so failed ÷ total is the failure ratio (as Prometheus's notifier counts)."""
        with self._lock:
            self._notifications[url] = self._notifications.get(url, 0) + n
            if not ok:
                self._notifications_failed[url] = self._notifications_failed.get(url, 0) + n
            else:
                # Pre-initialise so the failed counter exists at 0 before the first failure.
                self._notifications_failed.setdefault(url, 0)

    def freeze(self) -> SelfStats:
        with self._lock:
            return SelfStats(
                events_total=dict(self._events),
                events_invalid_total=dict(self._invalid),
                source_up=dict(self._source_up),
                source_last_event_seconds=dict(self._source_last_event),
                alertmanager_notifications_total=dict(self._notifications),
                alertmanager_notifications_failed_total=dict(self._notifications_failed),
            )
