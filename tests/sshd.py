"""An OpenSSH server on loopback for the tests of ``hosts.source: ssh``.

``loopback_sshd(directory)`` installs the server if it is missing (as root, with apt-get:
Debian's ``openssh-server``), starts ``sshd`` on a free port of 127.0.0.1 and 127.0.0.2
with throwaway host and client keys, and stops it afterwards; where that cannot be done
the test is skipped, saying why. On a machine whose init system starts services, the
package's install also enables the distribution's own sshd (port 22); in a container
(``policy-rc.d``) it does not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from forge.util.procs import descendants

HOSTS = ("127.0.0.1", "127.0.0.2")  # all of 127/8 is loopback on Linux: two names of this machine
PRIVSEP_DIR = Path("/run/sshd")  # sshd, as root, refuses to start without it
INSTALL_TIMEOUT_S = 120  # within the first test's timeout


@dataclass(frozen=True)
class LoopbackSSH:
    pid: int
    port: int
    key: Path
    known_hosts: Path

    def ssh_args(self) -> list[str]:
        """Its host key goes to a known_hosts file of the test's own."""
        return ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=accept-new"]

    def options(self, **more) -> dict:
        """A ``hosts.ssh`` section that logs in to this server."""
        return {"port": self.port, "identity_file": str(self.key), "ssh_args": self.ssh_args(), **more}


def _tail(text: str) -> str:
    return " ".join(text.strip().splitlines()[-3:])[-400:]


def _install() -> None:
    """Debian's openssh-server (which brings the client), or a skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("no OpenSSH server here (sshd, ssh, ssh-keygen), and installing one needs root: "
                    "apt-get install openssh-server")
    if shutil.which("apt-get") is None:
        pytest.skip("no OpenSSH server here (sshd, ssh, ssh-keygen), and no apt-get to install one")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"]
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    for command in (install, ["apt-get", "update"], install):  # the package lists may be empty
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing openssh-server with apt-get took over {INSTALL_TIMEOUT_S} s")
        if command is install and result.returncode == 0:
            return
    pytest.skip(f"could not install openssh-server with apt-get: {_tail(result.stderr)}")


def _sshd() -> str:
    if not all(shutil.which(tool) for tool in ("ssh", "ssh-keygen")) or not _find_sshd():
        _install()
    found = _find_sshd()
    if found is None:
        pytest.skip("openssh-server was installed, but there is no sshd in /usr/sbin or on PATH")
    return found


def _find_sshd() -> str | None:
    found = shutil.which("sshd") or "/usr/sbin/sshd"  # sbin is not on every PATH
    return found if os.access(found, os.X_OK) else None


def free_port() -> int:
    """A port free on every loopback address."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    for host in HOSTS:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) != 0:
                return False
    return True


@contextlib.contextmanager
def loopback_sshd(directory: Path) -> Iterator[LoopbackSSH]:
    sshd = _sshd()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    port = free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {host}" for host in HOSTS),
        f"HostKey {directory / 'host_key'}", f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "UsePAM no", "StrictModes no",  # a throwaway server: keys in a temp directory
    ]) + "\n")
    made_privsep_dir = os.geteuid() == 0 and not PRIVSEP_DIR.exists()
    if made_privsep_dir:
        PRIVSEP_DIR.mkdir(mode=0o755)
    log = directory / "sshd.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not start on {list(HOSTS)} port {port}: {_tail(log.read_text())}")
            time.sleep(0.1)
        running = LoopbackSSH(server.pid, port, directory / "client_key", directory / "known_hosts")
        for host in HOSTS:  # e.g. a server started without root may let nobody in
            login = subprocess.run(["ssh", *running.ssh_args(), "-o", "BatchMode=yes", "-p", str(port),
                                    "-i", str(running.key), host, "true"], capture_output=True, text=True, timeout=30)
            if login.returncode != 0:
                pytest.skip(f"cannot log in to the test's sshd at {host}: {_tail(login.stderr)} "
                            f"(sshd: {_tail(log.read_text())})")
        yield running
    finally:
        for pid in descendants(server.pid):  # none, unless a test left a connection open
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if made_privsep_dir:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
