"""What a change really is: the branch's diff against the target, read from git.

The validator judges this, never the constructor's own description of its work; Gate 2 reads
it to find destructive changes (a file deleted that exists on the target, most of a file's
lines removed), which always need a person. Read-only: it changes nothing.
"""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.git_effects import GitError, git, run_git
from relay.effects import EffectRegistry
from relay.models import ChangedFile, ChangeReport, InspectChangeInput

MAX_DIFF_CHARS = 20_000
# relay's git neutralises diff.external (git_effects): never an external diff or textconv
DIFF = ("diff", "--no-ext-diff", "--no-textconv", "--no-renames")


def inspect(inp: InspectChangeInput) -> ChangeReport:
    ws = inp.workspace
    repo = ws.repo
    head = inp.commit or git("rev-parse", f"refs/heads/{ws.branch}", cwd=repo)
    base = git("merge-base", f"refs/heads/{ws.target}", head, cwd=repo)
    files: dict[str, ChangedFile] = {}
    for line in git(*DIFF, "--name-status", base, head, cwd=repo).splitlines():
        status, _, path = line.partition("\t")
        files[path] = ChangedFile(path=path, status=status[:1])
    for line in git(*DIFF, "--numstat", base, head, cwd=repo).splitlines():
        added, removed, path = (line.split("\t", 2) + ["", ""])[:3]
        if path in files:
            files[path].added = int(added) if added.isdigit() else 0
            files[path].removed = int(removed) if removed.isdigit() else 0
    destructive: list[str] = []
    for f in files.values():
        if f.status in ("M", "D"):
            before = run_git("show", f"{base}:{f.path}", cwd=repo)
            f.lines_before = before.stdout.count("\n") if before.returncode == 0 else 0
        on_target = run_git("cat-file", "-e", f"refs/heads/{ws.target}:{f.path}",
                            cwd=repo).returncode == 0
        if f.status == "D" and on_target:
            destructive.append(f"deletes {f.path}, which exists on {ws.target}")
        elif f.status == "M" and f.lines_before and f.removed > inp.destructive_share * f.lines_before:
            destructive.append(f"removes {f.removed} of the {f.lines_before} lines of {f.path} "
                               f"(more than {inp.destructive_share:.0%})")
    mismatch: list[str] = []
    for declared in inp.declared:
        shown = run_git("show", f"{head}:{declared.path}", cwd=repo)
        if shown.returncode != 0:
            mismatch.append(f"{declared.path}: declared, but not on the branch")
        elif shown.stdout != declared.content:
            mismatch.append(f"{declared.path}: the declared content differs from the branch")
    diff = git(*DIFF, "--stat", "-p", base, head, cwd=repo)
    if len(diff) > MAX_DIFF_CHARS:
        diff = diff[:MAX_DIFF_CHARS] + f"\n... cut: the diff is {len(diff)} characters"
    return ChangeReport(files=list(files.values()), diff=diff, destructive=destructive,
                        declared_mismatch=mismatch)


class ChangeActivities:
    def __init__(self, effects: EffectRegistry | None = None) -> None:
        self.effects = effects

    @activity.defn(name="inspect_change")
    async def inspect_change(self, inp: InspectChangeInput) -> ChangeReport:
        try:
            report = await asyncio.to_thread(inspect, inp)
        except GitError as exc:
            raise ApplicationError(str(exc), type="WorkspaceError", non_retryable=True) from None
        for name in inp.hooks:  # an adopter's effect declared destructive
            try:
                destructive = self.effects is not None and self.effects.get(name).destructive
            except KeyError:
                destructive = False
            if destructive:
                report.destructive.append(f"runs {name} at delivery, declared destructive")
        return report
