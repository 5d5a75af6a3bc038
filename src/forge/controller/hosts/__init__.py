"""Hosts: where Forge's processes run when one machine is not enough.

A *host pool* is a set of named host groups, each a Monarch ``HostMesh``. Where the
hosts come from (``HostsConfig.source``):

* ``process_job`` — Monarch's ``ProcessJob``: every host is a worker process on this
  machine (tests, trying a multi-host layout out). Forge starts and stops the workers.
* ``workers`` — worker processes the user started on each machine with
  ``python -m forge.controller.worker --address tcp://0.0.0.0:26600``; ``groups`` lists
  their addresses. Forge attaches to them and leaves them running after the job.
* ``slurm`` — Monarch's ``SlurmJob``: one allocation with a node count per group,
  configured by ``HostsConfig.slurm`` (``partition``, ``time_limit``, ``gpus_per_node``...).
* ``ssh`` — Monarch's ``SSHJob`` (``jobs.ForgeSSHJob``): ``groups`` lists machines; Forge
  starts a worker on each over ``ssh`` (``HostsConfig.ssh``: user, port, key...), which
  ends with that connection — at shutdown, or when the client dies.
* ``kubernetes`` — Monarch's ``KubernetesJob``: a MonarchMesh resource per group (pods
  of ``HostsConfig.kubernetes.image``), made by the Monarch operator; deleted at shutdown.

Without a pool every process runs on this host, as before. With one,
``Cls.options(hosts=N, host_group="gen")`` puts each replica (or the actor) on ``N``
hosts of group ``gen`` with ``procs`` processes on each.

Three kinds of Forge processes make it work:

* a ``HostAgent`` on every host (a small process without torch): reports the host's
  address and GPUs, picks free ports there, kills processes on request, and holds a
  *lease* — when the client has not been heard from for ``lease_timeout_s`` (client
  killed, machine lost), it kills every process of this job on its host, including a
  worker Forge started itself, so nothing is left running anywhere.
* one ``HostRegistry`` next to the client (its own process, so it dies with the client
  and the leases then run out): it owns the agents, heartbeats them every second,
  marks a host dead when its agent is silent for ``failure_timeout_s``, and places
  replicas — least-loaded live hosts first, GPUs allocated per host — for every
  service and actor of the pool.
* the service controllers (``forge.controller.service.controller``), which ask the
  registry where to build a replica, and where to rebuild it when its host died.
"""

from forge.controller.hosts.agent import job_processes
from forge.controller.hosts.config import (
    HostInfo,
    HostRequest,
    HostsConfig,
    HostStatus,
    Placement,
    supervision_env,
)
from forge.controller.hosts.jobs import make_job
from forge.controller.hosts.pool import HostPool, current_pool, init_hosts, shutdown_hosts
from forge.controller.hosts.registry import (
    place,
    placement_alive,
    release_placement,
    spawn_placed,
    wait_for_returns,
)

__all__ = [
    "HostsConfig", "HostInfo", "HostStatus", "HostPool", "HostRequest", "Placement",
    "init_hosts", "shutdown_hosts", "current_pool",
    # for the spawning and service layers (forge.controller.spawn, .service.controller)
    "place", "placement_alive", "release_placement", "spawn_placed", "wait_for_returns", "supervision_env",
    "job_processes", "make_job",
]
