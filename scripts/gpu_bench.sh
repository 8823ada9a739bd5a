#!/usr/bin/env bash
# The GPU measurements of issue 17 (BENCHMARKS.md), as one device call of at most 10
# minutes. Here, first:
#   bash ../shared/device/stage-cifar.sh     # the data, in three pieces (.device-data/p1..p3)
#   bash scripts/stage_wheels.sh             # Hydra, OmegaConf, Albumentations (.device-data/wheels)
#   bash scripts/gpu_bench.sh --dry-run      # every run below, on this CPU, on tiny random data
# then four device calls back to back (the machine goes back after ~30 s idle):
#   carry [".device-data/p1"]  bash .device-data/p1/unpack.sh
#   carry [".device-data/p2"]  bash .device-data/p2/unpack.sh
#   carry [".device-data/p3", ".device-data/wheels"]
#         bash .device-data/p3/unpack.sh && bash scripts/gpu_bench.sh   (timeout_s 600)
# and commit $OUT/results.jsonl as benchmarks/gpu-<device>-<date>.jsonl.
#
# The runs, in priority order, each stopped after the epoch that passes its cap (the line
# then says "partial": true and the fraction of the schedule that ran), and none started
# with under 30 s of BUDGET_SECONDS left:
#   1. the recipe=best candidates, one seed a session (seeds accumulate across sessions:
#      SEED=1 next time);
#   2. recipe=seed's own 200-epoch schedule, as much of it as fits;
#   3. time to 94% with TTA, 3 seeds: recipe=fast and fast_muon as final fits, and
#      recipe=airbench94_muon (airbench94_muon's published recipe, whose GPU time is
#      known, through this pipeline: the side-by-side of issues 16 and 17).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") dry="" ;;
    --dry-run) dry="--dry-run" ;;
    *) echo "usage: scripts/gpu_bench.sh [--dry-run]   (got: $*)" >&2; exit 2 ;;
esac
out="${OUT:-.bench}"
mkdir -p "$out"
budget="${BUDGET_SECONDS:-540}"
seed="${SEED:-0}"
export NO_ALBUMENTATIONS_UPDATE=1
if [[ -z "$dry" ]]; then
    export CIFAR10_ROOT="${CIFAR10_ROOT:-$HOME/cifar10}"
    devpy="${DEVPY:-$HOME/devpy}"
    if [[ -d .device-data/wheels && ! -d "$devpy/hydra" ]]; then
        python3 -m pip install -q --no-index --no-deps --target "$devpy" .device-data/wheels/*.whl
    fi
    export PYTHONPATH="$devpy${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi -L
fi
# Here the project's venv; on the device, the python3 that holds torch.
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
"$python" -c "import torch; print('torch', torch.__version__)" || exit 1
failed=0

# bench CAP_SECONDS BENCH_RECIPE_ARGS...: one bench_recipe call, each run capped at CAP.
bench() {
    local cap=$1 left=$((budget - SECONDS))
    shift
    if ((left < 30)); then
        echo "skipped, ${left}s of the budget left: $*" | tee -a "$out/log.txt"
        return
    fi
    ((cap > left)) && cap=$left
    timeout "$left" "$python" scripts/bench_recipe.py $dry --out "$out/results.jsonl" \
        --time-limit "$cap" "$@" 2>&1 | tee -a "$out/log.txt" | grep -v '^epoch'
    (("${PIPESTATUS[0]}" == 0)) || { failed=1; echo "FAILED: $*" | tee -a "$out/log.txt"; }
}

bench 180 "recipe=best_airbench96" --seeds "$seed"
bench 180 "recipe=best_airbench96_sam" --seeds "$seed"
# A dry run caps this one at 0 s, so the partial path is checked too.
bench "$([[ -n "$dry" ]] && echo 0 || echo 120)" "recipe=seed" --seeds "$seed"
bench 60 "recipe=fast data.val_size=0" "recipe=fast_muon data.val_size=0" \
    "recipe=airbench94_muon data.val_size=0" --seeds 0 1 2
echo "done in ${SECONDS}s; results: $out/results.jsonl"
exit "$failed"
