"""Describing the validated change for the person who approves it: diff stat and diff.

Runs on a worker, which has the repository (the CLI, the SDK and the Web UI may be on other
machines). The workflow calls it once the validator approved, and keeps the result in its
state: the stat and per-file counts in the status (small), the diff itself (capped at
REVIEW_DIFF_MAX characters) behind the `diff` query, so `relay diff SPEC` works from anywhere
Temporal is reachable, and still after delivery removed the worktree and the branch.

Read-only: git runs with relay's minimal environment, no hooks, no external diff drivers and
no textconv filters (a repository may carry config that would run commands).
"""

from __future__ import annotations

import asyncio
import re

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.git_effects import run_git
from relay.models import ChangeDescription, DescribeChangeInput, ReviewFile

DIFF_OPTIONS = ["--no-color", "--no-ext-diff", "--no-textconv", "-M"]
STAT_MAX = 4000  # characters of `git diff --stat` kept (the summary line always)
_SHA = re.compile(r"[0-9a-f]{7,64}")


def describe(inp: DescribeChangeInput) -> ChangeDescription:
    if not (_SHA.fullmatch(inp.base) and _SHA.fullmatch(inp.commit)):
        raise ApplicationError(f"not commits: {inp.base[:64]!r}..{inp.commit[:64]!r}",
                               type="InvalidChange", non_retryable=True)
    span = [inp.base, inp.commit]

    def git(*args: str) -> str:
        proc = run_git(*args, cwd=inp.repo)
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[:300]
            raise ApplicationError(f"git {args[0]} failed in {inp.repo}: {detail}",
                                   type="GitError", non_retryable=True)
        return proc.stdout

    stat = git("diff", "--stat=100", *DIFF_OPTIONS, *span).rstrip()
    if len(stat) > STAT_MAX:
        lines = stat.splitlines()
        stat = "\n".join(lines[:40] + ["...", lines[-1]])
    files, added, deleted = [], 0, 0
    for line in git("diff", "--numstat", *DIFF_OPTIONS, *span).splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        a, d, path = parts
        plus, minus = (int(a), int(d)) if a.isdigit() and d.isdigit() else (None, None)
        files.append(ReviewFile(path=path[:500], added=plus, deleted=minus))
        added += plus or 0
        deleted += minus or 0
    diff = git("diff", *DIFF_OPTIONS, *span)
    cut = len(diff) > inp.max_chars
    return ChangeDescription(stat=stat, files=files[:500], insertions=added, deletions=deleted,
                             diff=diff[:inp.max_chars], diff_chars=len(diff), truncated=cut)


class ReviewActivities:
    @activity.defn(name="describe_change")
    async def describe_change(self, inp: DescribeChangeInput) -> ChangeDescription:
        """The diff stat and the (capped) diff of `base..commit` in the spec's repository."""
        return await asyncio.to_thread(describe, inp)
