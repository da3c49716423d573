"""Riding out a registry outage in workflow code.

An activity that cannot reach the registry fails with the retryable type
`RegistryUnavailable`, and each attempt already waits minutes for it. When the
retry policy's attempts run out during a long outage, that is still not the step's
failure: failing the spec would roll back finished work because a database was
down. The workflow waits (a durable timer, visible in the Web UI timeline) and
runs the step again, up to OUTAGE_LIMIT in all; only then does the outage fail it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

T = TypeVar("T")

OUTAGE_TYPE = "RegistryUnavailable"
PAUSE = timedelta(seconds=30)
OUTAGE_LIMIT = timedelta(hours=1)


def registry_outage(err: BaseException) -> bool:
    return (isinstance(err, ActivityError) and isinstance(err.cause, ApplicationError)
            and err.cause.type == OUTAGE_TYPE)


async def through_outages(step: Callable[[], Awaitable[T]], what: str, *,
                          pause: timedelta = PAUSE, limit: timedelta = OUTAGE_LIMIT) -> T:
    """Run `step` (which starts an activity) again after a registry outage outlasted it."""
    waited = timedelta(0)
    while True:
        try:
            return await step()
        except ActivityError as err:
            if not registry_outage(err) or waited >= limit:
                raise
            workflow.logger.warning("registry unavailable during %s; trying again in %s",
                                    what, pause)
        await workflow.sleep(pause, summary=f"registry unavailable: {what} again in "
                                            f"{pause.total_seconds():g} s")
        waited += pause
