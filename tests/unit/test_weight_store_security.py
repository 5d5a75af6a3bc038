"""The weight store against a full /dev/shm and against other local users.

A full tmpfs must fail a publish with a clear error, never kill the publisher with SIGBUS
(run in a subprocess: a SIGBUS here would kill pytest). Other users must not be able to
guess the store's file names, plant a file or a link a reader loads, or make the stale
sweep fail. Files "of another user" are made with ``os.chown`` (the tests run as root;
they skip otherwise).
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from forge.weights import WeightStore, sweep_stale_segments
from forge.weights.store import SECRET_ENV

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making files of another user (os.chown) needs root")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A private 1 MiB tmpfs: a /dev/shm that fills up."""
    mount_point = tmp_path / "shm"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a private 1 MiB tmpfs (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


_PUBLISH_2_MIB = """
import sys, torch
from forge.weights import _files, store as ws
if sys.argv[2] in ("no-check", "no-guard"):  # as if another process took the space after the check
    ws._ensure_space = lambda directory, needed: None
if sys.argv[2] == "no-guard":
    _files._reserve = lambda fd, path, size: None
try:
    ws.WeightStore("big", directory=sys.argv[1]).publish({"w": torch.zeros(512 * 1024)}, 1)
except ws.WeightStoreFull as e:
    print("FULL:", e)
"""


def publish_2_mib(directory: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PUBLISH_2_MIB, str(directory), mode],
                          capture_output=True, text=True, timeout=120)


def test_publishing_more_than_shm_holds_is_a_clear_error_not_a_sigbus(small_tmpfs):
    result = publish_2_mib(small_tmpfs, "checked")
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout
    assert "FULL:" in message and "[Errno 28]" in message
    assert "(2.0 MiB) but only" in message  # needed
    assert "free" in message and "of its 1048576 bytes (1.0 MiB)" in message  # free, and the total
    assert str(small_tmpfs) in message and "--shm-size" in message and "WeightStore(directory=...)" in message
    assert list(small_tmpfs.iterdir()) == []


def test_shm_filled_after_the_space_check_fails_at_fallocate_not_with_sigbus(small_tmpfs):
    result = publish_2_mib(small_tmpfs, "no-check")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FULL:" in result.stdout and "(2.0 MiB) but only" in result.stdout
    assert list(small_tmpfs.iterdir()) == []
    # The control: without either guard the same publish dies of SIGBUS (the bug guarded against).
    assert publish_2_mib(small_tmpfs, "no-guard").returncode == -signal.SIGBUS


def test_reusing_an_idle_segment_needs_no_free_space(small_tmpfs):
    store = WeightStore("reuse", directory=small_tmpfs)
    try:
        for version in (1, 2):  # two segments of 400 KB: v2 published, v1's kept idle for reuse
            store.publish({"w": torch.full((100_000,), float(version))}, version)
        fill(small_tmpfs / "filler")
        fs = os.statvfs(small_tmpfs)
        assert fs.f_bavail * fs.f_frsize < 400_000
        store.publish({"w": torch.full((100_000,), 3.0)}, 3)  # into v1's segment
        assert torch.equal(store.read(3)["w"], torch.full((100_000,), 3.0))
    finally:
        store.close()


_PULL_2_MIB = """
import asyncio, sys, torch
from forge.weights import store as ws

class Endpoint:  # an actor endpoint, served in this process
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    async def call_one(self, *args):
        self.calls.append(args)
        return self.fn(*args)

publisher = ws.WeightStore("pulled", directory=sys.argv[2])
publisher.publish({"w": torch.zeros(512 * 1024)}, 1)
calls = []
source = type("Source", (), {})()
source.weights_size = Endpoint(publisher.published_size, calls)
source.weights_chunk = Endpoint(publisher.read_bytes, calls)
mirror = ws.WeightStore("pulled", directory=sys.argv[1])
try:
    asyncio.run(mirror.fetch(1, source))
except ws.WeightStoreFull as e:
    print("FULL:", e)
print("CALLS:", len(calls))
mirror.close()
publisher.close()
"""


