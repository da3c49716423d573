"""Touching a worktree's files without being redirected out of it.

Model-written code runs in the worktree (the checks), so anything there may change between the
moment a path is checked and the moment it is used: a directory swapped for a symlink, a hard
link to a file outside, a FIFO that blocks a read. A path string is therefore never handed to
the kernel whole. The worktree root is opened once, and each component is opened relative to
its parent's descriptor with O_NOFOLLOW, so a symlink anywhere on the way is a refusal, never
a detour; the leaf is checked through its own descriptor (a regular file with exactly one link)
before its bytes are read or replaced. Names git would refuse are refused before anything is
touched, so a write can never produce a file that makes `git add` fail the spec, as are
components over 255 bytes and paths over 1,024; and a write under a directory holding a `.git`
(a nested repository, which git would silently not commit) is refused.

Tools and the git file effects both use these primitives: the tools for reads, the effects for
the writes, deletes, snapshots and compensations the tools request through the ledger.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted by a check must not hang the tool (it is refused after
# fstat); O_NOCTTY: opening a terminal device must not make it ours.
_LEAF = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

# Code points HFS+ ignores when comparing names, so ".g\u200cit" is ".git" there (git's
# is_hfs_dotgit); removed before comparing, on every platform, to stay conservative.
_HFS_IGNORED = dict.fromkeys([*range(0x200C, 0x2010), *range(0x202A, 0x202F),
                              *range(0x206A, 0x2070), 0xFEFF])


class UnsafePath(Exception):
    """A path the tools will not touch; the message says why, on one line."""


MAX_COMPONENT_BYTES = 255  # NAME_MAX of every filesystem git runs on
MAX_PATH_BYTES = 1024  # the whole relative path: a longer one fails later, in git or the kernel


class TooLarge(Exception):
    """A file over the size a caller reads whole."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


class HardLinked(UnsafePath):
    """A regular file with more than one link: the other name may be outside the worktree."""


# --- names ---------------------------------------------------------------------------------


def is_dotgit(component: str) -> bool:
    """Whether git would take this path component for `.git` on some filesystem: NTFS ignores
    trailing spaces and dots and knows the short name GIT~1 and `name:stream` (git's
    is_ntfs_dotgit), HFS+ ignores some code points and case (is_hfs_dotgit)."""
    name = component.translate(_HFS_IGNORED).split(":", 1)[0].rstrip(" .").lower()
    return name in (".git", "git~1")


