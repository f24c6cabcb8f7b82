#!/usr/bin/env bash
# The training-speed guard of benchmarks/CHECKS.md, on one CUDA GPU. Exits non-zero when a check
# fails. Every ratio compares against a peer measured in this same run on the same card.
#
#   bash scripts/check_speed.sh step              # bare step: full vs the in-script nanoGPT reference
#   bash scripts/check_speed.sh loop NANOGPT_DIR  # python -m attn_lm.train vs nanoGPT's own train.py
#   bash scripts/check_speed.sh anchor NANOGPT_DIR  # experiment=nanogpt_shakespeare_char vs train.py's
#                                                 # published shakespeare_char run: loss and wall time
#
# NANOGPT_DIR is a copy of nanoGPT (train.py, model.py, configurator.py, config/, data/shakespeare_char/
# with input.txt); ATTN_LM_DATA_ROOT must hold tinyshakespeare/input.txt for loop and anchor.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: check_speed.sh step|loop|anchor [NANOGPT_DIR]}
case "$mode" in
  step)
    # GPT-2-small shape, vocab 50304: tokens/s >= 1.00x and peak memory <= 1.00x the reference.
    python3 scripts/bench_train.py --mechanisms full,sdpa --options sdpa.backend=flash --modes compiled \
      --nanogpt-baseline --min-ratio 1.0 --max-memory-ratio 1.0 ;;
  loop)
    # The whole Lightning loop at the GPT-2-small shape on character-level Tiny Shakespeare:
    # <= 3% over the bare compiled step of the same model, >= 1.00x nanoGPT train.py's tokens/s.
    python3 scripts/bench_train.py --mechanisms '' --loop --nanogpt-dir "${2:?NANOGPT_DIR}" \
      --max-loop-overhead 0.03 --min-loop-ratio 1.0 ;;
  anchor)
    dir=${2:?NANOGPT_DIR}
    [ -f "$dir/data/shakespeare_char/train.bin" ] || (cd "$dir/data/shakespeare_char" && python3 prepare.py >/dev/null)
    t0=$(date +%s.%N)
    (cd "$dir" && python3 train.py config/train_shakespeare_char.py --out_dir="$(mktemp -d)") > /tmp/nanogpt_char.log 2>&1
    t1=$(date +%s.%N)
    nanogpt_best=$(grep -oE "val loss [0-9.]+" /tmp/nanogpt_char.log | awk '{print $3}' | sort -g | head -1)
    run=$(mktemp -d)
    t2=$(date +%s.%N)
    python3 -m attn_lm.train experiment=nanogpt_shakespeare_char trainer=gpu test_after_training=false \
      trainer.enable_progress_bar=false hydra.run.dir="$run" > /tmp/attn_lm_char.log 2>&1
    t3=$(date +%s.%N)
    python3 - "$run/results.json" "$nanogpt_best" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, sys
results, nanogpt_best = json.load(open(sys.argv[1])), float(sys.argv[2])
t0, t1, t2, t3 = map(float, sys.argv[3:7])
nanogpt_s, ours_s = t1 - t0, t3 - t2
best = results["best_val_loss"]
print(f"nanoGPT train.py shakespeare_char: best val loss {nanogpt_best:.4f}, wall {nanogpt_s:.1f} s")
print(f"attn_lm experiment=nanogpt_shakespeare_char: best val loss {best:.4f}, wall {ours_s:.1f} s "
      f"({ours_s / nanogpt_s:.2f}x), {results['tokens_per_s']:,.0f} tokens/s, {results['step_ms']:.2f} ms/step")
# Where the process's wall time went: start-up (imports, config, data) is its time outside
# train(); the steps are every step at the measured step time; the rest is validation, checkpoints
# and the gaps between steps.
parts = {"start-up": ours_s - results["wall_time_s"], "kernel warm-up (compilation)": results["warmup_s"],
         "training steps": results["steps"] * results["step_ms"] / 1e3, "samples": results["sample_s"]}
parts["validation, checkpoints, rest"] = ours_s - sum(parts.values())
print("attn_lm wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
failed = [m for ok, m in ((best <= 1.47, f"best val loss {best:.4f} <= 1.47"),
                          (ours_s <= nanogpt_s, f"wall time {ours_s:.1f} s <= nanoGPT's {nanogpt_s:.1f} s")) if not ok]
for m in failed:
    print(f"- FAIL: {m}")
sys.exit(1 if failed else 0)
PY
    ;;
  *) echo "usage: check_speed.sh step|loop|anchor [NANOGPT_DIR]" >&2; exit 2 ;;
esac
