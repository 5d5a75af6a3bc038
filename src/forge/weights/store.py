"""Same-host weight store: one shared-memory file per published version.

Monarch pickles every message (about 0.3 GB/s for tensors here), so weights must not
travel as endpoint arguments between processes on one host. The trainer writes version
``v`` of its state dict (Hugging Face parameter names) into one file under ``/dev/shm``;
each generator maps that file and copies the tensors straight into its model.

* A reader never sees a half-written version: the file is written under a temporary
  name and renamed into place when complete (rename is atomic).
* Files are created with ``O_EXCL`` and mode ``0600`` (owner only) and carry a unique
  store name and the owner's pid: ``forge-w.<store>.v<version>.<pid>.bin``.
* Older versions are deleted when a new one is published (``keep`` of them remain); a
  reader that still maps an unlinked file keeps its mapping until it is done.
* ``close()`` removes the store's files; ``sweep_stale_segments()`` (run when a store
  is opened for publishing) removes files whose owner process is dead — leftovers of a
  crashed or killed run.

File layout: an 8-byte little-endian header length, a JSON header (per tensor: name,
dtype, shape, offset, nbytes), then the tensors' bytes, each 64-byte aligned.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

PREFIX = "forge-w"
_ALIGN = 64
_OWNER = re.compile(r"\.(?P<pid>\d+)\.bin(\.[0-9a-f]+\.tmp)?$")  # final and staging names
_STORE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def default_directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


def default_store_name() -> str:
    """``$FORGE_RUN_ID`` when set (one store per run), else ``default``."""
    return os.environ.get("FORGE_RUN_ID", "default")


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_segments(directory: Path | None = None) -> list[Path]:
    """Delete weight files (finished or half-written) whose owner process is gone."""
    directory = directory or default_directory()
    removed = []
    for path in [*directory.glob(f"{PREFIX}.*"), *directory.glob(f".{PREFIX}.*")]:
        owner = _OWNER.search(path.name)
        if owner is not None and not _is_alive(int(owner["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


class WeightStore:
    """Versioned weights of one run on this host. See the module docstring."""

    def __init__(self, name: str | None = None, directory: str | os.PathLike | None = None, keep: int = 1) -> None:
        name = name or default_store_name()
        if not _STORE_NAME.match(name):
            raise ValueError(f"weight store name {name!r} may only use letters, digits, '-' and '_'")
        if keep < 1:
            raise ValueError(f"weight store keep must be >= 1, got {keep}")
        self.name = name
        self.directory = Path(directory) if directory is not None else default_directory()
        self.keep = keep
        self._published: list[Path] = []

    # ---- writing (the trainer) ---------------------------------------------------

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> Path:
        """Write ``state_dict`` as ``version``; visible to readers only once complete."""
        if not self._published:
            sweep_stale_segments(self.directory)
        entries, offset = [], 0
        for key, tensor in state_dict.items():
            nbytes = tensor.numel() * tensor.element_size()
            entries.append({"name": key, "dtype": str(tensor.dtype).removeprefix("torch."),
                            "shape": list(tensor.shape), "offset": offset, "nbytes": nbytes})
            offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        header = json.dumps({"version": version, "tensors": entries}).encode()
        data_start = (8 + len(header) + _ALIGN - 1) // _ALIGN * _ALIGN
        final = self.directory / f"{PREFIX}.{self.name}.v{version}.{os.getpid()}.bin"
        staging = self.directory / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(data_start + offset, 1))
            with mmap.mmap(fd, max(data_start + offset, 1)) as buffer:
                buffer[:8] = struct.pack("<Q", len(header))
                buffer[8 : 8 + len(header)] = header
                for entry, tensor in zip(entries, state_dict.values()):
                    if entry["nbytes"]:
                        target = torch.frombuffer(buffer, dtype=torch.uint8, count=entry["nbytes"],
                                                  offset=data_start + entry["offset"])
                        target.copy_(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu())
                        del target
            os.rename(staging, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise
        finally:
            os.close(fd)
        self._published.append(final)
        while len(self._published) > self.keep:
            with contextlib.suppress(FileNotFoundError):
                self._published.pop(0).unlink()
        return final

    def close(self) -> None:
        """Remove every file this store published."""
        for path in self._published:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._published.clear()

    # ---- reading (the generators) ------------------------------------------------

    def find(self, version: int) -> Path | None:
        matches = sorted(self.directory.glob(f"{PREFIX}.{self.name}.v{version}.*.bin"))
        return matches[-1] if matches else None

    @contextlib.contextmanager
    def open(self, version: int, timeout_s: float = 60.0) -> Iterator[dict[str, torch.Tensor]]:
        """Tensors of ``version``, mapped from shared memory (valid only inside the block)."""
        deadline = time.monotonic() + timeout_s
        path = self.find(version)
        while path is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"weights version {version} of store {self.name!r} did not appear in {self.directory} "
                    f"within {timeout_s} s; did the trainer publish it (push_weights) with the same store name?"
                )
            time.sleep(0.01)
            path = self.find(version)
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as buffer:
            (header_len,) = struct.unpack("<Q", buffer[:8])
            header = json.loads(bytes(buffer[8 : 8 + header_len]))
            data_start = (8 + header_len + _ALIGN - 1) // _ALIGN * _ALIGN
            tensors, raw = {}, None
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
                del raw

    def read(self, version: int, timeout_s: float = 60.0) -> dict[str, torch.Tensor]:
        """A private copy of ``version`` (for callers that keep the tensors)."""
        with self.open(version, timeout_s) as tensors:
            return {k: v.clone() for k, v in tensors.items()}

    def __reduce__(self) -> Any:
        return (WeightStore, (self.name, self.directory, self.keep))
