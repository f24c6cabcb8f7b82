"""Comparison report of finished runs; see attn_lm/compare.py (same as ``attn-lm-compare``).

    python scripts/compare.py multirun/compare_attention [more dirs...] [--out DIR] [--wandb]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attn_lm.compare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
