"""The history store's files: layout, atomic writes, listing, and scans that never double-count.

Layout under the root (a local directory, or an object-store URL polars can read and write):

    <root>/<table>/date=YYYY-MM-DD/<kind>-<min_ms>-<max_ms>-<uid>.parquet
    <root>/vm_daily/date=YYYY-MM-DD/rollup-<uid>.parquet
    <root>/.staging/                      (local only: files being written)

A file never holds two rows with the same key (the writer writes one row per entity per
interval; compaction merges). `kind` is `part` (what the writer flushes: one interval, or a batch of alert transitions),
`merged` (small parts of a day compacted together) or `day` (a whole past day, sorted by key,
with a rollup of the same `uid`). `min_ms`/`max_ms` bound the file's time column, so a reader
knows which files can hold the same key without opening them: files whose ranges do not overlap
are read as they are; only a group of overlapping files is merged by key (tables.Table.merge).

Writes are atomic. Locally a file is written under `.staging/`, fsynced, then renamed into its
partition (and the directory fsynced), so a reader — or a process killed with -9 — never sees a
partial file under a table. On an object store a PUT is atomic by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

import polars as pl

from exporters.history.tables import DAY_MS, VM, VM_DAILY, Table

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 131_072
STAGING = ".staging"
STALE_STAGING_S = 3600.0
_NAME = re.compile(r"^(part|merged|day)-(\d+)-(\d+)-([0-9a-z]+)\.parquet$")
_ROLLUP = re.compile(r"^rollup-([0-9a-z]+)\.parquet$")
_DAY_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
READ_RETRIES = 3

T = TypeVar("T")


class HistoryError(Exception):
    """Something about the store is wrong (not a bad query); `retriable` if trying later helps."""

    retriable = False


class StoreUnavailable(HistoryError):
    retriable = True


def is_url(location: str) -> bool:
    return bool(_URL.match(location))


MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def day_of(ms: int) -> str:
    """The UTC day of epoch milliseconds (clamped to years 1970..9999)."""
    ms = min(max(ms, 0), MAX_MS)
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).date().isoformat()


def day_start_ms(day: str) -> int:
    d = date.fromisoformat(day)
    return (d - date(1970, 1, 1)).days * DAY_MS


def day_in(day: str, start_ms: int, end_ms: int) -> bool:
    """Whether the UTC day `day` touches [start_ms, end_ms)."""
    begin = day_start_ms(day)
    return begin < end_ms and start_ms < begin + DAY_MS


def new_uid() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class FileRef:
    table: str
    day: str
    kind: str  # part | merged | day
    min_ms: int
    max_ms: int
    uid: str

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.min_ms}-{self.max_ms}-{self.uid}.parquet"

    @classmethod
    def parse(cls, table: str, day: str, name: str) -> FileRef | None:
        m = _NAME.match(name)
        if m is None:
            return None
        return cls(table, day, m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))


def overlap_groups(files: Iterable[FileRef]) -> list[list[FileRef]]:
    """Files grouped so that any two files whose time ranges overlap share a group."""
    groups: list[list[FileRef]] = []
    high = -1
    for f in sorted(files, key=lambda f: (f.min_ms, f.max_ms, f.uid)):
        if groups and f.min_ms <= high:
            groups[-1].append(f)
            high = max(high, f.max_ms)
        else:
            groups.append([f])
            high = f.max_ms
    return groups


class Storage(Protocol):
    """Where the files live. `write` is atomic: a reader sees the whole file or nothing.
    Listing and deleting (`can_list`) are what compaction, retention and rollups need."""

    root: str
    storage_options: dict[str, str] | None
    can_list: bool

    def path(self, table: str, day: str, name: str) -> str: ...

    def write(self, table: str, day: str, name: str, frame: pl.DataFrame | pl.LazyFrame) -> None: ...

    def days(self, table: str) -> list[str]: ...

    def names(self, table: str, day: str) -> list[str]: ...

    def delete(self, table: str, day: str, name: str) -> None: ...

    def remove_day(self, table: str, day: str) -> None: ...


def _write_frame(frame: pl.DataFrame | pl.LazyFrame, target: str, storage_options: dict[str, str] | None) -> None:
    if isinstance(frame, pl.LazyFrame):
        frame.sink_parquet(target, row_group_size=ROW_GROUP_ROWS, storage_options=storage_options, mkdir=True)
    else:
        frame.write_parquet(target, row_group_size=ROW_GROUP_ROWS, storage_options=storage_options, mkdir=True)


class LocalStorage:
    """A directory on a local (or mounted) file system."""

    can_list = True
    storage_options: dict[str, str] | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self._root = Path(root)

    def path(self, table: str, day: str, name: str) -> str:
        return str(self._root / table / f"date={day}" / name)

    def write(self, table: str, day: str, name: str, frame: pl.DataFrame | pl.LazyFrame) -> None:
        staging = self._root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f"{new_uid()}.{name}"
        try:
            _write_frame(frame, str(tmp), None)
            _fsync(tmp)
            final_dir = self._root / table / f"date={day}"
            final_dir.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final_dir / name)
            _fsync_dir(final_dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def days(self, table: str) -> list[str]:
        try:
            entries = os.listdir(self._root / table)
        except FileNotFoundError:
            return []
        return sorted(m.group(1) for m in map(_DAY_DIR.match, entries) if m)

    def names(self, table: str, day: str) -> list[str]:
        try:
            return sorted(os.listdir(self._root / table / f"date={day}"))
        except FileNotFoundError:
            return []

    def delete(self, table: str, day: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(table, day, name))

    def remove_day(self, table: str, day: str) -> None:
        directory = self._root / table / f"date={day}"
        for name in self.names(table, day):
            self.delete(table, day, name)
        with contextlib.suppress(OSError):
            directory.rmdir()

    def clean_staging(self, older_than_s: float = STALE_STAGING_S) -> int:
        """Remove files a killed writer left in `.staging` (never visible to readers)."""
        staging = self._root / STAGING
        removed = 0
        cutoff = time.time() - older_than_s
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(staging):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        _fsync(path)


class ObjectStorage:
    """An object-store URL (`az://`, `abfss://`, `s3://`, `gs://`, `file://`) written and read by
    polars itself. A PUT is atomic, but polars cannot list or delete objects, so compaction,
    rollups and retention are not available here (use the bucket's lifecycle rules for
    retention); reads scan the table's hive partitions and merge duplicates by key."""

    can_list = False

    def __init__(self, root: str, storage_options: Mapping[str, str] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options) if storage_options else None

    def path(self, table: str, day: str, name: str) -> str:
        return f"{self.root}/{table}/date={day}/{name}"

    def write(self, table: str, day: str, name: str, frame: pl.DataFrame | pl.LazyFrame) -> None:
        _write_frame(frame, self.path(table, day, name), self.storage_options)

    def days(self, table: str) -> list[str]:
        raise HistoryError("an object store cannot be listed by rpowatch")

    def names(self, table: str, day: str) -> list[str]:
        raise HistoryError("an object store cannot be listed by rpowatch")

    def delete(self, table: str, day: str, name: str) -> None:
        raise HistoryError("an object store cannot be modified by rpowatch")

    def remove_day(self, table: str, day: str) -> None:
        raise HistoryError("an object store cannot be modified by rpowatch")


