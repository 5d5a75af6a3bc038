#!/usr/bin/env bash
# Quick start, command 2: set up .venv/ and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export MONARCH_FILE_LOG="${MONARCH_FILE_LOG:-error}"
exec .venv/bin/python -m pytest tests "$@"
