"""Base class for a service run as a subprocess in its own temporary directory."""

from __future__ import annotations

import abc
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Self

# Where the missing pieces come from; repeated in every "not found" error.
INSTALL_HINT = "run scripts/install-test-deps from the repository root"

# Set to 1 to keep each service's temp dir (config, data, log) after close().
KEEP_DIRS_ENV = "RPOWATCH_KEEP_TEST_DIRS"

STOP_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 40


class HarnessError(RuntimeError):
    """A service could not be found, started or made ready."""


def find_binary(name: str, *fallbacks: str) -> str:
    """Locate an executable on PATH or at one of ``fallbacks``.

    The fallbacks matter for /usr/sbin/mosquitto: sbin is often not on a
    non-root user's PATH.
    """
    found = shutil.which(name)
    if found:
        return found
    for candidate in fallbacks:
        if os.access(candidate, os.X_OK):
            return candidate
    raise HarnessError(f"{name!r} not found on PATH or at {list(fallbacks)}; {INSTALL_HINT}")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


# Safety net: services still running when the interpreter exits (e.g. pytest
# aborted by a KeyboardInterrupt before finalizers ran) get stopped anyway.
_live: "weakref.WeakSet[Service]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for svc in list(_live):
        svc.close()


class Service(abc.ABC):
    """A subprocess with a temp dir, a log file and a readiness check.

    Subclasses implement :meth:`command` and :meth:`is_ready`, and may write
    config files in :meth:`prepare` (called before every start, so restarts
    pick up changed settings).
    """

    name: str = "service"
    ready_timeout: float = 20.0
    ready_poll_interval: float = 0.2

    def __init__(self, ready_timeout: float | None = None) -> None:
        if ready_timeout is not None:
            self.ready_timeout = ready_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"rpowatch-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._closed = False
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None

    # -- to implement --------------------------------------------------------

    @abc.abstractmethod
    def command(self) -> list[str]:
        """argv of the service process."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """One readiness probe; must not block much longer than a second or two."""

    def prepare(self) -> None:
        """Write config files into ``self.workdir`` before the process starts."""

    def env(self) -> dict[str, str] | None:
        """Environment for the process (None = inherit)."""
        return None

    # -- lifecycle -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Self:
        """Start the process and block until it is ready (or raise)."""
        if self._closed:
            raise HarnessError(f"{self.name}: start() after close()")
        if self.running:
            return self
        t0 = time.monotonic()
        self.prepare()
        argv = self.command()
        # Append, so a restarted service keeps the earlier log for debugging.
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== harness: starting {argv}\n".encode())
        self._log_file.flush()
        try:
            self._proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=self.env(),
                # Own process group: a Ctrl-C in the terminal reaches pytest,
                # which then stops us in order, instead of killing the service
                # mid-test.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise HarnessError(f"{self.name}: cannot run {argv[0]}: {exc}; {INSTALL_HINT}") from exc
        _live.add(self)
        self._wait_ready(t0)
        self.last_start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.ready_timeout
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise HarnessError(
                    f"{self.name} exited with code {code} before becoming ready\n{self.log_tail()}"
                )
            try:
                if self.is_ready():
                    return
            except Exception:  # noqa: BLE001 - a probe failing just means "not yet"
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise HarnessError(
                    f"{self.name} not ready after {self.ready_timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(self.ready_poll_interval)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Keeps the temp dir (restartable)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            t0 = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.last_stop_seconds = time.monotonic() - t0
        self._close_log()
        _live.discard(self)

    def close(self) -> None:
        """Stop and delete the temp dir (unless RPOWATCH_KEEP_TEST_DIRS=1)."""
        self.stop()
        if not self._closed:
            self._closed = True
            if os.environ.get(KEEP_DIRS_ENV) != "1":
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- diagnostics ---------------------------------------------------------

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as fh:
                tail = "".join(deque(fh, maxlen=lines))
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}--- end of log ---"

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ is not called when __enter__ raises
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {state} dir={self.workdir}>"
