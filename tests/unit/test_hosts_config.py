"""Host pool configuration, placement bookkeeping and per-host weight stores (no processes spawned)."""

import asyncio
import os
import shlex
import subprocess
import sys

import pytest
import torch

from apps.grpo.config import GRPOConfig
from forge.controller import ForgeActor, HostsConfig
from forge.controller.hosts import Placement, job_processes, make_job
from forge.util.config import build
from forge.weights.store import WeightStore


K8S = {"namespace": "rl", "image": "registry.example/forge:1"}


@pytest.mark.parametrize("value,message", [
    ({"source": "mesos", "groups": {"a": 1}},
     r"hosts.source must be one of \['process_job', 'workers', 'slurm', 'ssh', 'kubernetes'\]"),
    ({"source": "process_job"}, "hosts.groups must name at least one host group"),
    ({"groups": {"a": 0}}, "hosts.groups.a must be a number of hosts >= 1, got 0"),
    ({"groups": {"1bad": 1}}, "group name '1bad' must be a letter"),
    ({"source": "workers", "groups": {"gen": 2}}, r"needs a list of worker addresses such as \['tcp://node1:26600'\]"),
    ({"groups": {"a": 1}, "lease_timeout_s": 16}, r"lease_timeout_s must be > failure_timeout_s \+ 2.0 s \(= 17.0"),
    ({"groups": {"a": 1}, "failure_timeout_s": 0}, "failure_timeout_s must be a positive number"),
    ({"groups": {"a": 1}, "slurm": {"partition": "gpu"}}, "hosts.slurm is only used with source 'slurm'"),
    ({"source": "slurm", "groups": {"a": 1}, "slurm": {"partiton": "gpu"}}, r"unknown SlurmJob option\(s\) \['partiton'\]"),
    ({"groups": {"a": 1}, "hostz": 1}, r"hosts: unknown field\(s\) \[.hostz.\]"),
    # ssh
    ({"source": "ssh", "groups": {"gen": 2}}, r"hosts.groups.gen: source 'ssh' needs a list of host names"),
    ({"source": "ssh", "groups": {"gen": ["root@127.0.0.1"]}}, "give the user as hosts.ssh.user"),
    ({"source": "ssh", "groups": {"gen": ["127.0.0.1:2222"]}}, "give the ssh port as hosts.ssh.port"),
    ({"source": "ssh", "groups": {"gen": ["127.0.0.1 -p 1"]}}, "is not a host name or address"),
    ({"source": "ssh", "groups": {"gen": ["127.0.0.1"], "train": ["127.0.0.1"]}},
     r"hosts.groups.train: host '127.0.0.1' is also in group 'gen'.*127.0.0.1 and 127.0.0.2"),
    ({"source": "ssh", "groups": {"gen": ["node1"]}}, r"hosts.transport: the workers on \['node1'\] must reach"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"usr": "me"}}, r"hosts.ssh: unknown field\(s\) \['usr'\]"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"port": 0}}, r"hosts.ssh.port must be a port number \(1-65535\), got 0"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"port": "22"}}, "hosts.ssh.port must be int"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"monarch_port": 70000}}, "hosts.ssh.monarch_port must be"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"user": "a b"}}, "hosts.ssh.user must be a user name"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"identity_file": "/no/such/key"}},
     "hosts.ssh.identity_file: no file '/no/such/key' on this machine"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"ssh_args": ["-v", 3]}}, r"hosts.ssh.ssh_args\[1\] must be str"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"cwd": "work"}}, "hosts.ssh.cwd must be an absolute path"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"env": {"FORGE_JOB_ID": "x"}}},
     "hosts.ssh.env.FORGE_JOB_ID is set by Forge"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"env": {"A-B": "x"}}}, "'A-B' is not an environment variable"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"env": {"A": [1]}}}, "hosts.ssh.env.A must be a string or a number"),
    ({"groups": {"a": 1}, "ssh": {"user": "me"}}, "hosts.ssh is only used with source 'ssh', not 'process_job'"),
    ({"source": "ssh", "groups": {"gen": ["node-"]}, "transport": "tcp"}, "'node-' is not a host name or address"),
    ({"source": "ssh", "groups": {"gen": ["a..b"]}, "transport": "tcp"}, "'a..b' is not a host name or address"),
    ({"source": "ssh", "groups": {"gen": ["localhost", "127.0.0.1"]}}, "'127.0.0.1' and 'localhost' are one address"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"port": 2222, "monarch_port": 2222}},
     "hosts.ssh.monarch_port 2222 is also hosts.ssh.port"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"ssh_args": ["-o", "A=b", "-n"]}},
     r"hosts.ssh.ssh_args: \['-n'\] would detach the worker from its ssh connection"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "ssh": {"env": {"HYPERACTOR_MESSAGE_DELIVERY_TIMEOUT": "1s"}}},
     "hosts.ssh.env.HYPERACTOR_MESSAGE_DELIVERY_TIMEOUT is set by Forge"),
    # kubernetes
    ({"source": "kubernetes", "groups": {"gen": ["a"]}, "kubernetes": K8S}, "hosts.groups.gen must be a number of hosts"),
    ({"source": "kubernetes", "groups": {"gen_a": 1}, "kubernetes": K8S},
     "group name 'gen_a' must be lowercase letters and digits, at most 47 characters, for source 'kubernetes'"),
    ({"source": "kubernetes", "groups": {"Gen": 1}, "kubernetes": K8S}, "group name 'Gen' must be lowercase"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {"image": "x"}},
     "hosts.kubernetes.namespace must name a Kubernetes namespace"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "namespace": "My_NS"}},
     "hosts.kubernetes.namespace must name a Kubernetes namespace .*got 'My_NS'"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {"namespace": "rl"}},
     "hosts.kubernetes.image must name the worker pods' container image"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "gpus_per_pod": -1}},
     "hosts.kubernetes.gpus_per_pod must be an int >= 0, got -1"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "resources": {"nvidia.com/gpu": 8}}},
     "give nvidia.com/gpu as hosts.kubernetes.gpus_per_pod"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "resources": {"memory": ""}}},
     "hosts.kubernetes.resources.memory must be a quantity such as 16 or '64Gi'"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "resources": {"cpu": "lots"}}},
     "hosts.kubernetes.resources.cpu must be a quantity such as 16 or '64Gi', got 'lots'"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "resources": {"cpu": float("inf")}}},
     "hosts.kubernetes.resources.cpu must be a quantity"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "resources": {1: 2}}},
     "hosts.kubernetes.resources: 1 is not a resource name"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "shared_memory_size": "big"}},
     "hosts.kubernetes.shared_memory_size must be a size such as '16Gi'"),
    ({"source": "kubernetes", "groups": {"g" * 48: 1}, "kubernetes": K8S}, "at most 47 characters"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "transport": "tcp://10.0.0.5:0", "kubernetes": K8S},
     "hosts.transport: Monarch's KubernetesJob sets the transport itself"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "kubeconfig": "/no/kubeconfig"}},
     "hosts.kubernetes.kubeconfig: no file"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "ready_timeout_s": 0}},
     "hosts.kubernetes.ready_timeout_s must be a positive number of seconds"),
    ({"source": "kubernetes", "groups": {"gen": 1}, "kubernetes": {**K8S, "imag": "x"}},
     r"hosts.kubernetes: unknown field\(s\) \['imag'\]"),
    ({"source": "ssh", "groups": {"gen": ["localhost"]}, "kubernetes": K8S},
     "hosts.kubernetes is only used with source 'kubernetes', not 'ssh'"),
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


