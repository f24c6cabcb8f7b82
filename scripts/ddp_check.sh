#!/usr/bin/env bash
# Same training on 1 GPU and on 2 GPUs with DDP, at the same global batch (issue 7): the loss
# curves must agree within bf16/sampling noise and DDP should give ~2x tokens/s.
#
#   bash scripts/ddp_check.sh OUT_DIR TINYSHAKESPEARE_ROOT [ONE_GPU=0] [TWO_GPUS=1,2] [extra overrides...]
#
# Both runs start together, each on its own GPU(s). Model: nanoGPT's shakespeare_char (6x384),
# context 256, global batch 256 windows (64k tokens per step), eager, bf16, 300 steps.
# Then: python scripts/compare.py OUT_DIR/one_gpu OUT_DIR/ddp2 --out OUT_DIR/report
set -euo pipefail
out=$1 root=$2 one=${3:-0} two=${4:-1,2}
shift $(( $# < 4 ? $# : 4 ))
common=(experiment=nanogpt_shakespeare_char "data.root=$root" compile=false trainer.max_steps=300
        trainer.val_check_interval=50 trainer.log_every_n_steps=10 trainer.enable_progress_bar=false
        test_after_training=false "$@")
CUDA_VISIBLE_DEVICES=$one python -m attn_lm.train "${common[@]}" trainer=gpu data.batch_size=256 \
    "hydra.run.dir=$out/one_gpu" > "$out.one_gpu.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$two python -m attn_lm.train "${common[@]}" trainer=ddp trainer.devices=2 data.batch_size=128 \
    "hydra.run.dir=$out/ddp2" > "$out.ddp2.log" 2>&1 &
status=0
for job in $(jobs -p); do wait "$job" || status=$?; done
tail -n 3 "$out.one_gpu.log" "$out.ddp2.log"
exit $status
