"""Preparing a spec's workspace: where it lives, and the branch + worktree effect."""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.effects import EffectExecutor
from activities.heartbeat import finish_first, with_heartbeat
from activities.git_effects import GitError, check_repository
from relay.ledger import EffectConflict
from relay.models import PrepareWorkspaceInput, WorkspaceRef

DEFAULT_CHECK = "python -m unittest"


class WorkspaceActivities:
    def __init__(self, executor: EffectExecutor, data_dir: Path) -> None:
        self.executor = executor
        self.data_dir = data_dir.resolve()

    def _locate(self, inp: PrepareWorkspaceInput) -> tuple[dict, str | None]:
        ws = inp.workspace
        if ws.path:
            repo = str(Path(ws.path).expanduser().resolve())
            check_repository(repo, ws.target)
            check = ws.check
        else:
            repo = str(self.data_dir / "workspaces" / inp.spec_id)
            check = ws.check or DEFAULT_CHECK
        payload = {"repo": repo, "create": not ws.path, "target": ws.target,
                   "branch": f"relay/{inp.spec_id}",
                   "worktree": str(self.data_dir / "worktrees" / inp.spec_id)}
        return payload, check

    @activity.defn(name="prepare_workspace")
    async def prepare_workspace(self, inp: PrepareWorkspaceInput) -> WorkspaceRef:
        """Branch relay/<spec> in a separate worktree; the user's checkout is not touched."""
        try:
            payload, check = await asyncio.to_thread(self._locate, inp)
            row, _ = await with_heartbeat(finish_first(asyncio.to_thread(
                self.executor.execute, spec_id=inp.spec_id, run_id=activity.info().workflow_run_id,
                step=f"i{inp.iteration}/workspace", effect="git.prepare_workspace", payload=payload)))
        except (GitError, EffectConflict) as exc:
            raise ApplicationError(str(exc), type="WorkspaceError", non_retryable=True) from None
        result = row.result or {}
        return WorkspaceRef(repo=payload["repo"], target=payload["target"], branch=payload["branch"],
                            worktree=payload["worktree"], check=check, base=result.get("base", ""))
