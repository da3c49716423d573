"""Compensating a spec's side effects: newest first, each retried, none dropped silently.

The ledger is the saga's stack: every effect was registered (with what its
undo needs) before it acted, so even an effect whose activity never reported
back is found and undone. A compensation that still fails after its attempts
is marked needs_human and reported; the others go on.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from relay import one_line
    from workflows.outage import through_outages
    from relay.models import (
        CompensateInput, EffectRef, Limits, NeedsHumanInput, PendingCompensationsInput,
    )

BOOKKEEPING = dict(start_to_close_timeout=timedelta(seconds=30),
                   retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)))


async def compensate(spec_id: str, run_id: str | None,
                     limits: Limits) -> tuple[list[EffectRef], list[EffectRef]]:
    """Undo the run's (or, with run_id None, every undelivered run's) effects.

    Returns (compensated, needs_human).
    """
    pending = await workflow.execute_activity(
        "pending_compensations", PendingCompensationsInput(spec_id=spec_id, run_id=run_id),
        result_type=list[EffectRef], summary="effects to compensate", **BOOKKEEPING)
    compensated, stuck = [], []
    for ref in pending:
        try:
            compensated.append(await through_outages(lambda: workflow.execute_activity(
                "compensate_effect", CompensateInput(key=ref.key), result_type=EffectRef,
                summary=f"compensate {ref.effect} ({ref.step})",
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=timedelta(seconds=limits.heartbeat_timeout_s),
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=500),
                                         maximum_attempts=limits.compensation_max_attempts)),
                f"compensate {ref.effect}"))
        except ActivityError as err:
            stuck.append(await workflow.execute_activity(
                "mark_needs_human", NeedsHumanInput(key=ref.key, reason=reason(err)),
                result_type=EffectRef, summary=f"needs a human: {ref.effect}", **BOOKKEEPING))
    return compensated, stuck


def reason(err: ActivityError) -> str:
    """Why an activity failed, on one line, saying when the retries ran out."""
    cause = err.cause
    message = getattr(cause, "message", None) or str(cause or err)
    retry_state = getattr(err, "retry_state", None)
    if retry_state is not None and retry_state.name == "MAXIMUM_ATTEMPTS_REACHED":
        message += " (gave up after the last retry)"
    return one_line(message)
