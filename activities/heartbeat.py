"""Heartbeating while an activity works, so a dead worker is noticed in seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import activity

T = TypeVar("T")


async def _beat() -> None:
    timeout = activity.info().heartbeat_timeout
    interval = max(0.5, timeout.total_seconds() / 3) if timeout else 10.0
    while True:  # the first beat waits: a quick activity needs none, and each beat is a server write
        await asyncio.sleep(interval)
        activity.heartbeat()


async def with_heartbeat(work: Awaitable[T]) -> T:
    beats = asyncio.create_task(_beat())
    try:
        return await work
    finally:
        beats.cancel()
