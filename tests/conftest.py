"""Shared test settings: quiet Monarch file logs, and a private cache for model presets."""

import os
import tempfile

# Child processes inherit both. The preset cache lives under a per-run temp directory
# so tests never read or write the user's ~/.cache/forge.
os.environ.setdefault("MONARCH_FILE_LOG", "error")
os.environ.setdefault("FORGE_CACHE_DIR", tempfile.mkdtemp(prefix="forge-test-cache-"))