def open_storage(location: str, storage_options: Mapping[str, str] | None = None) -> LocalStorage | ObjectStorage:
    if is_url(location):
        return ObjectStorage(location, storage_options)
    return LocalStorage(location)


class HistoryStore:
    """Reads and writes the tables of one store. Safe to share between threads: it holds no
    state besides the storage location."""

    def __init__(self, location: str | Path, storage_options: Mapping[str, str] | None = None) -> None:
        self.storage = open_storage(str(location), storage_options)

    @property
    def location(self) -> str:
        return self.storage.root

    # --- writing -----------------------------------------------------------------------------

    def write_rows(self, table: Table, frame: pl.DataFrame, kind: str = "part") -> list[FileRef]:
        """Write `frame` (table.schema) as one file per day it touches. Returns the files."""
        if frame.is_empty():
            return []
        frame = frame.select(table.schema.names())
        days = frame.get_column(table.time) // DAY_MS
        out: list[FileRef] = []
        for day_number in days.unique().sort().to_list():
            part = frame.filter(days == day_number) if days.n_unique() > 1 else frame
            times = part.get_column(table.time)
            ref = FileRef(table.name, day_of(day_number * DAY_MS), kind, int(times.min()), int(times.max()), new_uid())  # type: ignore[arg-type]
            self.storage.write(table.name, ref.day, ref.name, part)
            out.append(ref)
        return out

    # --- listing -----------------------------------------------------------------------------

    def files(self, table: Table, day: str) -> list[FileRef]:
        refs = (FileRef.parse(table.name, day, n) for n in self.storage.names(table.name, day))
        return [r for r in refs if r is not None]

    def days_between(self, table: Table, start_ms: int, end_ms: int) -> list[str]:
        """The days of `table` present in the store that touch [start_ms, end_ms)."""
        return [d for d in self.storage.days(table.name) if day_in(d, start_ms, end_ms)]

    def files_between(self, table: Table, start_ms: int, end_ms: int, days: Iterable[str] | None = None) -> list[FileRef]:
        """Files of `table` that may hold rows with time in [start_ms, end_ms) (of `days` only,
        when given)."""
        present = self.days_between(table, start_ms, end_ms)
        if days is not None:
            wanted = set(days)
            present = [d for d in present if d in wanted]
        return [f for day in present for f in self.files(table, day) if f.max_ms >= start_ms and f.min_ms < end_ms]

    def sealed_rollup(self, day: str) -> FileRef | None:
        """The day's `day` file of the VM table when it is the only file of the day and its
        rollup exists: then the rollup describes the day exactly."""
        files = self.files(VM, day)
        if len(files) != 1 or files[0].kind != "day":
            return None
        if f"rollup-{files[0].uid}.parquet" not in self.storage.names(VM_DAILY.name, day):
            return None
        return files[0]

    # --- reading -----------------------------------------------------------------------------

    def scan_files(self, table: Table, files: list[FileRef]) -> pl.LazyFrame:
        """The rows of `files`, one per key: non-overlapping files as they are, overlapping
        groups merged."""
        if not files:
            return table.empty().lazy()
        plain: list[FileRef] = []
        merged: list[pl.LazyFrame] = []
        for group in overlap_groups(files):
            if len(group) == 1:
                plain.extend(group)
            else:
                merged.append(table.merge(self._scan_paths(table, group)))
        frames = ([self._scan_paths(table, plain)] if plain else []) + merged
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")

    def scan(self, table: Table, start_ms: int, end_ms: int) -> pl.LazyFrame:
        """Rows of `table` with time in [start_ms, end_ms), one per key."""
        in_range = (pl.col(table.time) >= start_ms) & (pl.col(table.time) < end_ms)
        if not self.storage.can_list:
            return table.merge(self._scan_hive(table, start_ms, end_ms).filter(in_range))
        return self.scan_files(table, self.files_between(table, start_ms, end_ms)).filter(in_range)

    def _scan_paths(self, table: Table, files: list[FileRef]) -> pl.LazyFrame:
        return pl.scan_parquet(
            [self.storage.path(f.table, f.day, f.name) for f in files],
            schema=table.schema,
            missing_columns="insert",
            extra_columns="ignore",
            hive_partitioning=False,
            storage_options=self.storage.storage_options,
        )

    def _scan_hive(self, table: Table, start_ms: int, end_ms: int) -> pl.LazyFrame:
        if end_ms <= start_ms:
            return table.empty().lazy()
        lf = pl.scan_parquet(
            f"{self.storage.root}/{table.name}/",
            hive_partitioning=True,
            hive_schema={"date": pl.Date()},
            storage_options=self.storage.storage_options,
            missing_columns="insert",
            extra_columns="ignore",
        )
        first = date.fromisoformat(day_of(start_ms))
        last = date.fromisoformat(day_of(end_ms - 1))
        return lf.filter(pl.col("date").is_between(first, last)).select(table.schema.names())

    def scan_rollups(self, refs: list[FileRef]) -> pl.LazyFrame:
        if not refs:
            return VM_DAILY.empty().lazy()
        return pl.scan_parquet(
            [self.storage.path(VM_DAILY.name, r.day, f"rollup-{r.uid}.parquet") for r in refs],
            schema=VM_DAILY.schema,
            hive_partitioning=False,
        )


def with_retries(read: Callable[[], T], retries: int = READ_RETRIES) -> T:
    """Run a read, again if a file vanished under it (compaction or retention removed it
    between listing and reading; the next listing finds its replacement)."""
    for attempt in range(retries):
        try:
            return read()
        except (FileNotFoundError, pl.exceptions.ComputeError) as exc:
            if attempt == retries - 1 or not _vanished(exc):
                raise
            logger.debug("history file vanished during a read; retrying (%s)", exc)
    raise AssertionError("unreachable")


def _vanished(exc: Exception) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True
    text = str(exc).lower()
    return "no such file" in text or "not found" in text
