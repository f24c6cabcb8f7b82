"""The GPT language model: token embedding, an optional absolute position embedding, a stack of
pre-norm :class:`TransformerBlock` s (each with its own attention mechanism), a final LayerNorm
and a weight-tied LM head (Radford et al., 2019, GPT-2; structure after nanoGPT).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionFactory
from .cache import LayerCache
from .config import AttentionConfig, AttentionDims, GPTConfig
from .positions import LearnedPositionalEmbedding, SinusoidalPositionalEmbedding
from .decoding import Decoder
from .loss import linear_cross_entropy


class MLP(nn.Module):
    """Position-wise feed-forward: ``GELU`` (GPT-2) or ``SwiGLU`` (Shazeer, 2020).

    SwiGLU's hidden width is scaled by 2/3 so both variants have the same parameter count.
    """

    def __init__(self, d_model: int, kind: str = "gelu", ratio: float = 4.0, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        hidden = int(ratio * d_model)
        if kind == "swiglu":
            hidden = int(2 * hidden / 3)
            self.fc = nn.Linear(d_model, 2 * hidden, bias=bias)
        elif kind == "gelu":
            self.fc = nn.Linear(d_model, hidden, bias=bias)
        else:
            raise ValueError(f"unknown mlp {kind!r}; valid: 'gelu', 'swiglu'")
        self.proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.dropout(self.proj(h))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    The attention module comes from :class:`AttentionFactory` for ``attention.attention_type``,
    built for the model dimensions ``dims`` (width, heads, dropout and bias of the whole block).
    """

    def __init__(self, attention: AttentionConfig, dims: Optional[AttentionDims] = None, mlp: str = "gelu",
                 mlp_ratio: float = 4.0):
        super().__init__()
        dims = dims or attention.legacy_dims or AttentionDims()
        self.ln_1 = nn.LayerNorm(dims.d_model, bias=dims.bias)
        self.attn = AttentionFactory.create_attention(attention, dims)
        self.ln_2 = nn.LayerNorm(dims.d_model, bias=dims.bias)
        self.mlp = MLP(dims.d_model, mlp, mlp_ratio, dims.bias, dims.dropout)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None, input_pos: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), context=context, mask=mask, cache=cache, input_pos=input_pos, lengths=lengths)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model.

    ``model(idx)`` -> logits ``[B, T, V]``; ``model(idx, targets)`` -> ``(logits, loss)`` with
    ``targets == -1`` ignored; ``model(idx, targets, return_logits=False)`` -> ``(None, loss)``
    through the fused head and loss of :mod:`attn_lm.loss` (what training uses: the logits are
    never materialised). ``caches`` (from :meth:`new_caches`) run incremental decoding:
    ``model(prompt, caches=caches, lengths=lengths)`` prefills positions ``0 .. T-1`` (``lengths``:
    real tokens per row of a right-padded batch), then ``model(token, caches=caches,
    input_pos=pos)`` is one step at the explicit positions ``pos`` (``[T]`` or per row ``[B, T]``).
    Layers whose attention reads a context (``cross``) get the token+position embedding stream.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe: Optional[nn.Module] = None
        if config.position == "learned":
            self.wpe = LearnedPositionalEmbedding(config.context_len, config.d_model)
        elif config.position == "sinusoidal":
            self.wpe = SinusoidalPositionalEmbedding(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg, config.attention_dims, config.mlp, config.mlp_ratio)
            for cfg in config.layer_attention
        )
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer).
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def layer_types(self) -> list[str]:
        return [block.attn.name for block in self.blocks]

    @property
    def untraceable(self) -> dict[str, str]:
        """Mechanisms of this model that ``torch.compile`` cannot trace into one graph, with the
        reason each declares (``compile_unsupported``); empty when the whole forward and loss is
        one graph."""
        return {block.attn.name: block.attn.compile_unsupported for block in self.blocks
                if block.attn.compile_unsupported}

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out position embeddings (tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and isinstance(self.wpe, nn.Embedding):
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): ``6 N + 12 L d T`` (Kaplan et al.; PaLM
        appendix B), counting dense attention scores; used for the MFU estimate."""
        cfg = self.config
        return 6 * self.num_parameters(non_embedding=True) + 12 * cfg.n_layer * cfg.d_model * seq_len

    def prepare_fused(self, seq_len: int, device: torch.device) -> None:
        """Build each layer's per-length state (FlexAttention block masks) eagerly, before a
        compiled forward of ``seq_len`` tokens reads it (:meth:`Attention.prepare_fused`)."""
        for block in self.blocks:
            block.attn.prepare_fused(seq_len, device)

    def new_caches(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> list[LayerCache]:
        """One preallocated decoding cache per layer for positions ``0 .. max_len - 1``, each in its
        mechanism's own form. Positions are checked here, on the host, not at every step."""
        if isinstance(self.wpe, LearnedPositionalEmbedding):
            self.wpe.check_range(max_len)
        ref = self.wte.weight
        return [block.attn.new_cache(batch, max_len, dtype or ref.dtype, device or ref.device) for block in self.blocks]

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                caches: Optional[Sequence[LayerCache]] = None, input_pos: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None, return_logits: bool = True):
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape [B, T], got {tuple(idx.shape)}")
        T = idx.shape[1]
        x = self.wte(idx)
        if input_pos is not None and not caches:
            raise ValueError("input_pos places a decoding step in its caches; pass caches=model.new_caches(...)")
        if input_pos is None and isinstance(self.wpe, LearnedPositionalEmbedding):
            self.wpe.check_range(T)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device) if input_pos is None else input_pos)
        x = self.drop(x)
        stream = x
        for i, block in enumerate(self.blocks):
            context = stream if block.attn.uses_context else None
            x = block(x, context=context, mask=mask, cache=caches[i] if caches else None, input_pos=input_pos,
                      lengths=lengths)
        x = self.ln_f(x)
        if targets is not None and not return_logits:
            # Training: the head and the loss fused a chunk of rows at a time, gradients taken in
            # the forward, so the [B*T, V] logits and their gradient never exist (attn_lm.loss).
            return None, linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(x)
        if targets is None:
            return logits
        # The fp32 upcast is for the log-softmax's accuracy. Compiled, it is fused into the loss
        # kernel and no fp32 [B*T, V] tensor is ever stored.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, use_cache: bool = True, generator: Optional[torch.Generator] = None,
                 max_context: Optional[int] = None, prompt_lengths: Optional[Sequence[int]] = None,
                 compile: bool = False, compile_prefill: bool = False) -> Tensor:
        """Continue ``idx [B, T]`` by ``max_new_tokens`` tokens; returns ``[B, T + max_new_tokens]``.

        ``temperature = 0`` is greedy decoding; otherwise tokens are drawn from
        ``softmax(logits / temperature)`` after the ``top_k`` / nucleus ``top_p`` filters, with
        ``generator`` as the random source. ``use_cache`` prefills the prompt into
        :meth:`new_caches` and then feeds one token per step; without it every step re-runs the
        whole context. Both give the same tokens. ``prompt_lengths``: prompts of different
        lengths, left-padded in ``idx`` (row ``b``'s prompt is its last ``prompt_lengths[b]``
        tokens); each row continues as if decoded alone. ``compile``: the decoding step as one
        compiled graph (CUDA graphs on GPU); ``compile_prefill``: the prefill too (Inductor, static
        shapes at bucketed prompt widths; see :mod:`attn_lm.decoding`). The model conditions on the
        last ``max_context`` tokens (default ``context_len``); past that, each step re-runs the
        cropped window (see :mod:`attn_lm.decoding`). Runs without gradients and in eval mode; the
        previous mode is restored afterwards. Tokens stay on the device until the end (no host sync per token).
        """
        decoder = Decoder(self, idx.shape[-1] + max_new_tokens, use_cache, max_context, compile, compile_prefill)
        new_tokens = list(decoder.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, prompt_lengths))
        return torch.cat([idx, *new_tokens], dim=1)