def parts(relative: str) -> list[str]:
    """The components of a worktree-relative file path, refusing what git would refuse
    (`git add` failing later fails the whole spec) and anything ambiguous."""
    if not isinstance(relative, str) or not relative:
        raise UnsafePath("a path is required")
    if "\x00" in relative:
        raise UnsafePath("paths cannot contain NUL bytes")
    if "\\" in relative:
        raise UnsafePath(f"backslashes are not allowed in paths (use '/'): {relative!r}")
    if relative.startswith("/"):
        raise UnsafePath(f"absolute paths are not allowed: {relative!r}")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in relative):  # C0, DEL and C1
        raise UnsafePath(f"control characters are not allowed in paths: {relative!r}")
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"the path is not valid UTF-8: {relative!r}") from None
    if relative.endswith("/"):
        raise UnsafePath(f"a file path cannot end with '/': {relative!r}")
    if len(relative.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafePath(f"the path is {len(relative.encode('utf-8'))} bytes long; at most "
                         f"{MAX_PATH_BYTES} are allowed: {relative[:80]!r}...")
    components = relative.split("/")
    for component in components:
        if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePath(f"a path component is {len(component.encode('utf-8'))} bytes long; "
                             f"at most {MAX_COMPONENT_BYTES} are allowed: {component[:80]!r}...")
        if component in ("", "."):
            raise UnsafePath(f"empty or '.' path components are not allowed: {relative!r}")
        if component == "..":
            raise UnsafePath(f"'..' is not allowed in paths: {relative!r}")
        if is_dotgit(component):
            raise UnsafePath(f"the .git directory is off limits (git refuses the name "
                             f"{component!r}): {relative!r}")
    return components


# --- walking -----------------------------------------------------------------------------------


def _refusal(dir_fd: int, name: str, shown: str, exc: OSError, *, want_dir: bool) -> UnsafePath:
    """Why opening `name` without following failed, in words (looked at again after the
    failure: what is there now may differ, as when a symlink is being swapped in and out)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return UnsafePath(f"{shown} is a symlink; the tools never follow symlinks")
    if want_dir and not stat.S_ISDIR(mode) and mode:
        return UnsafePath(f"{shown} is not a directory")
    if not want_dir and stat.S_ISDIR(mode):
        return UnsafePath(f"{shown} is a directory, not a file")
    return UnsafePath(f"{shown} changed while it was opened (a symlink swapped in?) or cannot "
                      f"be opened safely: {exc.strerror}")


def _open_dir(dir_fd: int, name: str, shown: str, create: bool) -> int:
    for _ in range(3):  # a concurrent mkdir or rmdir makes us look again, a few times only
        try:
            return os.open(name, _DIR, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, 0o777, dir_fd=dir_fd)
            except FileExistsError:
                pass  # made meanwhile: what is there now is opened and checked like the rest
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _refusal(dir_fd, name, shown, exc, want_dir=True) from None
            raise
    raise UnsafePath(f"{shown} keeps changing; not touching it")


def _refuse_nested_repo(fd: int, shown: str) -> None:
    """git does not descend into a directory holding a `.git` (a nested repository, which a
    check may have made): a file written there would silently never be committed."""
    try:
        os.stat(".git", dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError:
        pass
    raise UnsafePath(f"{shown} holds a .git (a nested git repository): git would not commit a "
                     "file in it, so the tools do not touch it")


@contextmanager
def directory(worktree: str, components: list[str], *, create: bool = False,
              nested_repos: bool = True) -> Iterator[int]:
    """A descriptor of the directory `components` of the worktree, reached one component at a
    time without following symlinks (made if missing when `create`). Missing: FileNotFoundError.
    Without `nested_repos`, a directory on the way that holds a `.git` is refused."""
    fd = os.open(worktree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(components):
            child = _open_dir(fd, name, "/".join(components[:depth + 1]), create)
            os.close(fd)
            fd = child
            if not nested_repos:
                _refuse_nested_repo(fd, "/".join(components[:depth + 1]))
        yield fd
    finally:
        os.close(fd)


def files(worktree: str, components: list[str],
          enter: Callable[[str], bool]) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """Every entry but directories under the directory `components`, depth first and sorted:
    (its path below that directory, its directory's descriptor, its name, its lstat).
    Directories are entered by descriptor, never through a symlink (which is an entry like a
    file); `enter(name)` says which are. Unlike os.fwalk, nothing is opened following a link,
    so a swapped-in symlink to a FIFO cannot hang the walk."""
    with directory(worktree, components) as top:
        yield from _files(top, "", enter)


def _files(fd: int, prefix: str,
           enter: Callable[[str], bool]) -> Iterator[tuple[str, int, str, os.stat_result]]:
    subdirs = []
    for name in sorted(os.listdir(fd)):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone meanwhile
        if not stat.S_ISDIR(st.st_mode):
            yield prefix + name, fd, name, st
        elif enter(name):
            subdirs.append(name)
    for name in subdirs:
        try:
            child = os.open(name, _DIR, dir_fd=fd)
        except OSError:
            continue  # swapped for a symlink or gone meanwhile: not entered
        try:
            yield from _files(child, f"{prefix}{name}/", enter)
        finally:
            os.close(child)


def read_at(dir_fd: int, name: str, max_size: int | None = None) -> bytes | None:
    """The bytes of the regular, singly linked file `name` of an open directory, checked on its
    own descriptor; None if it is anything else by now (it may have been swapped). Over
    `max_size` bytes: TooLarge, and nothing is read."""
    try:
        fd = os.open(name, os.O_RDONLY | _LEAF, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return None
        if max_size is not None and st.st_size > max_size:
            raise TooLarge(st.st_size)
        data = _read_fd(fd, None if max_size is None else max_size + 1)
        if max_size is not None and len(data) > max_size:  # grown since the fstat
            raise TooLarge(len(data))
        return data
    finally:
        os.close(fd)


def refuse_nested_repos(worktree: str, relative: str) -> None:
    """Refuse a path under a directory holding a `.git` (what a write there would meet)."""
    try:
        with directory(worktree, parts(relative)[:-1], nested_repos=False):
            pass
    except FileNotFoundError:  # the directories that exist were checked on the way
        pass


@contextmanager
def _parent(worktree: str, relative: str, *, create: bool = False,
            writing: bool = False) -> Iterator[tuple[int, str]]:
    components = parts(relative)
    with directory(worktree, components[:-1], create=create, nested_repos=not writing) as fd:
        yield fd, components[-1]


def refuse_leaf(st: os.stat_result, relative: str, *, symlink_ok: bool = False) -> None:
    """Refuse what the file tools never touch: a directory, a special file, a symlink (unless
    `symlink_ok`: deleting a link never touches its target) and a hard-linked file (its other
    name may be outside the worktree: reading it would leak that file, writing would change it)."""
    if stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{relative} is a directory, not a file")
    if stat.S_ISLNK(st.st_mode):
        if symlink_ok:
            return
        raise UnsafePath(f"{relative} is a symlink; the tools never follow symlinks")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{relative} is not a regular file")
    if st.st_nlink > 1:
        raise HardLinked(f"{relative} has {st.st_nlink} hard links; a file with more than one "
                         "link may be a file outside the workspace, so it is not touched")


def _check_leaf(fd: int, relative: str) -> os.stat_result:
    st = os.fstat(fd)  # the opened file itself: no rename or swap can change what this describes
    refuse_leaf(st, relative)
    return st


def _open_leaf(dir_fd: int, name: str, relative: str, flags: int) -> int:
    try:
        return os.open(name, flags | _LEAF, 0o666, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            raise _refusal(dir_fd, name, relative, exc, want_dir=False) from None
        raise


# --- reading -----------------------------------------------------------------------------------


def _read_fd(fd: int, limit: int | None) -> bytes:
    chunks, left = [], limit
    while left is None or left > 0:
        chunk = os.read(fd, 1 << 20 if left is None else min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        if left is not None:
            left -= len(chunk)
    return b"".join(chunks)


def read_head(worktree: str, relative: str, limit: int | None = None) -> tuple[bytes, int]:
    """At most `limit` bytes of the file (all without a limit), and its size."""
    with _parent(worktree, relative) as (dir_fd, name):
        fd = _open_leaf(dir_fd, name, relative, os.O_RDONLY)
        try:
            st = _check_leaf(fd, relative)
            return _read_fd(fd, limit), st.st_size
        finally:
            os.close(fd)


def read_bytes(worktree: str, relative: str) -> bytes:
    return read_head(worktree, relative)[0]


def lstat(worktree: str, relative: str) -> os.stat_result | None:
    """What the leaf is, without following it; None if it (or a directory above it) is missing.
    A symlink above the leaf is still a refusal."""
    try:
        with _parent(worktree, relative) as (dir_fd, name):
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def kind(worktree: str, relative: str) -> str | None:
    """"file", "symlink", "directory" or "other" for the leaf itself (never followed); None if
    it is missing."""
    st = lstat(worktree, relative)
    if st is None:
        return None
    for name, test in (("file", stat.S_ISREG), ("symlink", stat.S_ISLNK), ("directory", stat.S_ISDIR)):
        if test(st.st_mode):
            return name
    return "other"


def readlink(worktree: str, relative: str) -> str:
    with _parent(worktree, relative) as (dir_fd, name):
        return os.readlink(name, dir_fd=dir_fd)


# --- writing -----------------------------------------------------------------------------------


def write_bytes(worktree: str, relative: str, data: bytes, *, nested_repos: bool = False) -> None:
    """Create or replace the file's content, making missing directories. The file is opened
    without truncating and checked first, so a hard link or a special file is refused before
    a byte of it changes. A directory on the way holding a `.git` is refused unless
    `nested_repos` (a compensation putting a file back)."""
    with _parent(worktree, relative, create=True, writing=not nested_repos) as (dir_fd, name):
        fd = _open_leaf(dir_fd, name, relative, os.O_WRONLY | os.O_CREAT)
        try:
            _check_leaf(fd, relative)
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def replace_bytes(worktree: str, relative: str, data: bytes) -> None:
    """Put `data` at the path even if a hard link sits there now: the link's name is removed
    (the other name, maybe outside, keeps its own content) and a fresh file is written."""
    try:
        write_bytes(worktree, relative, data, nested_repos=True)
    except HardLinked:
        unlink(worktree, relative, hard_links=True)
        write_bytes(worktree, relative, data, nested_repos=True)


def symlink(worktree: str, relative: str, target: str) -> None:
    with _parent(worktree, relative, create=True) as (dir_fd, name):
        os.symlink(target, name, dir_fd=dir_fd)


def unlink(worktree: str, relative: str, *, hard_links: bool = False,
           nested_repos: bool = True) -> bool:
    """Remove the file or symlink itself (a symlink's target is never touched); False if it
    was not there. A hard-linked file is refused unless `hard_links` (removing our name leaves
    the other one alone, but the tools refuse such files everywhere); a file under a directory
    holding a `.git` unless `nested_repos`."""
    try:
        with _parent(worktree, relative, writing=not nested_repos) as (dir_fd, name):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            try:
                refuse_leaf(st, relative, symlink_ok=True)
            except HardLinked:
                if not hard_links:
                    raise
            # the entry is removed from the directory we hold open, whatever it has become
            # since the stat: unlink never follows, and a directory is refused by the kernel
            os.unlink(name, dir_fd=dir_fd)
            return True
    except FileNotFoundError:
        return False
