"""The Monarch job behind each host source (``make_job``).

Monarch's job classes are imported when a job is made: every process Forge spawns imports
this package, and ``monarch._src.job`` alone costs about 0.3 s of CPU.
"""

from __future__ import annotations

import importlib.metadata
import math
import shutil
from pathlib import Path
from typing import Any

from forge.controller.hosts.config import GPU_RESOURCE, HostsConfig, supervision_env
from forge.util.reaper import JOB_ID_ENV

K8S_JOB_LABEL = "forge-job-id"  # on a pool's MonarchMesh resources: kubectl delete monarchmesh -l forge-job-id=<id>


def make_job(config: HostsConfig, job_id: str, tmpdir: Path | None = None) -> Any:
    """The Monarch job of a ``process_job``, ``slurm``, ``ssh`` or ``kubernetes`` config (not started yet).

    ``tmpdir`` becomes a ``process_job``'s workers' ``TMPDIR``: each worker binds its
    processes' sockets in a directory there, which a killed worker would leave behind.
    """
    from monarch.job import ProcessJob, SlurmJob

    env = {JOB_ID_ENV: job_id, **supervision_env(config.failure_timeout_s)}
    if config.source == "process_job":
        return ProcessJob(config.host_counts(), env={**env, "TMPDIR": str(tmpdir)} if tmpdir else env)
    if config.source == "slurm":
        return SlurmJob(meshes=config.host_counts(), **config.slurm)
    if config.source == "ssh":
        if shutil.which("ssh") is None:
            raise RuntimeError("hosts.source 'ssh' needs an ssh client on this machine (e.g. apt-get install "
                               "openssh-client)")
        from forge.controller.hosts.ssh_job import ForgeSSHJob

        return ForgeSSHJob(config.groups, config.ssh, env)
    if config.source == "kubernetes":
        return _kubernetes_job(config, job_id)
    raise ValueError(f"source {config.source!r} has no Monarch job")


def mesh_name(config: HostsConfig, group: str, job_id: str) -> str:
    """A group's mesh in its Monarch job: on Kubernetes ``<group><job id>``, the name of its
    MonarchMesh resource, so that two jobs in one namespace never share (and patch) one;
    else the group's name."""
    return f"{group}{job_id}" if config.source == "kubernetes" else group


def _kubernetes_job(config: HostsConfig, job_id: str) -> Any:
    """Monarch's ``KubernetesJob``: a MonarchMesh resource per group, provisioned by the Monarch operator."""
    try:
        from monarch.job.kubernetes import ImageSpec, KubeConfig, KubernetesJob
    except (ImportError, RuntimeError) as e:  # Monarch raises RuntimeError when `kubernetes` is missing
        version = importlib.metadata.version("torchmonarch")
        raise RuntimeError(
            "hosts.source 'kubernetes' needs the Kubernetes Python client, which Forge does not install: "
            f"pip install 'torchmonarch[kubernetes]=={version}' ({e})"
        ) from None
    k8s = config.kubernetes
    resources = {**k8s.resources, **({GPU_RESOURCE: k8s.gpus_per_pod} if k8s.gpus_per_pod else {})}
    image = ImageSpec(k8s.image, resources=resources or None, shared_memory_size=k8s.shared_memory_size)
    job = KubernetesJob(k8s.namespace, timeout=math.ceil(k8s.ready_timeout_s),
                        kubeconfig=KubeConfig.from_path(k8s.kubeconfig) if k8s.kubeconfig else None)
    labels = {"app.kubernetes.io/managed-by": "forge", K8S_JOB_LABEL: job_id}  # to find what a dead client left
    for group, pods in config.host_counts().items():
        job.add_mesh(mesh_name(config, group, job_id), pods, image_spec=image, labels=labels)
    return job
