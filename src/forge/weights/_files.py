"""Files in a directory every local user shares (``/dev/shm``): room, ownership, segments.

The weight store's low-level file handling, kept apart from its versioning logic:

* ``_ensure_space`` / ``_reserve``: a new segment is checked against the directory's
  free space and its pages reserved (``posix_fallocate``), so a full tmpfs is a
  ``WeightStoreFull`` error instead of a SIGBUS at the first write into the mapping.
* ``_open_private`` / ``_trusted`` / ``_is_mine``: a file is used only when the open
  descriptor shows a regular file of this user that nobody else may read or write
  (``O_NOFOLLOW``, then ``fstat``), so another user cannot plant weights or links.
* ``_Segment``: one mapped file the publisher keeps across versions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import pwd
import stat
from pathlib import Path

logger = logging.getLogger("forge.weights")
_reported: set[str] = set()  # unsafe files already logged (once each)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # pre-fault the mapping in one go (Linux)


class WeightStoreFull(OSError):
    """No room in the store's directory for a new segment (``errno.ENOSPC``): raised
    instead of the SIGBUS that writing into a mapping of a full tmpfs would deliver."""


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 2**20:.1f} MiB)"


def _store_full(directory: Path, needed: int) -> WeightStoreFull:
    fs = os.statvfs(directory)
    return WeightStoreFull(
        errno.ENOSPC,
        f"no room for weights in {directory}: a new segment needs {_size(needed)} but only "
        f"{_size(fs.f_bavail * fs.f_frsize)} of its {_size(fs.f_blocks * fs.f_frsize)} are free. Free space there "
        f"(stale forge-w.* files of other runs?), enlarge it (docker: --shm-size; or "
        f"mount -o remount,size=... /dev/shm), or give the store another directory: WeightStore(directory=...)",
    )


def _ensure_space(directory: Path, needed: int) -> None:
    """Raise ``WeightStoreFull`` unless ``directory`` has ``needed`` bytes free."""
    fs = os.statvfs(directory)
    if -(-needed // fs.f_frsize) * fs.f_frsize > fs.f_bavail * fs.f_frsize:
        raise _store_full(directory, needed)


def _reserve(fd: int, path: Path, size: int) -> None:
    """Allocate a new file's pages now: on a tmpfs filled since ``_ensure_space`` (by
    another process) this fails with ENOSPC, where a write into the mapping would SIGBUS."""
    if not hasattr(os, "posix_fallocate"):
        return  # not Linux: the free-space check alone guards
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return  # a filesystem without it: the free-space check alone guards
        if e.errno == errno.ENOSPC:
            raise _store_full(path.parent, size) from None
        raise


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _problem(st: os.stat_result, private: bool = True) -> str | None:
    """Why a weight file with this status must not be used, or None. The store makes
    regular files of this process's user, mode 0600 (``private``: no other bits)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by {_owner(st.st_uid)}, not by this process's user {_owner(os.geteuid())}"
    if private and st.st_mode & 0o077:
        return f"has mode {stat.filemode(st.st_mode)}, open to other users (the store makes -rw-------)"
    return None


def _refusal(path: Path, problem: str) -> PermissionError:
    return PermissionError(
        errno.EPERM,
        f"refusing weight store file {path}: it {problem}. Another local user may have planted it; "
        "remove it (as its owner or root) or give the store a private directory: WeightStore(directory=...)",
    )


def _open_private(path: Path, flags: int, private: bool = True) -> int:
    """``os.open`` a file of the store, checked on the descriptor (``O_NOFOLLOW`` +
    ``fstat``: it cannot be swapped between check and use). ``PermissionError`` names
    the path and its owner when it is a link or not this user's private file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EACCES, errno.EPERM):
            raise
        with contextlib.suppress(FileNotFoundError):
            problem = _problem(os.lstat(path), private)
            if problem is not None:
                raise _refusal(path, problem) from None
        raise
    problem = _problem(os.fstat(fd), private)
    if problem is not None:
        os.close(fd)
        raise _refusal(path, problem)
    return fd


def _trusted(path: Path) -> bool:
    """Whether a listed weight file may be used (``lstat``: a link is never followed);
    one that may not is logged once and skipped."""
    try:
        problem = _problem(os.lstat(path))
    except FileNotFoundError:
        return False
    if problem is not None and str(path) not in _reported:
        _reported.add(str(path))
        logger.warning("ignoring weight store file %s: it %s; another local user may have planted it", path, problem)
    return problem is None


def _is_mine(path: Path) -> bool:
    """Whether ``path`` is a regular file of this process's user (``lstat``, no link followed)."""
    try:
        return _problem(os.lstat(path), private=False) is None
    except FileNotFoundError:
        return False


class _Segment:
    """One shared-memory file the publisher keeps mapped across versions."""

    def __init__(self, path: Path, fd: int, buffer: mmap.mmap, size: int) -> None:
        self.path, self.fd, self.buffer, self.size = path, fd, buffer, size

    @classmethod
    def create(cls, path: Path, size: int) -> "_Segment":
        """A new file of ``size`` bytes, its pages reserved (``WeightStoreFull`` if they
        cannot be) and mapped; nothing is left behind on failure."""
        size = max(size, 1)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            _reserve(fd, path, size)
            buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd, buffer, size)

    def try_lock(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def rename(self, path: Path) -> None:
        os.rename(self.path, path)
        self.path = path

    def destroy(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.buffer.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
