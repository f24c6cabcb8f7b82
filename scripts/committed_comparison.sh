#!/usr/bin/env bash
# The committed comparison, v2 (issues 5, 16): every quality mechanism (kernels of full excluded),
# RoPE, structural sizes at T/8, seeds 1,2,3; Tiny Shakespeare (char level) at contexts 256 and
# 2048 and WikiText-2 (word level) at 256 under an equal wall-clock budget, and associative recall
# (MQAR) over context x width; spread over the GPUs of the host (scripts/sweep_gpus.py: one process
# per GPU). Resumable: run it again after an interruption and only the missing runs train.
#
#   bash scripts/committed_comparison.sh DATA_ROOT RUNS_DIR [BUDGET=00:00:00:45] [GPUS=all] [SEEDS=1,2,3]
#   python scripts/compare.py RUNS_DIR/tinyshakespeare --out benchmarks/compare_tinyshakespeare
#   python scripts/compare.py RUNS_DIR/wikitext2 --out benchmarks/compare_wikitext2
#   python scripts/compare.py RUNS_DIR/recall --out benchmarks/compare_recall
#
# DATA_ROOT holds tinyshakespeare/input.txt and wikitext-2/wiki.{train,valid,test}.tokens (MQAR
# needs no data). Learned-position ablation rows: add model.position=rope,learned to a sweep.
set -euo pipefail
root=$1 runs=$2 budget=${3:-00:00:00:45} seeds=${5:-1,2,3}
gpus=()
[[ -n "${4:-}" ]] && gpus=(--gpus "$4")
here=$(dirname "$0")
common=(trainer.enable_progress_bar=false "seed=$seeds")
python "$here/sweep_gpus.py" "${gpus[@]}" -- experiment=compare_tinyshakespeare "data.root=$root" \
    data.block_size=256,2048 "budget.time=$budget" "${common[@]}" "hydra.sweep.dir=$runs/tinyshakespeare"
python "$here/sweep_gpus.py" "${gpus[@]}" -- experiment=compare_wikitext2 "data.root=$root" \
    "budget.time=$budget" "${common[@]}" "hydra.sweep.dir=$runs/wikitext2"
python "$here/sweep_gpus.py" "${gpus[@]}" -- experiment=compare_recall "${common[@]}" "hydra.sweep.dir=$runs/recall"
