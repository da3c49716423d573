"""Heartbeating while an activity works, so a dead worker is noticed in seconds."""

from __future__ import annotations

import asyncio
import contextlib
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


async def finish_first(work: Awaitable[T]) -> T:
    """Await work that must not be abandoned half-way (a thread acting on the world): if the
    activity is cancelled meanwhile, the work still completes before the cancellation goes on."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise
