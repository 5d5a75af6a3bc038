"""Host pool configuration, placement bookkeeping and per-host weight stores (no processes spawned)."""

import asyncio
import os
import subprocess
import sys

import pytest
import torch

from apps.grpo.config import GRPOConfig
from forge.controller import ForgeActor, HostsConfig
from forge.controller.hosts import Placement, job_processes, make_job
from forge.util.config import build
from forge.weights.store import WeightStore


@pytest.mark.parametrize("value,message", [
    ({"source": "kubernetes", "groups": {"a": 1}}, r"hosts.source must be one of \['process_job', 'workers', 'slurm'\]"),
    ({"source": "process_job"}, "hosts.groups must name at least one host group"),
    ({"groups": {"a": 0}}, "hosts.groups.a must be a number of hosts >= 1, got 0"),
    ({"groups": {"1bad": 1}}, "group name '1bad' must be a letter"),
    ({"source": "workers", "groups": {"gen": 2}}, r"needs a list of worker addresses such as \['tcp://node1:26600'\]"),
    ({"groups": {"a": 1}, "lease_timeout_s": 16}, r"lease_timeout_s must be > failure_timeout_s \+ 2.0 s \(= 17.0"),
    ({"groups": {"a": 1}, "failure_timeout_s": 0}, "failure_timeout_s must be a positive number"),
    ({"groups": {"a": 1}, "slurm": {"partition": "gpu"}}, "hosts.slurm is only used with source 'slurm'"),
    ({"source": "slurm", "groups": {"a": 1}, "slurm": {"partiton": "gpu"}}, r"unknown SlurmJob option\(s\) \['partiton'\]"),
    ({"groups": {"a": 1}, "hostz": 1}, r"hosts: unknown field\(s\) \[.hostz.\]"),
])
def test_bad_host_configs_are_refused_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        HostsConfig.parse(value)


def test_a_slurm_config_becomes_a_monarch_slurm_job_without_submitting_anything():
    config = HostsConfig.parse({"source": "slurm", "groups": {"gen": 2, "train": 4},
                                "slurm": {"partition": "gpu", "time_limit": "02:00:00", "gpus_per_node": 8,
                                          "account": "rl", "slurm_args": ["--constraint=h100"]}})
    from monarch.config import configured

    with configured():  # SlurmJob switches this process's default transport to TCP; undo it for later tests
        job = make_job(config, "abc")
    assert type(job).__name__ == "SlurmJob"
    assert job._meshes == {"gen": 2, "train": 4}
    assert (job._partition, job._time_limit, job._gpus_per_node, job._account) == ("gpu", "02:00:00", 8, "rl")
    assert list(job._slurm_args) == ["--constraint=h100"]


def test_a_process_job_tags_its_workers_with_the_job_id():
    job = make_job(HostsConfig.parse({"groups": {"gen": 3}}), "abc123")
    assert job._meshes == {"gen": 3} and job._env["FORGE_JOB_ID"] == "abc123"
    assert job._env["HYPERACTOR_MESH_GET_PROC_STATE_MAX_IDLE"] == "15s"  # failure_timeout_s


def test_ranks_map_to_the_hosts_of_their_placement():
    placement = Placement(1, "train", 2, 2, ("train-2", "train-3"), tuple({} for _ in range(8)))
    assert [placement.host_of_rank(r) for r in range(8)] == ["train-2"] * 4 + ["train-3"] * 4


def test_host_options_are_validated_when_set():
    class Thing(ForgeActor):
        pass

    with pytest.raises(ValueError, match="option 'hosts' must be an int >= 1"):
        Thing.options(hosts=0)
    with pytest.raises(ValueError, match="option 'host_group' must be the name of a host group"):
        Thing.options(host_group=3)
    assert Thing.options(hosts=4, host_group="gen")._forge_placement.hosts == 4


def test_grpo_placement_must_name_known_parts_and_groups():
    hosts = {"source": "process_job", "groups": {"gen": 1, "train": 1}}
    cfg = build(GRPOConfig, {"hosts": hosts, "placement": {"policy": "gen", "trainer": "train"}})
    assert cfg.placement == {"policy": "gen", "trainer": "train"}
    with pytest.raises(ValueError, match=r"placement: unknown part\(s\) \['polcy'\]"):
        build(GRPOConfig, {"hosts": hosts, "placement": {"polcy": "gen"}})
    with pytest.raises(ValueError, match=r"placement.trainer: 'gpu' is not a group of hosts.groups \['gen', 'train'\]"):
        build(GRPOConfig, {"hosts": hosts, "placement": {"trainer": "gpu"}})
    with pytest.raises(ValueError, match="there is no hosts: section"):
        build(GRPOConfig, {"placement": {"trainer": "gen"}})
    with pytest.raises(ValueError, match="trainer.hosts=2 needs placement.trainer"):
        build(GRPOConfig, {"hosts": hosts, "trainer": {"hosts": 2}})
    with pytest.raises(ValueError, match=r"divisible by trainer.procs \* trainer.hosts = 6"):
        build(GRPOConfig, {"hosts": hosts, "placement": {"trainer": "train"}, "trainer": {"procs": 3, "hosts": 2}})
    with pytest.raises(ValueError, match="trainer.hosts=2 but group 'train' has 1 host"):
        build(GRPOConfig, {"hosts": hosts, "placement": {"trainer": "train"}, "trainer": {"hosts": 2}})
    with pytest.raises(ValueError, match="hosts.groups.gen must be a number of hosts"):
        build(GRPOConfig, {"hosts": {"groups": {"gen": "two"}}})


