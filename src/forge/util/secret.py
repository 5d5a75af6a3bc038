"""The run's secret: what the processes of one client share and other local users do not.

Names derived from it (weight-store files in ``/dev/shm``) cannot be guessed by another
user of the machine. The client draws it once; every process Forge spawns gets it in
``$FORGE_WEIGHT_STORE_SECRET`` (see ``provisioner.spawn_proc_mesh``). Torch-free, so a
service controller can pass it on without importing torch.
"""

from __future__ import annotations

import os
import secrets

SECRET_ENV = "FORGE_WEIGHT_STORE_SECRET"
_process_secret: str | None = None  # drawn on first use when the variable is unset


def run_secret() -> str:
    """``$FORGE_WEIGHT_STORE_SECRET``, else a secret drawn once for this process."""
    global _process_secret
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    if _process_secret is None:
        _process_secret = secrets.token_hex(16)
    return _process_secret
