"""Heartbeating while an activity works, so a dead worker is noticed in seconds.

Beats also carry what an attempt must not lose: Temporal hands an activity's last heartbeat
details to its next attempt, on any worker, whether this one failed, timed out or died. A
turn puts a paid model answer it could not record yet there (`carry`), so the next attempt
records it instead of paying for it again.

Registry bookkeeping retries an outage here too (`patiently`), within the attempt and while
the beats go on, for as long as the attempt's own time allows (`patience`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from temporalio import activity

from relay.registry import OutageBackoff

T = TypeVar("T")


# Retrying a registry outage inside one attempt: at most this long, and never past the point
# where the attempt could no longer report before its start-to-close timeout.
PATIENCE_S = 240.0
PATIENCE_MARGIN_S = 10.0

_carried: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("relay_carried",
                                                                              default=None)


def interval(heartbeat_timeout_s: float | None) -> float:
    """How often to beat: a third of the timeout, so two beats may be late (a busy event loop,
    the SDK's throttling at 0.8 of the timeout) before the server gives up on the attempt."""
    return max(0.5, heartbeat_timeout_s / 3) if heartbeat_timeout_s else 10.0


async def _beat(carried: list[Any]) -> None:
    timeout = activity.info().heartbeat_timeout
    every = interval(timeout.total_seconds() if timeout else None)
    while True:  # the first beat waits: a quick activity needs none, and each beat is a server write
        await asyncio.sleep(every)
        # each beat replaces the recorded details: resend what is carried, or it would be lost
        activity.heartbeat(*carried)


async def with_heartbeat(work: Awaitable[T]) -> T:
    carried: list[Any] = []
    token = _carried.set(carried)
    beats = asyncio.create_task(_beat(carried))
    try:
        return await work
    finally:
        beats.cancel()
        _carried.reset(token)


def carry(details: Any | None) -> None:
    """Keep `details` in this attempt's heartbeats and beat at once, so the next attempt finds
    them in `activity.info().heartbeat_details` even if this one dies now. None: carry nothing
    from the next beat on (no extra beat: a stale carry is ignored by whoever reads it)."""
    carried = _carried.get()
    if carried is None:
        return
    carried[:] = [] if details is None else [details]
    if details is not None:
        activity.heartbeat(*carried)


def carried_over() -> list[Any]:
    """What the previous attempt of this activity carried in its heartbeats."""
    try:
        return list(activity.info().heartbeat_details)
    except RuntimeError:  # not in an activity
        return []


def patience(cap_s: float = PATIENCE_S) -> float:
    """How long this attempt may retry a registry outage: up to `cap_s`, within its own
    start-to-close timeout (with a margin to report the failure before it)."""
    try:
        info = activity.info()
    except RuntimeError:  # not in an activity (a test calling the executor directly)
        return cap_s
    if info.start_to_close_timeout is None:
        return cap_s
    elapsed = (datetime.now(timezone.utc) - info.started_time).total_seconds()
    if elapsed < 0 or elapsed > info.start_to_close_timeout.total_seconds():
        elapsed = 0.0  # a clock we cannot trust (test environments start at the epoch)
    left = info.start_to_close_timeout.total_seconds() - elapsed - PATIENCE_MARGIN_S
    return max(1.0, min(cap_s, left))


async def patiently(fn: Callable[..., T], *args: Any, what: str, budget_s: float | None = None,
                    **kwargs: Any) -> T:
    """Run a registry call in a thread, retrying an outage with backoff for up to `budget_s`
    (default: `patience()`); then raise RegistryUnavailable. Other errors are raised at once."""
    loop = asyncio.get_running_loop()
    backoff = OutageBackoff(what, patience() if budget_s is None else budget_s, loop.time)
    while True:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            await asyncio.sleep(backoff.delay_after(exc))


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