def test_an_ssh_job_logs_in_with_the_options_given_and_starts_each_worker_with_the_jobs_environment(tmp_path):
    import monarch.config

    key = tmp_path / "id_ed25519"
    key.touch()
    config = HostsConfig.parse({
        "source": "ssh", "groups": {"gen": ["node1", "node2"], "train": ["node3"]}, "transport": "tcp",
        "ssh": {"user": "alice", "port": 2222, "identity_file": str(key), "ssh_args": ["-o", "ConnectTimeout=5"],
                "monarch_port": 23000, "cwd": "/srv/my forge", "env": {"HF_HOME": "/data/hf", "NOTE": "it's", "N": 4}},
    })
    before = monarch.config.get_global_config()["default_transport"]
    job = make_job(config, "abc123")
    assert monarch.config.get_global_config()["default_transport"] == before  # hosts.transport is init_hosts' to set
    assert job._meshes == {"gen": ["node1", "node2"], "train": ["node3"]}
    command = job.ssh_command("node2", "tcp://node2:23000")
    assert command[:-1] == ["ssh", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-l", "alice", "-p", "2222",
                            "-i", str(key), "node2"]
    assert shlex.split(command[-1]) == [
        "cd", "/srv/my forge", "&&", "exec", "env", "FORGE_HOST_ADDR=node2", "HF_HOME=/data/hf", "NOTE=it's", "N=4",
        "FORGE_JOB_ID=abc123", "HYPERACTOR_MESH_GET_PROC_STATE_MAX_IDLE=15s", "HYPERACTOR_MESSAGE_DELIVERY_TIMEOUT=15s",
        sys.executable, "-m", "forge.controller.worker", "--address", "tcp://node2:23000", "--stop-on-stdin-eof"]