def test_the_lease_finds_only_this_jobs_processes_under_the_worker():
    env = dict(os.environ, FORGE_JOB_ID="job-under-test")
    tagged = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert job_processes("job-under-test", os.getpid()) == [tagged.pid]
        assert job_processes("another-job", os.getpid()) == []
        assert job_processes("job-under-test", other.pid) == []  # not under that root
    finally:
        for p in (tagged, other):
            p.kill()
            p.wait()


def test_weight_stores_are_per_host_so_another_host_has_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_HOST", "train-0")
    trainer_store = WeightStore("run1", tmp_path)
    trainer_store.publish({"w": torch.ones(3)}, version=1)
    monkeypatch.setenv("FORGE_HOST", "gen-0")
    gen_store = WeightStore("run1", tmp_path)
    assert gen_store.find(1) is None  # another host: not visible, even on one machine
    monkeypatch.setenv("FORGE_HOST", "train-0")
    assert WeightStore("run1", tmp_path).find(1) is not None  # the same host sees it
    monkeypatch.delenv("FORGE_HOST")
    assert WeightStore("run1", tmp_path).find(1) is None  # a process outside the pool has its own
    trainer_store.close()


class _Endpoint:
    def __init__(self, fn, calls):
        self._fn, self._calls = fn, calls

    async def call_one(self, *args):
        self._calls.append(args)
        await asyncio.sleep(0.01)  # a message round trip: lets the other puller run
        return self._fn(*args)


class _Publisher:
    """The two endpoints ``fetch`` uses, served from a store in this process (no transport)."""

    def __init__(self, store):
        self.calls = []
        self.weights_size = _Endpoint(store.published_size, self.calls)
        self.weights_chunk = _Endpoint(store.read_bytes, self.calls)


async def test_one_pull_per_host_even_when_two_replicas_ask_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_HOST", "train-0")
    trainer_store = WeightStore("run2", tmp_path)
    weights = {"a": torch.randn(1000), "b": torch.arange(10.0)}
    trainer_store.publish(weights, version=3)
    monkeypatch.setenv("FORGE_HOST", "gen-0")
    replica_1, replica_2 = WeightStore("run2", tmp_path), WeightStore("run2", tmp_path)
    source = _Publisher(trainer_store)
    pulled = await asyncio.gather(replica_1.fetch(3, source, chunk_bytes=1024),
                                  replica_2.fetch(3, source, chunk_bytes=1024))
    size = trainer_store.published_size(3)
    assert sorted(pulled) == [0, size]  # one replica pulled, the other used its copy
    assert len(source.calls) == 1 + -(-size // 1024)  # one size query and one pull's chunks, not two
    loaded = replica_2.read(3)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    for store in (replica_1, replica_2, trainer_store):
        store.close()
    assert not list(tmp_path.iterdir())  # the pull lock file too


def test_a_pull_lock_left_by_a_killed_process_is_swept_but_a_held_one_is_not(tmp_path):
    import fcntl

    from forge.weights.store import sweep_stale_segments

    left = tmp_path / ".forge-w.run3@gen-0.fetch.lock"
    left.touch()
    held = tmp_path / ".forge-w.run4@gen-0.fetch.lock"
    with open(held, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert sweep_stale_segments(tmp_path) == [left]
        assert held.exists()


def test_the_reaper_kills_the_jobs_processes_once_the_client_is_gone():
    from forge.util.reaper import reap

    client = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                           env=dict(os.environ, FORGE_JOB_ID="reaped-job"), start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert reap(client.pid, "reaped-job", interval_s=0.05) == 1
        assert job.wait(5) == -9 and bystander.poll() is None
    finally:
        for p in (client, job, bystander):
            p.kill()
            p.wait()


def _hosts(*gpu_counts, dead=(), loads=None):
    from forge.controller.hosts.config import HostInfo
    from forge.controller.hosts.registry import _Host

    loads = loads or [0] * len(gpu_counts)
    return [_Host(HostInfo(f"g-{i}", "g", i, "h", "127.0.0.1", tuple(str(d) for d in range(n))), agent=None,
                  alive=i not in dead, placements=loads[i]) for i, n in enumerate(gpu_counts)]


def _request(hosts=1, procs=1, with_gpus=False):
    from forge.controller.hosts.config import HostRequest

    return HostRequest("g", hosts, procs, with_gpus, registry=None, mesh=None, failure_timeout_s=5)


def test_placement_takes_the_least_loaded_live_window_with_enough_free_gpus():
    from forge.controller.hosts.registry import HostRegistry

    def keys(window):
        return None if window is None else [h.info.key for h in window]

    choose = HostRegistry._choose
    assert keys(choose(_hosts(0, 0, 0, loads=[1, 0, 1]), _request())) == ["g-1"]
    assert keys(choose(_hosts(0, 0, 0, loads=[0, 0, 0], dead={0}), _request())) == ["g-1"]  # ties: first live
    assert keys(choose(_hosts(0, 0, 0, 0, loads=[0, 1, 1, 0]), _request(hosts=2))) == ["g-0", "g-1"]
    assert keys(choose(_hosts(0, 0, 0, dead={1}), _request(hosts=2))) is None  # no 2 live hosts in a row
    gpus = _hosts(2, 4, 4)
    gpus[1].gpus_in_use.update({"0", "1", "2"})
    assert keys(choose(gpus, _request(procs=2, with_gpus=True))) == ["g-0"]
    assert keys(choose(gpus, _request(procs=4, with_gpus=True))) == ["g-2"]
    assert keys(choose(gpus, _request(procs=8, with_gpus=True))) is None
