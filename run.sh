#!/usr/bin/env bash
# Quick start, command 1: set up .venv/ and run the main job — GRPO on the embedded
# default (a tiny Qwen3 learns single-digit addition by RL, every service in its own
# processes). Any arguments are config overrides, e.g. ./run.sh run.max_steps=50
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export MONARCH_FILE_LOG="${MONARCH_FILE_LOG:-error}"
exec .venv/bin/python -m apps.grpo.main "$@"
