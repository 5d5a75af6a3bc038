"""Same-host weight store: one shared-memory file per published version.

Monarch pickles every message (about 0.3 GB/s for tensors here), so weights must not
travel as endpoint arguments between processes on one host. The trainer writes version
``v`` of its state dict (Hugging Face parameter names) into one file under ``/dev/shm``;
each generator maps that file and copies the tensors straight into its model.

* A reader never sees a half-written version: the file is written under a temporary
  name and renamed into place when complete (rename is atomic).
* Names: ``forge-w.<store>.v<version>.<token>.<pid>.bin``. On a host of a host pool the
  store name is ``<store>@<host>`` (``$FORGE_HOST``): each host has its own store even
  when simulated hosts share one machine, and a generator on another host than the
  trainer pulls a version across (``fetch``).
* Other local users: ``/dev/shm`` is shared by every user of the machine, so a name they
  can guess is a name they can take first (a publish then fails) or plant a file or a
  symbolic link under (a generator would then load their bytes as weights). Hence:

  - The ``<token>`` makes names unguessable. It is an HMAC of the store name under the
    run's secret: ``$FORGE_WEIGHT_STORE_SECRET``, else a secret drawn once per process
    (``run_secret()``). Processes agree on a store by name exactly when they share that
    secret, so Forge passes it to every process it spawns (the provisioner puts it in
    each rank's environment), and a pickled ``WeightStore`` carries its token (an actor
    given the object itself needs no secret). Not one random token per ``WeightStore``:
    a store is opened by name in every process (trainer, each replica), and two stores
    of one process are one user anyway.
  - Every file a reader uses is checked on the open descriptor (``O_NOFOLLOW`` then
    ``fstat``, so it cannot be swapped between check and use): a regular file of this
    process's user that no one else may read or write (what the store creates: mode
    ``0600``, ``O_EXCL``). A listed file that fails (``find``, ``newest_version``) is
    skipped and logged once; opening one (the mapped version, the pull lock) raises a
    ``PermissionError`` naming the path and its owner.
  - ``sweep_stale_segments`` only ever deletes this user's files (``lstat``, never
    following a link); other users' runs are not its business.
* Running out of room is an error, not a crash: a write into a mapping of a file on a
  full tmpfs is a SIGBUS that kills the process (``ftruncate`` succeeds regardless). A
  new segment (a publish, or a pull from another host) first checks the directory's free
  space, then reserves its pages with ``posix_fallocate``, so a tmpfs filled meanwhile by
  another process fails there too: ``WeightStoreFull`` (an ``OSError``, ``ENOSPC``) says
  how much was needed and free, and what to do. Reusing a segment needs no new space.
* Segments are reused: the publisher keeps each file mapped and, once a version is
  older than the ``keep`` newest, hides it (renames it to an idle name) and later writes
  a new version into it in place — no page faults, no zeroing of fresh pages, so a push
  costs about one memcpy. A reader holds a shared ``flock`` on the file while it copies;
  the publisher only reuses a segment it can lock exclusively, and a reader checks the
  version in the header after locking, so it never reads a segment being rewritten.
* ``close()`` removes the store's files; ``sweep_stale_segments()`` (run when a store
  is opened for publishing) removes files whose owner process is dead — leftovers of a
  crashed or killed run.

File layout: an 8-byte little-endian header length, a JSON header (per tensor: name,
dtype, shape, offset, nbytes), then the tensors' bytes, each 64-byte aligned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from forge.util.procs import pid_alive
from forge.util.secret import SECRET_ENV, run_secret
from forge.weights._files import (  # noqa: F401  (WeightStoreFull is public here)
    _POPULATE,
    WeightStoreFull,
    _ensure_space,
    _is_mine,
    _open_private,
    _Segment,
    _trusted,
)

PREFIX = "forge-w"
_ALIGN = 64
_OWNER = re.compile(r"\.(?P<pid>\d+)\.bin(\.[0-9a-f]+\.tmp)?$")  # final and staging names
_STORE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN = re.compile(r"^[0-9a-f]{16,64}$")

logger = logging.getLogger("forge.weights")


def _derive_token(name: str) -> str:
    return hmac.new(run_secret().encode(), name.encode(), hashlib.sha256).hexdigest()[:16]


def default_directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


def default_store_name() -> str:
    """``$FORGE_RUN_ID`` when set (one store per run), else ``default``."""
    return os.environ.get("FORGE_RUN_ID", "default")


def sweep_stale_segments(directory: Path | None = None) -> list[Path]:
    """Delete this user's weight files (finished or half-written) whose owner process is
    gone, and pull locks nobody holds. Other users' files are skipped, never touched."""
    directory = directory or default_directory()
    removed = []
    for path in [*directory.glob(f"{PREFIX}.*"), *directory.glob(f".{PREFIX}.*")]:
        if not _is_mine(path):
            continue  # another user's run (or not a file the store makes): not ours to judge
        owner = _OWNER.search(path.name)
        if owner is not None and not pid_alive(int(owner["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        elif path.name.endswith(".fetch.lock") and _remove_if_unlocked(path):
            removed.append(path)  # a pull lock left by a killed process
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    """Delete a lock file of this user that nobody holds; whether it was deleted."""
    try:
        fd = _open_private(path, os.O_RDWR, private=False)
    except (FileNotFoundError, PermissionError):
        return False  # gone, or a link or another user's file: not ours to delete
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


class WeightStore:
    """Versioned weights of one run on this host. See the module docstring."""

    def __init__(self, name: str | None = None, directory: str | os.PathLike | None = None, keep: int = 1,
                 token: str | None = None) -> None:
        """``token`` (a store's ``token``) names the files; by default it derives from
        ``name`` and the run's secret, so processes of one run agree on it."""
        name = name or default_store_name()
        if not _STORE_NAME.match(name):
            raise ValueError(f"weight store name {name!r} may only use letters, digits, '-' and '_'")
        if keep < 1:
            raise ValueError(f"weight store keep must be >= 1, got {keep}")
        if token is not None and not _TOKEN.match(token):
            raise ValueError(f"weight store token must be 16 to 64 lowercase hex digits (another store's .token), "
                             f"got {len(token)} characters")
        self.name = name
        self.token = token or _derive_token(name)
        # Stores are per host: on a host-pool host ($FORGE_HOST) the files carry the host's
        # name, so hosts sharing one machine (simulated hosts) still each have their own.
        host = os.environ.get("FORGE_HOST")
        self._key = f"{name}@{host}" if host else name
        self.directory = Path(directory) if directory is not None else default_directory()
        self.keep = keep
        self._published: list[_Segment] = []  # newest last
        self._idle: list[_Segment] = []  # dropped versions' segments, ready for reuse
        self._mapped: collections.OrderedDict[int, tuple[Any, mmap.mmap]] = collections.OrderedDict()

    def _version_prefix(self, version: int) -> str:
        return f"{PREFIX}.{self._key}.v{version}.{self.token}."

    def _hidden_path(self, kind: str) -> Path:
        """A new name for a segment readers must not see (being written, or idle)."""
        return self.directory / f".{PREFIX}.{self._key}.{self.token}.{kind}{uuid.uuid4().hex[:8]}.{os.getpid()}.bin"

    # ---- writing (the trainer) ---------------------------------------------------

    def _segment_for(self, size: int) -> _Segment:
        """An idle segment nobody reads, at least ``size`` bytes, or a new one
        (``WeightStoreFull`` when the directory has no room for it)."""
        for segment in self._idle:
            if segment.size >= size and segment.try_lock():
                self._idle.remove(segment)
                return segment
        self._release_small_idle(size)
        _ensure_space(self.directory, size)  # a new segment: fail here, not with SIGBUS at the first write
        segment = _Segment.create(self._hidden_path("seg"), size)
        segment.try_lock()
        return segment

    def _release_small_idle(self, size: int) -> None:
        """Remove idle segments smaller than ``size`` that nobody reads: versions only grow
        (a longer header), so they would hold shared memory without ever being reused."""
        for segment in [s for s in self._idle if s.size < size and s.try_lock()]:
            self._idle.remove(segment)
            segment.destroy()

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> Path:
        """Write ``state_dict`` as ``version``; visible to readers only once complete.
        ``WeightStoreFull`` (an ``OSError``) when the directory has no room for it."""
        if not self._published and not self._idle:
            sweep_stale_segments(self.directory)
        entries, offset = [], 0
        for key, tensor in state_dict.items():
            nbytes = tensor.numel() * tensor.element_size()
            entries.append({"name": key, "dtype": str(tensor.dtype).removeprefix("torch."),
                            "shape": list(tensor.shape), "offset": offset, "nbytes": nbytes})
            offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        header = json.dumps({"version": version, "tensors": entries}).encode()
        data_start = (8 + len(header) + _ALIGN - 1) // _ALIGN * _ALIGN
        with self._new_version(data_start + offset, version) as buffer:
            buffer[:8] = struct.pack("<Q", len(header))
            buffer[8 : 8 + len(header)] = header
            for entry, tensor in zip(entries, state_dict.values()):
                if entry["nbytes"]:
                    target = torch.frombuffer(buffer, dtype=torch.uint8, count=entry["nbytes"],
                                              offset=data_start + entry["offset"])
                    target.copy_(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu())
                    del target
        return self._published[-1].path

    @contextlib.contextmanager
    def _new_version(self, size: int, version: int) -> Iterator[mmap.mmap]:
        """A locked segment of ``size`` bytes to fill; on success it becomes ``version``
        (renamed into place, so readers see it only complete), on failure it is removed."""
        segment = self._segment_for(size)
        try:
            yield segment.buffer
            segment.rename(self.directory / f"{self._version_prefix(version)}{os.getpid()}.bin")
            segment.unlock()
        except BaseException:
            segment.destroy()
            raise
        self._retire(segment)  # older versions disappear from readers' view

    def close(self) -> None:
        """Remove every file this store published or keeps for reuse; drop cached mappings."""
        for entry in self._mapped.values():
            self._unmap(entry)
        self._mapped.clear()
        for segment in [*self._published, *self._idle]:
            segment.destroy()
        self._published.clear()
        self._idle.clear()
        _remove_if_unlocked(self._fetch_lock_path())  # unless a pull of another process holds it

    # ---- reading (the generators) ------------------------------------------------

    # ---- the cross-host path -------------------------------------------------------

    def _published_segment(self, version: int) -> _Segment:
        for segment in self._published:
            if segment.path.name.startswith(self._version_prefix(version)):
                return segment
        raise ValueError(f"weights version {version} of store {self.name!r} is not published by this process")

    def read_bytes(self, version: int, offset: int, length: int) -> bytes:
        """``length`` bytes of this process's published ``version`` file from ``offset``."""
        return bytes(self._published_segment(version).buffer[offset : offset + length])

    def published_size(self, version: int) -> int:
        return self._published_segment(version).size

    async def fetch(self, version: int, source: Any, chunk_bytes: int = 64 << 20, in_flight: int = 4,
                    timeout_s: float = 120.0, lock_timeout_s: float = 1800.0) -> int:
        """Copy ``version`` from a publisher on another host into this host's store.

        ``source`` is an actor (mesh) with ``weights_size(version)`` and
        ``weights_chunk(version, offset, length)`` endpoints, such as ``RLTrainer``: the file
        travels through Monarch in chunks, ``in_flight`` at a time, into a local segment
        that is renamed into place when complete, so the replicas of this host then load it
        from shared memory like a local version. One process of a host pulls at a time: a
        replica that finds the version already pulled by another uses that copy. Returns
        the bytes this call pulled (0 when another process had). ``timeout_s`` bounds each
        message; ``lock_timeout_s`` the wait for another process's pull of a large model.
        ``WeightStoreFull`` before any chunk is pulled when this host has no room for it;
        ``PermissionError`` when the pull lock file is a link or another user's.
        """
        lock = await self._fetch_lock(lock_timeout_s)
        try:
            if self.find(version) is not None:
                return 0
            return await self._pull(version, source, chunk_bytes, in_flight, timeout_s)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)

    def _fetch_lock_path(self) -> Path:
        return self.directory / f".{PREFIX}.{self._key}.{self.token}.fetch.lock"

    async def _fetch_lock(self, timeout_s: float) -> int:
        """This host's pull lock of the store: an exclusive flock, waited for without blocking the loop.

        The lock file may be removed (``close``, ``sweep_stale_segments``) by whoever holds
        the lock; a waiter that then locks the removed file tries again on the current one.
        """
        deadline = time.monotonic() + timeout_s
        path = self._fetch_lock_path()
        while True:
            fd = _open_private(path, os.O_CREAT | os.O_RDWR)  # PermissionError: a link or not ours
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"weights of store {self.name!r}: another process on this host held the pull lock "
                                f"{path} for more than {timeout_s} s"
                            ) from None
                        await asyncio.sleep(0.02)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                        return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file that was removed meanwhile: lock the current one

    async def _pull(self, version: int, source: Any, chunk_bytes: int, in_flight: int, timeout_s: float) -> int:
        if hasattr(source, "size") and callable(source.size) and source.size() > 1:
            source = source.slice(**{dim: 0 for dim in source.extent.keys()})  # rank 0 publishes
        size = await asyncio.wait_for(source.weights_size.call_one(version), timeout_s)
        with self._new_version(size, version) as buffer:
            limit = asyncio.Semaphore(in_flight)

            async def pull(offset: int) -> None:
                async with limit:
                    data = await asyncio.wait_for(
                        source.weights_chunk.call_one(version, offset, min(chunk_bytes, size - offset)), timeout_s
                    )
                buffer[offset : offset + len(data)] = data

            pulls = [asyncio.ensure_future(pull(o)) for o in range(0, size, chunk_bytes)]
            try:
                await asyncio.gather(*pulls)
            except BaseException:
                for task in pulls:  # stop writing into a segment that is about to be removed
                    task.cancel()
                await asyncio.gather(*pulls, return_exceptions=True)
                raise
        return size

    def _retire(self, segment: _Segment) -> None:
        """Record a new version's segment and hide the versions beyond ``keep``."""
        self._published.append(segment)
        while len(self._published) > self.keep:
            old = self._published.pop(0)
            old.rename(self._hidden_path("idle"))
            self._idle.append(old)

    def find(self, version: int) -> Path | None:
        """The file of ``version`` on this host, if any (files that fail the owner and mode
        checks are skipped: see the module docstring)."""
        matches = sorted(p for p in self.directory.glob(f"{self._version_prefix(version)}*.bin") if _trusted(p))
        return matches[-1] if matches else None

    def newest_version(self) -> int | None:
        """The highest version published on this host, if any."""
        pattern = re.compile(re.escape(f"{PREFIX}.{self._key}.v") + r"(\d+)"
                             + re.escape(f".{self.token}.") + r"\d+\.bin")
        versions = [int(m.group(1)) for p in self.directory.glob(f"{PREFIX}.{self._key}.v*.{self.token}.*.bin")
                    if (m := pattern.fullmatch(p.name)) and _trusted(p)]
        return max(versions, default=None)

    @contextlib.contextmanager
    def open(self, version: int) -> Iterator[dict[str, torch.Tensor]]:
        """Tensors of ``version``, mapped from shared memory (valid only inside the block).

        It does not wait: a version not (or no longer) on this host is a ``LookupError`` —
        ``await wait_for(version)`` first. Files of other users or links are never loaded
        (see ``find``); ``PermissionError`` if the file found is swapped for one before it
        is opened."""
        path = self.find(version)
        if path is None:
            raise self._not_here(version)
        try:
            f, buffer = self._map(path)
        except FileNotFoundError:  # reused for a newer version between find() and open()
            with self.open(version) as tensors:
                yield tensors
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # the publisher never rewrites a locked segment
        try:
            (header_len,) = struct.unpack("<Q", buffer[:8])
            header = json.loads(bytes(buffer[8 : 8 + header_len]))
            stale = header["version"] != version  # renamed and rewritten before we locked it
            if not stale:
                data_start = (8 + header_len + _ALIGN - 1) // _ALIGN * _ALIGN
                tensors = {}
                for entry in header["tensors"]:
                    dtype = getattr(torch, entry["dtype"])
                    if entry["nbytes"]:
                        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=entry["nbytes"],
                                               offset=data_start + entry["offset"])
                        tensors[entry["name"]] = raw.view(dtype).view(entry["shape"])
                    else:
                        tensors[entry["name"]] = torch.empty(entry["shape"], dtype=dtype)
                try:
                    yield tensors
                finally:
                    tensors.clear()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        if stale:
            with self.open(version) as tensors:
                yield tensors

    def _map(self, path: Path) -> tuple[Any, mmap.mmap]:
        """The file and a mapping of it, kept across versions: the publisher rewrites the
        same segments in place, so a cached mapping costs no page-table work next time."""
        f = os.fdopen(_open_private(path, os.O_RDWR), "r+b")  # PermissionError: a link or not ours
        st = os.fstat(f.fileno())
        cached = self._mapped.get(st.st_ino)
        if cached is not None and cached[1].size() == st.st_size:
            f.close()
            self._mapped.move_to_end(st.st_ino)
            return cached
        try:
            buffer = mmap.mmap(f.fileno(), st.st_size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            f.close()
            raise
        if cached is not None:  # same inode, new size: a different file now
            self._unmap(cached)
        self._mapped[st.st_ino] = (f, buffer)
        while len(self._mapped) > 2 * self.keep + 2:  # only called between reads: nothing is locked
            _, old = self._mapped.popitem(last=False)
            self._unmap(old)
        return f, buffer

    @staticmethod
    def _unmap(entry: tuple[Any, mmap.mmap]) -> None:
        f, buffer = entry
        with contextlib.suppress(BufferError):
            buffer.close()
        f.close()

    async def wait_for(self, version: int, timeout_s: float = 60.0) -> None:
        """Wait (without blocking the event loop) until ``version`` is on this host."""
        deadline = time.monotonic() + timeout_s
        while self.find(version) is None:
            newest = self.newest_version()
            if newest is not None and newest > version:  # it will never appear: fail now, not at the deadline
                raise LookupError(f"weights version {version} of store {self.name!r} was replaced by version "
                                  f"{newest} before it could be loaded")
            if time.monotonic() > deadline:
                raise self._not_published(version, timeout_s)
            await asyncio.sleep(0.01)

    def _not_here(self, version: int) -> LookupError:
        newest = self.newest_version()
        return LookupError(
            f"weights version {version} of store {self.name!r} is not in {self.directory} (newest here: {newest}); "
            f"await wait_for({version}) before opening it, and check that the trainer published it (push_weights) "
            f"with the same store name, in a process with the same ${SECRET_ENV}"
        )

    def _not_published(self, version: int, timeout_s: float) -> TimeoutError:
        return TimeoutError(
            f"weights version {version} of store {self.name!r} did not appear in {self.directory} "
            f"within {timeout_s} s; did the trainer publish it (push_weights) with the same store name, in a "
            f"process with the same ${SECRET_ENV} (or pass both the same WeightStore object)?"
        )

    def read(self, version: int) -> dict[str, torch.Tensor]:
        """A private copy of ``version`` (for callers that keep the tensors); ``LookupError``
        when it is not on this host, as ``open``."""
        with self.open(version) as tensors:
            return {k: v.clone() for k, v in tensors.items()}

    def __reduce__(self) -> Any:
        return (WeightStore, (self.name, self.directory, self.keep, self.token))  # the token travels

    @classmethod
    def resolve(cls, spec: "WeightStore | str | None") -> "WeightStore":
        """An actor's ``weight_store=`` argument: a store, a store name, or None (the default)."""
        return spec if isinstance(spec, WeightStore) else cls(spec)
