#!/usr/bin/env bash
# GPU smoke test of imm-ray on one CUDA GPU: a short DeepSpeed ZeRO-3 bf16 SFT of a small random Qwen2 through
# Ray Train (actors/training.py), an IMM merge (actors/merging.py) and a held-out loss check; prints a summary
# and exits non-zero on any failure. Needs torch with CUDA and the project's dependencies; downloads nothing.
#
#   scripts/gpu_smoke.sh                 # one GPU
#   scripts/gpu_smoke.sh --out smoke/    # keep the work folder (models, summary.json)
#   scripts/gpu_smoke.sh --cpu           # the same path on the CPU (gloo, fp32), to check the script itself
#   scripts/gpu_smoke.sh --bare          # torch + transformers + safetensors only: no Ray, vLLM or DeepSpeed
#                                        # (chosen by itself where Ray or DeepSpeed is not installed)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1

if [[ " $* " != *" --cpu "* ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
if [[ " $* " != *" --bare "* ]] && ! "$PYTHON" -c "import ray, deepspeed" 2>/dev/null; then
  echo "Ray or DeepSpeed is not installed: running the bare path (torch, transformers, safetensors)"
  set -- --bare "$@"
fi
# A hung collective must not hang the check: 10 minutes at most (exit 124).
exec timeout 600 "$PYTHON" scripts/gpu_smoke.py "$@"
