"""``hosts.source: ssh`` for real: an OpenSSH server on loopback (``tests/sshd.py``), whose two
addresses 127.0.0.1 and 127.0.0.2 are two hosts."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from forge.controller import init_hosts
from forge.util.procs import descendants, has_env
from tests.actors.test_hosts import Where, _healthy, _not_healthy
from tests.helpers import async_wait_until, procs_with_env, wait_until
from tests.sshd import HOSTS, free_port, loopback_sshd

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def ssh_hosts(sshd, tag: str, groups: dict) -> dict:
    """A ``hosts`` config over the test's sshd; the workers (a fresh login environment) get the test's tag."""
    env = {"FORGE_TEST_TAG": tag, "MONARCH_FILE_LOG": "error", "FORGE_CACHE_DIR": os.environ["FORGE_CACHE_DIR"]}
    return {"source": "ssh", "groups": groups, "failure_timeout_s": 3,
            "ssh": sshd.options(monarch_port=free_port(), env=env)}


def worker_on(tag: str, host: str) -> int:
    """The pid of the worker the pool started over ssh on ``host``."""
    pids = [p for p in procs_with_env("FORGE_TEST_TAG", tag) if has_env(p, "FORGE_HOST_ADDR", host)
            and b"forge.controller.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(pids) == 1, pids
    return pids[0]


async def test_a_service_on_two_ssh_hosts_survives_one_hosts_death_and_leaves_nothing_running(sshd, tag):
    pool = await init_hosts(ssh_hosts(sshd, tag, {"gen": list(HOSTS)}))
    try:
        await a_service_survives_one_hosts_death(pool, sshd, tag)  # its handles dropped before the pool stops
    finally:
        await pool.shutdown()
    # The live host's worker stopped when its ssh connection closed; the logins are gone with them.
    assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 15, 0.2), procs_with_env("FORGE_TEST_TAG", tag)
    assert wait_until(lambda: not descendants(sshd.pid), 15, 0.2), descendants(sshd.pid)


async def a_service_survives_one_hosts_death(pool, sshd, tag):
    assert [(h.key, h.address) for h in pool.hosts] == [("gen-0", "127.0.0.1"), ("gen-1", "127.0.0.2")]
    service = await Where.options(num_replicas=2, hosts=1, host_group="gen").as_service()
    answers = await service.where.fanout()
    assert sorted(a["FORGE_HOST"] for a in answers) == ["gen-0", "gen-1"]
    workers = {host: worker_on(tag, host) for host in HOSTS}
    assert set(workers.values()) <= set(descendants(sshd.pid))  # started through the ssh server
    host_of = {"gen-0": HOSTS[0], "gen-1": HOSTS[1]}
    assert all(a["pid"] in descendants(workers[host_of[a["FORGE_HOST"]]]) for a in answers)

    on_gen_1 = next(i for i, r in enumerate((await service.statistics()).replicas) if r.hosts == ("gen-1",))

    async def replica():
        return (await service.statistics()).replicas[on_gen_1]

    os.kill(workers["127.0.0.2"], signal.SIGKILL)  # the host: its worker, and with it its processes
    assert await async_wait_until(lambda: _not_healthy(replica), 15, 0.1)
    assert await async_wait_until(lambda: _healthy(replica), 30, 0.1)
    rebuilt = await replica()
    assert rebuilt.hosts == ("gen-0",) and rebuilt.num_restarts == 1
    assert [a["FORGE_HOST"] for a in await service.where.fanout()] == ["gen-0", "gen-0"]
    assert [s.alive for s in await pool.statuses()] == [True, False]
    await service.shutdown()


async def test_a_short_grpo_run_with_the_generator_and_the_trainer_on_two_ssh_hosts(sshd, tag, tmp_path):
    from apps.grpo.config import GRPOConfig
    from apps.grpo.main import DEFAULT_CONFIG, run
    from forge.util.config import load_config
    from tests.e2e.test_grpo import QUICK

    hosts = ssh_hosts(sshd, tag, {"gen": [HOSTS[0]], "train": [HOSTS[1]]})
    args = [*QUICK, "run.max_steps=2", "run.eval_every=0", f"run.output_dir={tmp_path}", f"hosts={json.dumps(hosts)}",
            "placement={policy: gen, trainer: train, ref_model: train}"]
    summary = await run(load_config(GRPOConfig, DEFAULT_CONFIG, args), tmp_path)
    assert summary["steps"] == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["policy/version"] == 2
    assert sum(line.get("weight_sync/pulled_mb", 0) for line in lines) > 0  # pulled from the trainer's host
    assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 15, 0.2), procs_with_env("FORGE_TEST_TAG", tag)
    assert wait_until(lambda: not descendants(sshd.pid), 15, 0.2), descendants(sshd.pid)


CLIENT = """
import asyncio, json, sys
from forge.controller import init_hosts
from forge.util.tmpdirs import private_tmpdir

async def main():
    private_tmpdir()
    await init_hosts(json.loads(sys.argv[1]))  # an agent on each host: the job's processes there
    print("ready", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_killed_clients_ssh_workers_stop_with_its_connections(sshd, tag):
    hosts = ssh_hosts(sshd, tag, {"gen": list(HOSTS)})
    client = subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(hosts)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        workers = [worker_on(tag, host) for host in HOSTS]
        assert all(descendants(w) for w in workers)  # the agents
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        # Well before the agents' leases (30 s) run out: the workers' stdin closed with the client.
        assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 10, 0.2), procs_with_env("FORGE_TEST_TAG", tag)
        assert wait_until(lambda: not descendants(sshd.pid), 10, 0.2), descendants(sshd.pid)
    finally:
        if client.poll() is None:
            client.kill()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
async def test_a_host_ssh_cannot_reach_fails_the_start_at_once_naming_it(tag):
    closed = free_port()  # nothing listens there: ssh exits with 255
    config = {"source": "ssh", "groups": {"gen": ["127.0.0.1"]}, "ssh": {"port": closed, "monarch_port": free_port()}}
    with pytest.raises(RuntimeError, match=r"ssh to a host ended before its worker answered: 127.0.0.1 \(group 'gen'\): "
                                           r"exit status 255"):
        await init_hosts(config)
