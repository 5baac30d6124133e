"""Polling helpers for tests that wait on a live system."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def until(check: Callable[[], Any], timeout: float, what: str, *, in_thread: bool = False, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy and return that; fail naming `what` and
    the last value after `timeout` seconds. `in_thread` runs a blocking check (an HTTP call to a
    real server) off the event loop, so a service under test in the same loop keeps running."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check) if in_thread else check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout}s (last: {last!r})")
