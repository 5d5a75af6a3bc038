#!/usr/bin/env bash
# GPU smoke run: 20 GRPO steps of a Qwen3-1.7B-sized random model (apps/grpo/gpu_smoke.yaml)
# with vLLM generating, then a table of generation tokens/s, trainer step time and
# weight-sync time from the run's metrics.jsonl. Extra arguments are config overrides
# (key=value, as apps.grpo.main takes them).
#
# Needs one NVIDIA GPU: the policy (vLLM), the trainer and the reference model share it
# (FORGE_SHARE_GPUS=1).
# Downloads nothing but what scripts/setup.sh installs and the optional vLLM extra.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
config="apps/grpo/gpu_smoke.yaml"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_smoke: nvidia-smi not found; this smoke run needs NVIDIA GPUs with CUDA" >&2
  exit 2
fi
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # Forge hands out exactly these (forge.controller.provisioner)
  gpus="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -cvE '^[[:space:]]*(-1)?[[:space:]]*$' || true)"
else
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
if [ "$gpus" -eq 0 ]; then
  echo "gpu_smoke: no CUDA device visible (nvidia-smi -L lists none, or CUDA_VISIBLE_DEVICES hides them)" >&2
  exit 2
fi

./scripts/setup.sh
want_vllm="$(sed -n 's/^vllm = \["vllm==\([^"]*\)"\]/\1/p' pyproject.toml)"
have_vllm="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null || true)"
if [ "$have_vllm" != "$want_vllm" ]; then
  echo "gpu_smoke: installing vllm==$want_vllm (the optional [vllm] extra) into .venv"
  .venv/bin/python -m pip install --quiet -e '.[vllm]'
fi

# Nothing else leaves the machine: the model is a local preset, vLLM's usage report is off.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export FORGE_SHARE_GPUS=1  # every part on the one GPU
# Build the preset once, before three parts would each build it at spawn (~3.4 GB of bf16 weights).
.venv/bin/python -c "from forge.models import materialize; print('model:', materialize('qwen3-1.7b-shape'))"
output_dir="runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)"
status=0
.venv/bin/python -m apps.grpo.main --config "$config" run.max_steps=20 "run.output_dir=$output_dir" "$@" \
  || status=$?

metrics="$(find "$output_dir" -mindepth 2 -maxdepth 2 -name metrics.jsonl 2>/dev/null || true)"
metrics="${metrics%%$'\n'*}"  # the run directory is the only one under output_dir
if [ -z "$metrics" ]; then
  echo "gpu_smoke: the run wrote no metrics.jsonl under $output_dir (exit status $status)" >&2
  exit $(( status ? status : 1 ))
fi
.venv/bin/python - "$metrics" <<'EOF'
import json
import statistics
import sys

KEYS = [("generate/tokens_per_s", "generation tokens/s"), ("trainer/step_time_s", "trainer step s"),
        ("time/weight_sync_s", "weight sync s"), ("time/step_s", "whole step s")]


def cell(value):
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"


with open(sys.argv[1]) as f:
    records = [json.loads(line) for line in f if line.strip()]
print(f"\n{sys.argv[1]}: {len(records)} steps (step 1 includes warm-up, so it is shown apart)")
print(f"{'metric':<22}{'step 1':>10}{'median':>10}{'mean':>10}{'min':>10}{'max':>10}")
for key, label in KEYS:
    values = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    first = next((v for step, v in values if step == 1), None)
    rest = [v for step, v in values if step != 1]
    cells = [first] + ([statistics.median(rest), statistics.fmean(rest), min(rest), max(rest)] if rest else [None] * 4)
    print(f"{label:<22}" + "".join(f"{cell(v):>10}" for v in cells))
EOF
exit "$status"
