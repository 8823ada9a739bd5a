#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, as one script for a lent device machine
# (see ../shared/device/README.md for staging the data there first). The device
# has torch but no MLflow/Hydra: Hydra and OmegaConf travel as plain packages in
# $DEVPY; runs go through scripts/bench_recipe.py (the project's pipeline, untracked).
set -uo pipefail
export PYTHONPATH="${DEVPY:-$HOME/devpy}:src"
export CIFAR10_ROOT="${CIFAR10_ROOT:-$HOME/cifar10}"
out="${OUT:-.bench}"; mkdir -p "$out"
nvidia-smi -L; python -c "import torch; print('torch', torch.__version__)"
bench() { python scripts/bench_recipe.py --out "$out/results.jsonl" "$@" 2>&1 | tee -a "$out/log.txt" | grep -v '^epoch'; }
bench "recipe=fast" --seeds 0 1 2
bench "recipe=fast_muon" --seeds 0 1 2
# The final fit (docs/workflow.md): the same recipes on all 50,000 images, last epoch taken.
bench "recipe=fast data.val_size=0" "recipe=fast_muon data.val_size=0" --seeds 0 1 2
# What is left of the call goes to the accuracy recipe.
timeout "${BEST_SECONDS:-330}" python scripts/bench_recipe.py --out "$out/results.jsonl" \
    "recipe=best train.epochs=${BEST_EPOCHS:-60}" --seeds 0 2>&1 | tee -a "$out/log.txt" | tail -4
tail -3 "$out/log.txt"