def test_a_pull_from_another_host_into_a_full_shm_fails_before_any_chunk(small_tmpfs, tmp_path):
    result = subprocess.run([sys.executable, "-c", _PULL_2_MIB, str(small_tmpfs), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FULL:" in result.stdout and "(2.0 MiB) but only" in result.stdout
    assert "CALLS: 1" in result.stdout  # the size query; no chunk
    assert list(small_tmpfs.iterdir()) == []


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == 28, e  # ENOSPC: a write(2) fails cleanly; only a mapped write faults
    finally:
        os.close(fd)


# ---- names other users cannot guess ------------------------------------------------


def token_in_a_fresh_process(secret: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    if secret is not None:
        env[SECRET_ENV] = secret
    code = "from forge.weights import WeightStore; print(WeightStore('same').token)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_a_store_name_alone_does_not_give_its_file_names(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "1" * 32)
    ours = WeightStore("same", directory=tmp_path)
    monkeypatch.setenv(SECRET_ENV, "2" * 32)
    theirs = WeightStore("same", directory=tmp_path)  # another run (or user) with the same store name
    path = ours.publish({"w": torch.ones(2)}, 1)
    try:
        assert ours.token != theirs.token and ours.token in path.name
        assert theirs.find(1) is None and theirs.newest_version() is None
        assert WeightStore("same", directory=tmp_path).find(1) is None
        monkeypatch.setenv(SECRET_ENV, "1" * 32)
        assert WeightStore("same", directory=tmp_path).find(1) == path  # same run secret: same store
    finally:
        ours.close()


def test_processes_agree_on_a_store_name_exactly_when_they_share_the_run_secret(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "3" * 32)
    assert token_in_a_fresh_process("3" * 32) == WeightStore("same").token
    monkeypatch.delenv(SECRET_ENV)
    assert token_in_a_fresh_process(None) != WeightStore("same").token  # each process draws its own secret


def test_a_pickled_store_keeps_its_token_in_another_process(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "4" * 32)
    store = WeightStore("sent", directory=tmp_path)
    sent = pickle.dumps(store)
    monkeypatch.setenv(SECRET_ENV, "5" * 32)  # the receiving actor's process knows another secret
    received = pickle.loads(sent)
    store.publish({"w": torch.arange(3.0)}, 1)
    try:
        assert received.token == store.token
        assert torch.equal(received.read(1)["w"], torch.arange(3.0))
    finally:
        store.close()


def test_a_token_must_be_hex():
    with pytest.raises(ValueError, match="hex"):
        WeightStore("x", token="../../etc/passwd")


# ---- files of other users ------------------------------------------------------------


def planted_copy(store: WeightStore, version: int, directory: Path) -> Path:
    """A valid file of ``version`` for ``store``, written elsewhere (the planter's copy)."""
    directory.mkdir()
    planter = WeightStore(store.name, directory=directory, token=store.token)
    return planter.publish({"w": torch.full((3,), 666.0)}, version)


@needs_root
def test_a_reader_never_loads_a_foreign_linked_or_open_file_planted_as_a_newer_version(tmp_path, caplog):
    (tmp_path / "shm").mkdir()
    store = WeightStore("victim", directory=tmp_path / "shm")
    store.publish({"w": torch.ones(3)}, 1)
    prefix = tmp_path / "shm" / store._version_prefix(2)
    foreign = Path(f"{prefix}99999.bin")
    shutil.copy(planted_copy(store, 2, tmp_path / "a"), foreign)
    os.chown(foreign, NOBODY, NOBODY)
    link = tmp_path / "shm" / f"{store._version_prefix(3)}99999.bin"
    link.symlink_to(planted_copy(store, 3, tmp_path / "b"))  # a valid file of ours, behind a link
    open_to_all = tmp_path / "shm" / f"{store._version_prefix(4)}99999.bin"
    shutil.copy(planted_copy(store, 4, tmp_path / "c"), open_to_all)
    os.chmod(open_to_all, 0o666)
    try:
        assert [store.find(v) for v in (2, 3, 4)] == [None, None, None]
        assert store.newest_version() == 1
        with pytest.raises(LookupError):
            store.read(2)
        with pytest.raises(PermissionError, match=r"owned by nobody \(uid 65534\)"):
            store._map(foreign)
        with pytest.raises(PermissionError, match="symbolic link"):
            store._map(link)
        with pytest.raises(PermissionError, match="-rw-rw-rw-"):
            store._map(open_to_all)
        assert torch.equal(store.read(1)["w"], torch.ones(3))
        store.find(2)
        assert sum(str(foreign) in r.getMessage() for r in caplog.records) == 1  # logged once
    finally:
        store.close()


@needs_root
async def test_the_pull_lock_refuses_a_planted_link_or_a_foreign_file(tmp_path):
    store = WeightStore("pulls", directory=tmp_path)
    lock, target = store._fetch_lock_path(), tmp_path / "target-of-the-link"
    lock.symlink_to(target)
    with pytest.raises(PermissionError, match="symbolic link"):
        await store.fetch(1, source=None)
    assert not target.exists()  # the link was not followed to create it
    lock.unlink()
    lock.touch(mode=0o600)
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match=r"owned by nobody \(uid 65534\)"):
        await store.fetch(1, source=None)
    store.close()
    assert lock.exists()  # close() removes only a lock of ours


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@needs_root
def test_the_sweep_removes_our_stale_files_and_never_touches_others(tmp_path):
    pid = dead_pid()
    ours = tmp_path / f"forge-w.gone.v1.{'0' * 16}.{pid}.bin"
    theirs = tmp_path / f"forge-w.other.v1.{'1' * 16}.{pid}.bin"
    their_lock = tmp_path / f".forge-w.other.{'1' * 16}.fetch.lock"
    target = tmp_path / "target"
    link = tmp_path / f".forge-w.other.{'1' * 16}.seg1234abcd.{pid}.bin"
    for path in (ours, theirs, their_lock, target):
        path.write_bytes(b"x")
    for path in (theirs, their_lock):
        os.chown(path, NOBODY, NOBODY)
    link.symlink_to(target)
    assert sweep_stale_segments(tmp_path) == [ours]
    assert theirs.exists() and their_lock.exists() and link.is_symlink() and target.exists()


@needs_root
def test_the_sweep_of_another_user_skips_our_files_without_raising():
    """The other side: before, the sweep of whoever opened a store first raised PermissionError
    on the other's stale file in /dev/shm (sticky), and that user could never publish."""
    shared = Path(tempfile.mkdtemp(prefix="forge-sweep-", dir="/tmp"))
    try:
        shared.chmod(0o1777)  # like /dev/shm: everyone writes, only owners delete
        ours = shared / f"forge-w.root-run.v1.{'0' * 16}.{dead_pid()}.bin"
        ours.write_bytes(b"x")
        ours.chmod(0o600)
        assert run_as_nobody(lambda: sweep_stale_segments(shared) == []) == 0
        assert ours.exists()
    finally:
        shutil.rmtree(shared)


def run_as_nobody(check) -> int:
    """The exit status of a forked child that runs ``check()`` as uid 65534: 0 when it was
    true, 1 when false, 2 when it raised (traceback on stderr). A fork, not an exec: the
    interpreter may live where that user cannot read."""
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            status = 0 if check() else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
