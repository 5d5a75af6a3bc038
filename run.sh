#!/usr/bin/env bash
# Quick start, command 1: set up .venv/ and run the main demo.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export MONARCH_FILE_LOG="${MONARCH_FILE_LOG:-error}"
exec .venv/bin/python -m apps.service_demo "$@"
