"""Several hosts, simulated on this machine: Monarch ProcessJob workers and hand-started workers."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from monarch.actor import endpoint

from forge.controller import ForgeActor, actor_alive, init_hosts
from forge.util.tmpdirs import tmp_root
from tests.helpers import async_wait_until, procs_with_env, wait_until

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


class Where(ForgeActor):
    @endpoint
    async def where(self) -> dict:
        keys = ("FORGE_HOST", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
        return {"pid": os.getpid(), **{k: os.environ.get(k) for k in keys}}


def worker_pid(pool, host_key: str) -> int:
    """The pid of a ProcessJob worker (one simulated host)."""
    return pool._job._host_to_pid[host_key.replace("-", "_")].pid


async def test_replicas_spread_over_hosts_and_a_dead_hosts_replica_is_rebuilt_elsewhere_without_failed_calls(tag):
    pool = await init_hosts({"source": "process_job", "groups": {"gen": 3}, "failure_timeout_s": 3})
    try:
        service = await Where.options(num_replicas=2, hosts=1, host_group="gen").as_service()
        stats = await service.statistics()
        placed = [r.hosts[0] for r in stats.replicas]  # replicas start concurrently: either order
        assert sorted(placed) == ["gen-0", "gen-1"]
        answers = await service.where.fanout()
        assert [a["FORGE_HOST"] for a in answers] == placed
        assert all(a["RANK"] == "0" and a["WORLD_SIZE"] == "1" for a in answers)

        failures, completed, stop = [], [0], False

        async def caller():
            while not stop:
                try:
                    await service.where.route()
                    completed[0] += 1
                except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                    failures.append(e)
                await asyncio.sleep(0.01)

        callers = [asyncio.ensure_future(caller()) for _ in range(8)]
        assert await async_wait_until(lambda: completed[0] >= 50, 30)  # under load
        killed_at = time.monotonic()
        os.kill(worker_pid(pool, placed[1]), signal.SIGKILL)  # the whole host: worker and its processes

        async def replica_1():
            return (await service.statistics()).replicas[1]

        assert await async_wait_until(lambda: _not_healthy(replica_1), 15, 0.1)
        detected_s = time.monotonic() - killed_at
        assert detected_s < 10, f"host death noticed after {detected_s:.1f} s"
        assert await async_wait_until(lambda: _healthy(replica_1), 30, 0.1)
        rebuilt = await replica_1()
        assert rebuilt.hosts == ("gen-2",) and rebuilt.num_restarts == 1
        served_before = completed[0]
        assert await async_wait_until(lambda: completed[0] >= served_before + 50, 30)  # still serving
        stop = True
        await asyncio.gather(*callers)
        assert failures == [] and completed[0] > 100
        assert [a["FORGE_HOST"] for a in await service.where.fanout()] == [placed[0], "gen-2"]
        statuses = {s.info.key: s for s in await pool.statuses()}
        assert not statuses[placed[1]].alive and statuses[placed[0]].alive and statuses["gen-2"].placements == 1
        await service.shutdown()
    finally:
        await pool.shutdown()
    assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 15, 0.2)


async def _not_healthy(get):
    return (await get()).state != "healthy"


async def _healthy(get):
    return (await get()).state == "healthy"


async def test_one_actor_on_two_hosts_gets_a_global_rank_layout_and_per_host_gpus(tag, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # every simulated host then has two GPUs
    pool = await init_hosts({"source": "process_job", "groups": {"train": 2}, "failure_timeout_s": 3})
    try:
        assert [h.gpus for h in pool.hosts] == [("0", "1"), ("0", "1")]
        actor = await Where.options(procs=2, hosts=2, host_group="train", with_gpus=True).as_actor()
        ranks = sorted((await actor.where.call()).values(), key=lambda a: int(a["RANK"]))
        assert [(a["FORGE_HOST"], a["RANK"], a["LOCAL_RANK"], a["CUDA_VISIBLE_DEVICES"]) for a in ranks] == [
            ("train-0", "0", "0", "0"), ("train-0", "1", "1", "1"), ("train-1", "2", "0", "0"), ("train-1", "3", "1", "1")]
        assert {a["WORLD_SIZE"] for a in ranks} == {"4"} and {a["MASTER_ADDR"] for a in ranks} == {"127.0.0.1"}
        assert len({a["MASTER_PORT"] for a in ranks}) == 1
        assert await actor_alive(actor)
        # Every GPU of the group is taken: one more GPU actor is refused, clearly, and nothing is left of it.
        with pytest.raises(RuntimeError, match=r"no 1 live host\(s\) in a row in group 'train' with 1 free GPU"):
            await Where.options(hosts=1, host_group="train", with_gpus=True).as_actor()
        await Where.shutdown(actor)
        statuses = await pool.statuses()
        assert all(s.placements == 0 and s.gpus_in_use == () for s in statuses)
        os.kill(worker_pid(pool, "train-1"), signal.SIGKILL)

        async def train_1_dead():
            return not {s.info.key: s for s in await pool.statuses()}["train-1"].alive

        assert await async_wait_until(train_1_dead, 15, 0.2)
        one, other = [await Where.options(hosts=1, host_group="train").as_actor() for _ in range(2)]
        assert [(await a.where.call_one())["FORGE_HOST"] for a in (one, other)] == ["train-0"] * 2  # not the dead host
        pid = (await other.where.call_one())["pid"]
        os.kill(pid, signal.SIGKILL)
        assert await async_wait_until(lambda: _dead(other), 10, 0.1)
    finally:
        await pool.shutdown()


async def _dead(actor):
    return not await actor_alive(actor)


async def test_placement_mistakes_are_refused_before_anything_is_spawned(tag):
    with pytest.raises(ValueError, match="needs a host pool"):
        await Where.options(hosts=2).as_service()
    pool = await init_hosts({"source": "process_job", "groups": {"gen": 1, "train": 1}})
    try:
        with pytest.raises(ValueError, match=r"host_group='nope' is not a group of the host pool; groups: \['gen', 'train'\]"):
            await Where.options(host_group="nope").as_actor()
        with pytest.raises(ValueError, match="hosts=2 but group 'gen' has 1 host"):
            await Where.options(hosts=2, host_group="gen").as_service()
        with pytest.raises(ValueError, match="needs host_group= naming one of"):
            await Where.options(hosts=1).as_actor()
        with pytest.raises(RuntimeError, match="already running"):
            await init_hosts({"source": "process_job", "groups": {"x": 1}})
    finally:
        await pool.shutdown()


CLIENT = """
import asyncio, os, sys
sys.path.insert(0, {root!r})
from tests.actors.test_hosts import Where
from forge.controller import init_hosts
from forge.util.tmpdirs import private_tmpdir

