"""History inside the service: the store, the writer thread and the maintenance thread, built
from the `history` configuration section and stopped together."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from exporters.history import maintenance
from exporters.history.store import HistoryStore
from exporters.history.writer import BackgroundWriter, HistoryWriter
from rules.engine import TickResult

logger = logging.getLogger(__name__)


class CompactionSettings(Protocol):
    @property
    def min_files(self) -> int: ...
    @property
    def seal_after(self) -> float: ...
    @property
    def interval(self) -> float: ...
    @property
    def max_sort_rows(self) -> int: ...


class HistorySettings(Protocol):
    """What rpowatch.config.History provides (seconds for durations)."""

    @property
    def path(self) -> str: ...
    @property
    def resolution(self) -> float: ...
    @property
    def retention(self) -> float: ...
    @property
    def compaction(self) -> CompactionSettings: ...
    def plain_storage_options(self) -> dict[str, str]: ...


class HistoryRuntime:
    """Started on construction; `offer` each tick (never blocks); `close` once at shutdown
    (blocks while the unfinished interval is written: call it off the event loop)."""

    def __init__(
        self,
        location: str,
        interval_ms: int,
        policy: maintenance.Policy,
        maintenance_every_s: float,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self.store = HistoryStore(location, storage_options)
        self.writer = BackgroundWriter(HistoryWriter(self.store, interval_ms=interval_ms))
        self.maintenance: maintenance.BackgroundMaintenance | None = None
        if self.store.storage.can_list:
            self.maintenance = maintenance.BackgroundMaintenance(self.store, policy, maintenance_every_s)
        else:
            logger.warning(
                "history at %s: an object store cannot be compacted or pruned by rpowatch; "
                "set a lifecycle rule for retention",
                location,
            )
        logger.info("history: writing %d ms intervals to %s", interval_ms, location)

    @classmethod
    def from_settings(cls, settings: HistorySettings) -> HistoryRuntime:
        return cls(
            location=settings.path,
            interval_ms=round(settings.resolution * 1000),
            policy=maintenance.Policy(
                min_files=settings.compaction.min_files,
                seal_after_ms=round(settings.compaction.seal_after * 1000),
                retention_ms=round(settings.retention * 1000),
                max_sort_rows=settings.compaction.max_sort_rows,
            ),
            maintenance_every_s=settings.compaction.interval,
            storage_options=settings.plain_storage_options() or None,
        )

    def offer(self, result: TickResult) -> None:
        self.writer.offer(result)

    def close(self) -> None:
        if self.maintenance is not None:
            self.maintenance.close()
        self.writer.close()
        stats = self.writer.writer.stats
        logger.info(
            "history: %d intervals, %d rows, %d transitions written; %d ticks skipped while busy",
            stats.intervals_written,
            stats.rows_written,
            stats.transitions_written,
            self.writer.dropped,
        )
