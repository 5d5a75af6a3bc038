"""A client that crashes or is interrupted leaves no Monarch process behind."""

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import interruptible, monarch_procs_with_env, wait_until

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]


def start_client(tag: str) -> subprocess.Popen:
    env = dict(os.environ, FORGE_TEST_TAG=tag, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.actors.client_script"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=interruptible,
    )
    line = process.stdout.readline()
    assert line.strip() == "READY", f"client did not start: {line!r}"
    return process


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_or_interrupted_client_leaves_no_process(how):
    tag = uuid.uuid4().hex
    client = start_client(tag)
    try:
        assert len(monarch_procs_with_env("FORGE_TEST_TAG", tag)) >= 4  # controller, 2 replicas, actor
        client.send_signal(how)
        client.wait(timeout=20)
        assert wait_until(lambda: not monarch_procs_with_env("FORGE_TEST_TAG", tag), 15)
    finally:
        if client.poll() is None:
            client.kill()
        for pid in monarch_procs_with_env("FORGE_TEST_TAG", tag):
            os.kill(pid, signal.SIGKILL)
