"""Per-layer decoding caches.

Each attention family keeps what its own recurrence needs, preallocated once per generation:

* :class:`KVCache` — keys and values of every past token (softmax family; GQA/MQA store only
  their ``n_kv_heads`` heads, so bytes per token fall by ``n_heads / n_kv_heads``);
* :class:`SlidingWindowCache` — the first ``num_global`` tokens plus a ring buffer of the latest
  ``window`` ones (sliding-window, block-sparse and Longformer attention): bounded memory;

Other families add their own cache classes next to these (ring buffers for sliding windows,
recurrent states for kernelized attention). Every cache exposes ``length`` (tokens consumed so
far, i.e. the absolute position of the next token) and ``nbytes()``.
"""
from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """Common interface: how many tokens were consumed and how many bytes are held."""

    def __init__(self) -> None:
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache(LayerCache):
    """Keys/values of all past tokens, preallocated to ``max_len`` positions.

    ``append`` writes new keys/values at ``[length, length + T)`` and returns views of everything
    stored so far with their absolute positions (``arange(length + T)``).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to position {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        positions = torch.arange(end, device=k.device)
        return self.k[:, :, :end], self.v[:, :, :end], positions


class ChunkSummaryCache(LayerCache):
    """Compressed memory for chunked attention (causal Linformer / Nyströmformer variants).

    Holds the ``summary_len`` summary keys/values of every *completed* chunk of ``chunk_size``
    tokens, plus the raw keys/values of the chunk being filled: at most
    ``chunk_size + (max_len // chunk_size) * summary_len`` positions instead of ``max_len``.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, chunk_size: int,
                 summary_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        memory = (batch, n_kv_heads, (max_len // chunk_size) * summary_len, head_dim)
        chunk = (batch, n_kv_heads, chunk_size, head_dim)
        self.summary_k = torch.zeros(memory, dtype=dtype, device=device)
        self.summary_v = torch.zeros(memory, dtype=dtype, device=device)
        self.chunk_k = torch.zeros(chunk, dtype=dtype, device=device)
        self.chunk_v = torch.zeros(chunk, dtype=dtype, device=device)
        self.max_len, self.chunk_size, self.n_summaries = max_len, chunk_size, 0

    def tensors(self) -> list[Tensor]:
        return [self.summary_k, self.summary_v, self.chunk_k, self.chunk_v]

    def memory(self) -> tuple[Tensor, Tensor]:
        """Summary keys/values of all completed chunks, ``[B, Hkv, n_summaries, D]``."""
        return self.summary_k[:, :, : self.n_summaries], self.summary_v[:, :, : self.n_summaries]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The current chunk's keys/values followed by the new ``k, v``: a local sequence that
        starts at a chunk boundary (absolute position ``length - length % chunk_size``)."""
        if self.length + k.shape[2] > self.max_len:
            end = self.length + k.shape[2]
            raise ValueError(f"cache holds {self.max_len} positions; cannot append up to position {end}")
        filled = self.length % self.chunk_size
        return torch.cat([self.chunk_k[:, :, :filled], k], 2), torch.cat([self.chunk_v[:, :, :filled], v], 2)

    def commit(self, k_local: Tensor, v_local: Tensor, summary_k: Tensor, summary_v: Tensor) -> None:
        """After attending over ``extend``'s local sequence: store the summaries of the chunks it
        completed and keep its trailing partial chunk as the current chunk."""
        start, end = self.n_summaries, self.n_summaries + summary_k.shape[2]
        self.summary_k[:, :, start:end] = summary_k
        self.summary_v[:, :, start:end] = summary_v
        self.n_summaries = end
        rest = k_local.shape[2] % self.chunk_size
        self.chunk_k[:, :, :rest] = k_local[:, :, k_local.shape[2] - rest:]
        self.chunk_v[:, :, :rest] = v_local[:, :, v_local.shape[2] - rest:]
        self.length += k_local.shape[2] - self.length % self.chunk_size


class RecurrentStateCache(LayerCache):
    """Kernelized (linear) attention's running sums over every past key (Katharopoulos et al., 2020):
    ``kv = sum_j phi(k_j) v_j^T [B, H, F, D]`` and ``k_sum = sum_j phi(k_j) [B, H, F]``.

    ``O(F D)`` per head whatever the number of tokens consumed, so ``nbytes()`` is constant in the
    generated length (the attention analogue of an RNN hidden state).
    """

    def __init__(self, batch: int, n_heads: int, feature_dim: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.kv = torch.zeros(batch, n_heads, feature_dim, head_dim, dtype=dtype, device=device)
        self.k_sum = torch.zeros(batch, n_heads, feature_dim, dtype=dtype, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.kv, self.k_sum]

    def state(self) -> tuple[Tensor, Tensor]:
        return self.kv, self.k_sum

    def update(self, state: tuple[Tensor, Tensor], n_tokens: int) -> None:
        """Store the sums after ``n_tokens`` more tokens (in place: the buffers are reused)."""
        self.kv.copy_(state[0])
        self.k_sum.copy_(state[1])
        self.length += n_tokens


class SlidingWindowCache(LayerCache):
    """Keys/values of the first ``num_global`` tokens for good, plus the latest ``window`` later
    tokens in a ring buffer: ``O(num_global + window)`` memory however long decoding runs.

    Position ``p`` lives in slot ``p`` if ``p < num_global``, else in ring slot
    ``num_global + (p - num_global) % window``; ``positions`` records each slot's absolute position
    (``-1`` = empty, which every :class:`~attn_lm.attention.masks.MaskPattern` masks). Slots are
    therefore not in position order: whoever attends must use the returned positions.

    ``append`` returns every stored slot followed by the new keys, *then* stores the new ones, so a
    multi-token step (prefill) still sees the oldest keys of its first query's window. The caller's
    pattern masks what each query may not see; it must look back at most ``window`` positions
    (beyond the global ones) for the result to be exact.
    """

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, num_global: int = 0):
        super().__init__()
        slots = num_global + window
        shape = (batch, n_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.window, self.num_global = window, num_global

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v, self.positions]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        start, end = self.length, self.length + k.shape[2]
        g = self.num_global
        k_all = torch.cat([self.k, k], dim=2)
        v_all = torch.cat([self.v, v], dim=2)
        kv_pos = torch.cat([self.positions, torch.arange(start, end, device=k.device)])
        # Of the new tokens, keep the global ones and the latest `window` others (one per slot).
        kept = torch.tensor([*range(start, min(end, g)), *range(max(start, g, end - self.window), end)],
                            dtype=torch.long, device=k.device)
        slots = torch.where(kept < g, kept, g + (kept - g) % self.window)
        self.k[:, :, slots] = k[:, :, kept - start]
        self.v[:, :, slots] = v[:, :, kept - start]
        self.positions[slots] = kept
        self.length = end
        return k_all, v_all, kv_pos
