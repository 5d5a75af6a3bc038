"""``ForgeSSHJob``: Monarch's ``SSHJob`` as a host pool of ``source: ssh`` runs it (see ``jobs.make_job``)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time

from monarch._src.job.job import LoginJob, ProcessState, SSHJob
from monarch._src.job.service_identity import service_proc_addr

from forge.controller.hosts.config import HOST_ADDR_ENV, SSHOptions

SSH_STOP_TIMEOUT_S = 10.0  # for the workers to stop once their stdin is closed


class ForgeSSHJob(SSHJob):
    """Monarch's ``SSHJob``, with what Forge needs of the hosts it starts.

    * Every worker starts in ``hosts.ssh.cwd`` (default: the client's directory) with the
      job's environment: ``FORGE_JOB_ID`` (the agent's lease and kills find the job's
      processes by it), Monarch's supervision settings, ``FORGE_HOST_ADDR`` (its host name,
      the ``MASTER_ADDR`` of ranks placed there) and ``hosts.ssh.env``. Monarch's ``SSHJob``
      passes no environment.
    * A worker is ``forge.controller.worker --stop-on-stdin-eof`` behind an ``ssh`` whose
      stdin this client holds. When the pool shuts down, or the client dies, that stdin
      closes and the worker kills the job's processes on its host and exits. Monarch's
      ``kill()`` only SIGKILLs the local ``ssh``, which leaves the remote worker running.
    * The constructor enables no transport (Monarch's enables TCP, which fails once this
      process has used another): ``hosts.transport`` sets it, as for the other sources.
    """

    def __init__(self, groups: dict[str, list[str]], options: SSHOptions, job_env: dict[str, str]) -> None:
        LoginJob.__init__(self)  # not SSHJob.__init__: see above
        # The interpreter at this client's path: Forge spawns the hosts' processes with it too.
        self._python_exe = sys.executable
        self._ssh_args = tuple(ssh_options(options))
        self._port = options.monarch_port
        self._transport = self._scheme = "tcp"
        self._service_proc_ids_by_host = {}
        self._cwd = options.cwd or os.getcwd()
        self._env = {**{k: str(v) for k, v in options.env.items()}, **job_env}
        self._ssh: dict[str, subprocess.Popen] = {}
        for group, hosts in groups.items():
            self.add_mesh(group, list(hosts))

    def remote_command(self, host: str, address: str) -> str:
        """The shell command line run on ``host``: its worker, listening on ``address``."""
        env = {HOST_ADDR_ENV: host, **self._env}
        return " ".join([
            "cd", shlex.quote(self._cwd), "&&", "exec", "env", *(shlex.quote(f"{k}={v}") for k, v in env.items()),
            shlex.quote(self._python_exe), "-m", "forge.controller.worker", "--address", shlex.quote(address),
            "--stop-on-stdin-eof",
        ])

    def ssh_command(self, host: str, address: str) -> list[str]:
        return ["ssh", *self._ssh_args, host, self.remote_command(host, address)]

    def _start_host(self, host: str) -> ProcessState:
        address = service_proc_addr(f"{self._scheme}://{host}:{self._port}", self._service_proc_ids_by_host[host])
        # Its own session, so a Ctrl-C at the terminal reaches the client only (which then shuts down).
        proc = subprocess.Popen(self.ssh_command(host, address), stdin=subprocess.PIPE, start_new_session=True)
        self._ssh[host] = proc
        return ProcessState(proc.pid, address)

    def exited(self) -> dict[str, int]:
        """Hosts whose ``ssh`` has ended, with its exit status (255: ssh itself failed)."""
        return {host: code for host, proc in self._ssh.items() if (code := proc.poll()) is not None}

    def _kill(self) -> None:
        """Close every worker's stdin (it then stops), wait for the ``ssh`` processes to end,
        and SIGKILL the ones that do not: their workers' stdin closes with the connection."""
        for proc in self._ssh.values():
            with contextlib.suppress(OSError):
                proc.stdin.close()
        deadline = time.monotonic() + SSH_STOP_TIMEOUT_S
        for proc in self._ssh.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._ssh.clear()
        self._host_to_pid.clear()


def ssh_options(options: SSHOptions) -> list[str]:
    """``ssh``'s arguments before the host. ``hosts.ssh.ssh_args`` come first: for ``-o``
    settings ssh takes the first value given, so the user's win over ``BatchMode``."""
    args = [*options.ssh_args, "-o", "BatchMode=yes"]  # never a password prompt: nobody would answer it
    if options.user is not None:
        args += ["-l", options.user]
    if options.port is not None:
        args += ["-p", str(options.port)]
    if options.identity_file is not None:
        args += ["-i", os.path.expanduser(options.identity_file)]
    return args
