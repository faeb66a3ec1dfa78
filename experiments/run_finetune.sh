#!/usr/bin/env bash
# The full fine-tuning protocol (README "Where R-Drop helps"): four tasks with
# every weight trained, then the LoRA task. Resumable: arms already written
# under experiments/results/finetune/runs/ are skipped. Needs the env of
# experiments/README.md; JAX is the fastest backend on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" TF_CPP_MIN_LOG_LEVEL=2
python experiments/finetune_text.py "$@"
python experiments/finetune_text.py --tasks trec --lora-rank 8 --lr 5e-4 "$@"
