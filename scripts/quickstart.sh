#!/usr/bin/env bash
# Set up ./.venv if needed, then train the quickstart recipe (long-tailed digits, LossReweighting, TensorBoard logs in ./runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/lightning-reweight fit --config recipes/quickstart.yaml --trainer.enable_progress_bar=false "$@"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs"
