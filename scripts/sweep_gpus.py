"""Spread a comparison multirun over the GPUs of a host; see attn_lm/gpu_sweep.py (same as
``attn-lm-sweep-gpus``).

    python scripts/sweep_gpus.py --gpus 0,1,2,3 -- experiment=compare_tinyshakespeare data.block_size=256,2048
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attn_lm.gpu_sweep import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
