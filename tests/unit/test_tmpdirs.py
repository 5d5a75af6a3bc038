"""Temp directories with an owner: removed with their owner, swept once it is gone, never before."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


from forge.util.tmpdirs import owner_tag, sweep_dead_tmpdirs

SCRIPT = """
import sys, time
from forge.util.tmpdirs import private_tmpdir
print(private_tmpdir(), flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


def run_owner(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    owner = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], env=env, stdout=subprocess.PIPE, text=True)
    path = Path(owner.stdout.readline().strip())
    return owner, path


def test_a_private_tmpdir_goes_with_its_process_or_with_the_next_sweep_after_a_kill(tmp_path, monkeypatch):
    owner, clean = run_owner(tmp_path, "exit")
    assert owner.wait(30) == 0 and clean.parent == tmp_path and not clean.exists()  # removed at exit
    owner, killed = run_owner(tmp_path, "wait")
    (killed / ".tmpAbCdEf").mkdir()  # what Monarch would leave there
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert sweep_dead_tmpdirs() == 0 and killed.exists()  # its owner is alive: never touched
    owner.send_signal(signal.SIGKILL)
    owner.wait(30)
    assert sweep_dead_tmpdirs() == 1 and not killed.exists()


def test_only_this_users_directories_of_dead_owners_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine_alive = tmp_path / f"forge-tmp-{owner_tag()}"
    reused_pid = tmp_path / f"forge-job-{os.getpid()}-1-abc123"  # this pid, another start time: its owner is gone
    unrelated = tmp_path / "forge-tmp-notes"
    for path in (mine_alive, reused_pid, unrelated):
        path.mkdir()
    foreign = tmp_path / "forge-tmp-999999-1"
    foreign.mkdir()
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
    assert sweep_dead_tmpdirs() == (1 if os.geteuid() == 0 else 2)
    assert mine_alive.exists() and unrelated.exists() and not reused_pid.exists()
    assert foreign.exists() == (os.geteuid() == 0)