async def main():
    private_tmpdir()
    await init_hosts({{"source": "process_job", "groups": {{"gen": 2}}, "lease_timeout_s": {lease}, "failure_timeout_s": 3}})
    service = await Where.options(num_replicas=2, hosts=1, host_group="gen").as_service()
    await service.where.fanout()
    print("ready", flush=True)
    if {crash!r}:
        raise RuntimeError("the user's loop fails; nobody calls pool.shutdown()")
    await asyncio.sleep(600)

asyncio.run(main())
"""


def tmp_entries() -> set[str]:
    """What is in the temp directory where Forge processes make their own (see forge.util.tmpdirs)."""
    return set(os.listdir(tmp_root()))


@pytest.mark.parametrize("how", ["sigkill", "exception"])
def test_a_client_that_dies_or_never_shuts_down_leaves_no_process_on_any_host(tag, tmp_path, how):
    dirs_before = tmp_entries()
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(root=str(ROOT), lease=15, crash=how == "exception"))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=dict(os.environ))
    try:
        assert client.stdout.readline().strip() == "ready"
        assert len(procs_with_env("FORGE_TEST_TAG", tag)) >= 6  # client, reaper, 2 workers, 2 agents, replicas...
        if how == "sigkill":
            client.send_signal(signal.SIGKILL)
        client.wait(30)
        # The pool's reaper sees the client gone and kills the job's processes, workers included,
        # then removes the socket directories the killed processes left in /tmp.
        assert wait_until(lambda: not procs_with_env("FORGE_TEST_TAG", tag), 15, 0.2), procs_with_env("FORGE_TEST_TAG", tag)
        assert wait_until(lambda: not tmp_entries() - dirs_before, 15, 0.2), tmp_entries() - dirs_before
    finally:
        if client.poll() is None:
            client.kill()


LEASE_CLIENT = CLIENT.replace('"process_job", "groups": {{"gen": 2}}', '"workers", "groups": {{"gen": {workers!r}}}')


async def test_a_killed_clients_processes_on_hand_started_workers_go_and_the_workers_stay_up(tag, tmp_path):
    ports = [free_port(), free_port()]
    workers = [start_worker(p) for p in ports]
    script = tmp_path / "client.py"
    script.write_text(LEASE_CLIENT.format(root=str(ROOT), lease=8, crash=False,
                                          workers=[f"tcp://127.0.0.1:{p}" for p in ports]))
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=dict(os.environ))
    try:
        assert client.stdout.readline().strip() == "ready"
        on_workers = [p for p in procs_with_env("FORGE_TEST_TAG", tag) if _parent(p) in {w.pid for w in workers}]
        assert len(on_workers) >= 4  # 2 agents, 2 replicas
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        worker_pids = {w.pid for w in workers}
        assert wait_until(lambda: set(procs_with_env("FORGE_TEST_TAG", tag)) == worker_pids, 30, 0.2)
        assert all(w.poll() is None for w in workers)  # the user's workers stay up for the next job
    finally:
        if client.poll() is None:
            client.kill()
        for w in workers:
            w.kill()
            w.wait(10)


def start_worker(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "forge.controller.worker", "--address", f"tcp://127.0.0.1:{port}"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_workers_started_by_hand_serve_a_job_and_stay_up_empty_afterwards(tag):
    ports = [free_port(), free_port()]
    workers = [start_worker(p) for p in ports]
    try:
        pool = await init_hosts({"source": "workers", "groups": {"gen": [f"tcp://127.0.0.1:{p}" for p in ports]}})
        try:
            service = await Where.options(num_replicas=2, hosts=1, host_group="gen").as_service()
            answers = await service.where.fanout()
            assert sorted(a["FORGE_HOST"] for a in answers) == ["gen-0", "gen-1"]
            worker_pids = {w.pid for w in workers}
            assert all(_parent(a["pid"]) in worker_pids for a in answers)  # really on the workers
        finally:
            await pool.shutdown()
        remaining = procs_with_env("FORGE_TEST_TAG", tag)
        assert wait_until(lambda: set(procs_with_env("FORGE_TEST_TAG", tag)) == {w.pid for w in workers}, 15, 0.2), remaining
        assert all(w.poll() is None for w in workers)  # the user's workers are still up for the next job
    finally:
        for w in workers:
            w.kill()
            w.wait(10)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def test_a_data_parallel_trainer_spanning_two_hosts_matches_one_process(tag):
    from forge.actors.trainer import RLTrainer
    from tests.actors.test_trainer import MODEL, make_batch

    pool = await init_hosts({"source": "process_job", "groups": {"train": 2}})
    config = dict(model=MODEL, optimizer={"name": "SGD", "lr": 1.0},  # gradients compared: see test_trainer
                  training={"local_batch_size": 4, "seq_len": 64}, loss={"normalization": "grpo"})
    single = await RLTrainer.options(procs=1).as_actor(**config)
    try:
        spanning = await RLTrainer.options(procs=1, hosts=2, host_group="train").as_actor(**config)  # FSDP2, 2 hosts
        for step in range(2):
            inputs, targets = make_batch(4, seed=step)
            loss = await single.train_step.call_one(inputs, targets)
            losses = [v for _, v in (await spanning.train_step.call(inputs, targets)).items()]
            assert losses == pytest.approx([loss] * 2, abs=1e-5)
        expected = await single.weights.call_one()
        got = next(iter((await spanning.weights.call()).values()))
        assert all((v - got[k]).abs().max() <= 1e-6 for k, v in expected.items())
    finally:
        await RLTrainer.shutdown(single)
        await pool.shutdown()  # also stops the spanning trainer, still running on the pool
