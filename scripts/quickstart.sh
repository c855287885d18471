#!/usr/bin/env bash
# Set up ./.venv if needed, then train the quickstart recipe (long-tailed digits, LossReweighting, TensorBoard logs
# in ./runs) with Lightning's progress bar; it ends with the final validation metrics and a one-line weight summary
# (mean / max / min weight and effective sample size of the weights each sample last got).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "Training recipes/quickstart.yaml (80 steps; about a minute on 2 CPU cores) ..."
.venv/bin/lightning-reweight fit --config recipes/quickstart.yaml "$@"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs"