def test_ssh_hosts_on_this_machine_need_no_transport_and_start_where_the_client_runs():
    config = HostsConfig.parse({"source": "ssh", "groups": {"gen": ["127.0.0.1"], "train": ["127.0.0.2"]}})
    job = make_job(config, "abc")
    assert shlex.split(job.remote_command("127.0.0.2", "x"))[:2] == ["cd", os.getcwd()]
    assert job.ssh_command("127.0.0.2", "x")[:4] == ["ssh", "-o", "BatchMode=yes", "127.0.0.2"]


K8S_CONFIG = {"source": "kubernetes", "groups": {"gen": 2, "train": 1},
              "kubernetes": {**K8S, "gpus_per_pod": 4, "resources": {"cpu": 16, "memory": "64Gi"},
                             "shared_memory_size": "16Gi"}}


def test_a_kubernetes_config_without_the_kubernetes_package_says_how_to_install_it(monkeypatch):
    config = HostsConfig.parse(K8S_CONFIG)  # checked without the package
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as where it is not installed (as here)
    for module in ("monarch.job.kubernetes", "monarch._src.job.kubernetes"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(RuntimeError, match=r"needs the Kubernetes Python client, which Forge does not install: "
                                           r"pip install 'torchmonarch\[kubernetes\]==0.7.0'"):
        make_job(config, "0123456789ab")


def test_a_kubernetes_config_becomes_one_monarch_mesh_per_group_named_for_the_job():
    pytest.importorskip("kubernetes", reason="the kubernetes package is not installed (Forge does not need it)")
    from monarch.config import configured
    from monarch.job.kubernetes import ImageSpec

    with configured():  # KubernetesJob switches this process's default transport to TCP; undo it for later tests
        job = make_job(HostsConfig.parse(K8S_CONFIG), "0123456789ab")
    assert job._namespace == "rl" and sorted(job._meshes) == ["gen0123456789ab", "train0123456789ab"]
    gen = job._meshes["gen0123456789ab"]
    assert gen["num_replicas"] == 2 and gen["provisioned"]
    assert gen["image_spec"] == ImageSpec("registry.example/forge:1", shared_memory_size="16Gi",
                                          resources={"cpu": 16, "memory": "64Gi", "nvidia.com/gpu": 4})
    assert gen["labels"] == {"app.kubernetes.io/managed-by": "forge", "forge-job-id": "0123456789ab"}


def test_a_master_address_other_hosts_cannot_reach_is_refused():
    from forge.controller.hosts.config import HostInfo
    from forge.controller.hosts.registry import unreachable_master

    def hosts(*addresses):
        return [HostInfo(f"g-{i}", "g", i, "h", a, ()) for i, a in enumerate(addresses)]

    assert unreachable_master("process_job", hosts("127.0.0.1", "127.0.0.1")) is None  # one machine
    assert unreachable_master("ssh", hosts("127.0.0.1", "127.0.0.2")) is None  # two names of this machine
    assert unreachable_master("workers", hosts("127.0.0.1")) is None  # a single host is its own master
    assert "set FORGE_HOST_ADDR" in unreachable_master("workers", hosts("127.0.0.1", "127.0.0.1"))
    assert "which hosts ['g-1'] of the same placement cannot reach" in unreachable_master(
        "ssh", hosts("127.0.0.1", "10.0.0.7"))
    assert unreachable_master("ssh", hosts("10.0.0.6", "10.0.0.7")) is None


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
