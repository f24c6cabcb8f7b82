#!/usr/bin/env bash
# The committed comparison, v2 (issues 5, 16): every quality mechanism (kernels of full excluded),
# RoPE, structural sizes at T/8, seeds 1,2,3; Tiny Shakespeare (char level) at contexts 256 and
# 2048 and WikiText-2 (word level) at 256 under an equal wall-clock budget, one run per GPU; and
# associative recall (MQAR) over context x width, small step-budget runs packed PER_GPU to a GPU
# (scripts/sweep_gpus.py). Resumable: run it again after an interruption and only the missing runs
# train; each process finishes a cell's seeds before the next cell.
#
#   bash scripts/committed_comparison.sh DATA_ROOT RUNS_DIR [BUDGET=00:00:00:45] [GPUS=all] [SEEDS=1,2,3]
#   PLAN=1 bash scripts/committed_comparison.sh ...   # start nothing: cells done and the minutes left
#   python scripts/compare.py RUNS_DIR/tinyshakespeare --out benchmarks/compare_tinyshakespeare
#   python scripts/compare.py RUNS_DIR/wikitext2 --out benchmarks/compare_wikitext2
#   python scripts/compare.py RUNS_DIR/recall --out benchmarks/compare_recall
#
# DATA_ROOT holds tinyshakespeare/input.txt and wikitext-2/wiki.{train,valid,test}.tokens (MQAR
# needs no data); give the same DATA_ROOT (it is part of each run's config) in every session, or
# the finished runs are not recognised. PER_GPU (default 4): MQAR processes per GPU. Learned-position
# ablation rows: add model.position=rope,learned to a sweep.
set -euo pipefail
root=$1 runs=$2 budget=${3:-00:00:00:45} seeds=${5:-1,2,3}
here=$(dirname "$0")
sweep=(python "$here/sweep_gpus.py" ${4:+--gpus "$4"} ${PLAN:+--plan})
common=(trainer.enable_progress_bar=false "seed=$seeds")
"${sweep[@]}" -- experiment=compare_tinyshakespeare "data.root=$root" data.block_size=256,2048 \
    "budget.time=$budget" "${common[@]}" "hydra.sweep.dir=$runs/tinyshakespeare"
"${sweep[@]}" -- experiment=compare_wikitext2 "data.root=$root" "budget.time=$budget" "${common[@]}" \
    "hydra.sweep.dir=$runs/wikitext2"
"${sweep[@]}" --per-gpu "${PER_GPU:-4}" -- experiment=compare_recall "${common[@]}" "hydra.sweep.dir=$runs/recall"
