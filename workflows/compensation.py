"""SpecCompensation: `relay compensate SPEC` — re-run the compensations still pending."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from relay.models import CompensationInput, CompensationReport
    from workflows.saga import compensate

COMPENSATION_WORKFLOW = "SpecCompensation"


def compensation_workflow_id(spec_id: str) -> str:
    return f"compensate:{spec_id}"


@workflow.defn(name=COMPENSATION_WORKFLOW)
class SpecCompensation:
    @workflow.run
    async def run(self, inp: CompensationInput) -> CompensationReport:
        done, stuck = await compensate(inp.spec_id, None, inp.limits)
        return CompensationReport(spec_id=inp.spec_id, compensated=done, needs_human=stuck)
