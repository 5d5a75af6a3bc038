"""Shared test settings: quiet Monarch file logs; helpers live in tests/helpers.py."""

import os

# Child processes inherit this; keeps /tmp/$USER/monarch_log.log small during the suite.
os.environ.setdefault("MONARCH_FILE_LOG", "error")
