"""Data layer of attn_lm: corpora, tokenizers, the token cache and the Lightning data module.

Typical use (what Hydra does with ``conf/data/<preset>.yaml``)::

    from attn_lm.data import LMDataModule

    dm = LMDataModule(source="tinyshakespeare", tokenizer="char", block_size=256, root="/data")
    dm.prepare_data(); dm.setup()
    model = GPT(GPTConfig(vocab_size=dm.vocab_size, context_len=dm.block_size, ...))
    ...
    dm.extra_metrics("validation", mean_val_loss)   # {"bits_per_<dm.unit>": ...}, e.g. bits_per_byte

Modules: :mod:`~attn_lm.data.sources` (text of each split), :mod:`~attn_lm.data.tokenizers`,
:mod:`~attn_lm.data.token_store` (tokenize once, memory-map afterwards), :mod:`~attn_lm.data.windows`
(training and evaluation windows) and :mod:`~attn_lm.data.datamodule`; :mod:`~attn_lm.data.sharded`
tokenizes ``hub`` datasets bigger than memory into shard memmaps (``sharded=True``).
"""

from .token_store import ShardedTokenArray, TokenArray
from .datamodule import LMDataModule
from .mqar import MQARDataModule
from .sharded import ShardingOptions, open_or_build_sharded
from .sources import SOURCES, Corpus, load_corpus
from .tokenizers import TOKENIZERS, Tokenizer, build_tokenizer, load_tokenizer
from .windows import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "TOKENIZERS",
    "Corpus",
    "LMDataModule",
    "MQARDataModule",
    "ShardedTokenArray",
    "ShardingOptions",
    "TokenArray",
    "Tokenizer",
    "build_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "open_or_build_sharded",
]
