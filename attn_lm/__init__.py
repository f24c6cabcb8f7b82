"""attn_lm: a small GPT whose attention mechanism is chosen per layer, trained with Lightning and
configured with Hydra, for comparing attention mechanisms (perplexity vs speed vs memory)."""
from .attention import AttentionFactory
from .config import AttentionConfig, AttentionDims, GPTConfig
from .model import GPT, MLP, TransformerBlock
from .profiler import AttentionProfiler
from .selector import AttentionSelector

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "AttentionConfig", "AttentionDims", "AttentionFactory", "TransformerBlock", "MLP",
           "AttentionProfiler", "AttentionSelector", "__version__"]
