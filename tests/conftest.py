"""Shared test settings: quiet Monarch file logs, and a private cache for model presets.

The test process is a Forge client like any other: Forge's fault hook (a dead child must
never end the process) is installed before the first test, it has a private ``TMPDIR``
(everything Monarch and the tests write there goes when the session ends, and what a
killed test client leaves is swept by the next run), and the preset cache, a directory
of this run only, is removed when the session ends.
"""

import os
import shutil
import tempfile

from forge.controller.provisioner import ensure_runtime
from forge.util.tmpdirs import private_tmpdir

private_tmpdir()

# Child processes inherit both. The preset cache lives under a per-run temp directory
# so tests never read or write the user's ~/.cache/forge.
os.environ.setdefault("MONARCH_FILE_LOG", "error")
_OWN_CACHE = "FORGE_CACHE_DIR" not in os.environ
os.environ.setdefault("FORGE_CACHE_DIR", tempfile.mkdtemp(prefix="forge-test-cache-"))


def pytest_configure(config):
    ensure_runtime()


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["FORGE_CACHE_DIR"], ignore_errors=True)
