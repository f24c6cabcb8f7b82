#!/usr/bin/env bash
# The committed comparison (issue 5): every mechanism, equal wall-clock budget, Tiny Shakespeare
# (char level) at contexts 256 and 2048 and WikiText-2 (word level) at 256, spread over the GPUs
# of the host (scripts/sweep_gpus.py: one process per GPU). Resumable: run it again after an
# interruption and only the missing runs train.
#
#   bash scripts/committed_comparison.sh DATA_ROOT RUNS_DIR [BUDGET=00:00:00:45] [GPUS=all]
#   python scripts/compare.py RUNS_DIR/tinyshakespeare --out benchmarks/compare_tinyshakespeare
#   python scripts/compare.py RUNS_DIR/wikitext2 --out benchmarks/compare_wikitext2
#
# DATA_ROOT holds tinyshakespeare/input.txt and wikitext-2/wiki.{train,valid,test}.tokens.
set -euo pipefail
root=$1 runs=$2 budget=${3:-00:00:00:45}
gpus=()
[[ -n "${4:-}" ]] && gpus=(--gpus "$4")
here=$(dirname "$0")
common=("budget.time=$budget" trainer.enable_progress_bar=false)
python "$here/sweep_gpus.py" "${gpus[@]}" -- experiment=compare_tinyshakespeare "data.root=$root" \
    data.block_size=256,2048 "${common[@]}" "hydra.sweep.dir=$runs/tinyshakespeare"
python "$here/sweep_gpus.py" "${gpus[@]}" -- experiment=compare_wikitext2 "data.root=$root" \
    "${common[@]}" "hydra.sweep.dir=$runs/wikitext2"
