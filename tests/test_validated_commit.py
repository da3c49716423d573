"""What lands is exactly what was validated.

The validator's verdict is bound to the commit it checked (status and result say which),
and delivery merges that commit. A commit that reaches the spec's branch afterwards —
another spec, another process, a check's background job — is never delivered: delivery
refuses with that reason and the run is rolled back.
"""

from __future__ import annotations

import pytest

from relay.client import SpecFailed
from relay.models import Phase
from tests.conftest import git, snapshot
from tests.test_workspace import start, waiting_for_approval


async def test_the_validated_commit_is_the_one_delivered(relay, user_repo):
    sid = await start(relay, "Write a greeting module", user_repo)
    st = await waiting_for_approval(relay, sid)
    assert st.phase == Phase.waiting_for_approval, st.error
    head = git(user_repo, "rev-parse", f"relay/{sid}")
    assert st.validated_commit == head

    await relay.approve(sid, reviewer="maintainer")
    result = await relay.result(sid)
    assert result.outcome == "delivered" and result.validated_commit == head
    assert git(user_repo, "merge-base", "--is-ancestor", head, "main") == ""
    assert git(user_repo, "rev-parse", "main^2") == head  # the merge's second parent


async def test_a_commit_added_to_the_branch_after_validation_is_never_delivered(
        relay, user_repo):
    before = snapshot(user_repo)
    sid = await start(relay, "Write a greeting module", user_repo)
    st = await waiting_for_approval(relay, sid)
    assert st.phase == Phase.waiting_for_approval, st.error
    worktree = st.workspace.worktree
    # someone else commits onto relay/<spec> while the spec waits for approval
    intruder = git(user_repo, "commit-tree", "-p", f"relay/{sid}", "-m", "sneaked in",
                   git(user_repo, "rev-parse", f"relay/{sid}^{{tree}}"))
    git(user_repo, "update-ref", f"refs/heads/relay/{sid}", intruder)
    assert intruder != st.validated_commit

    await relay.approve(sid)
    with pytest.raises(SpecFailed, match="moved since validation|not the validated commit"):
        await relay.result(sid)
    assert git(user_repo, "rev-parse", "main") == before[0]
    assert git(user_repo, "branch", "--format=%(refname:short)") == "main"
    assert snapshot(user_repo) == before
    assert worktree
