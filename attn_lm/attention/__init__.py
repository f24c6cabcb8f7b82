"""Attention mechanisms, one module per family, all registered with :class:`AttentionFactory`.

Importing this package imports every family module, which registers its mechanisms.
"""
# Registration order = the order of AttentionFactory.names() (family by family, as in the README).
from . import softmax  # noqa: F401, I001  (full/mha/self, sdpa, flash, cross)
from . import flash_blockwise  # noqa: F401  (flash_v1, flash_v2)
from . import kernelized  # noqa: F401  (linear, performer, cosformer)
from . import lowrank  # noqa: F401  (linformer, nystrom)
from . import sparse  # noqa: F401  (local, block_sparse, strided, longformer, bigbird)
from . import shared_kv  # noqa: F401  (gqa, mqa)
from . import sink  # noqa: F401  (sink)
from . import diff  # noqa: F401  (diff)
from . import retention  # noqa: F401  (retention)
from . import mla  # noqa: F401  (mla)
from . import gla  # noqa: F401  (gla)
from . import deltanet  # noqa: F401  (deltanet)
from .base import Attention, SoftmaxAttention, iter_attention, reference_mode
from .factory import AttentionFactory, register
from .masks import MaskPattern

__all__ = ["Attention", "SoftmaxAttention", "AttentionFactory", "MaskPattern", "register", "reference_mode",
           "iter_attention"]
