"""Per-layer decoding caches: fixed-size buffers, written at explicit positions.

Each attention family keeps what its own recurrence needs, preallocated once per generation:

* :class:`KVCache` — keys and values of every position (softmax family; GQA/MQA store only
  their ``n_kv_heads`` heads, so bytes per token fall by ``n_heads / n_kv_heads``);
* :class:`SlidingWindowCache` — the first ``num_global`` tokens plus a ring buffer of the latest
  ``window`` ones (sliding-window, block-sparse and Longformer attention): bounded memory;
* :class:`RecurrentStateCache` — the running sums of kernelized attention: constant memory;
* :class:`ChunkSummaryCache` — summaries of completed chunks plus the current chunk (causal
  Linformer / Nyströmformer).

No cache keeps a host-side length: every write takes the positions ``pos [b, 1, T]`` (``b`` is
the batch or 1) as a device tensor, so a decoding step has the same shapes and the same host code
at every position and can be captured once (CUDA graph). Rows of a batch may sit at different
positions (prompts of different lengths). Two writes fill a cache:

* ``prefill(k, v, lengths)`` after the first forward over a prompt that starts at position 0,
  ``[B, Hkv, T, D]``, row ``b`` holding ``lengths[b]`` real tokens (the rest is right padding);
* a decoding step's write at positions ``pos`` (see each class).

Slots past a row's position may hold stale or padding values: attention masks them by position,
and each is overwritten before its position is reached. Writing past the capacity given at
construction is an index error; :class:`~attn_lm.decoding.Decoder` never does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _heads_index(pos: Tensor, like: Tensor) -> Tensor:
    """Slot indices ``pos [b, 1, T]`` expanded to ``like``'s ``[B, H, T, D]`` for ``scatter_``/``gather``."""
    return pos[..., None].expand(like.shape[0], like.shape[1], pos.shape[-1], like.shape[-1])


class LayerCache:
    """Common interface: the bytes held (``nbytes``)."""

    def tensors(self) -> list[Tensor]:
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache(LayerCache):
    """Keys/values of positions ``0 .. max_len - 1``; position ``p`` lives in slot ``p``.

    A step writes its keys at ``pos`` and attends over all ``max_len`` slots with
    :attr:`positions` (``arange(max_len)``): a fixed shape, so time per step is ``O(max_len)``
    whatever the position (masked slots cost reads, as in gpt-fast).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(max_len, device=device)
        self.max_len = max_len

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    def key_positions(self) -> Tensor:
        """Position of every slot, ``[1, 1, max_len]`` (masks decide which are written)."""
        return self.positions.view(1, 1, -1)

    def prefill(self, k: Tensor, v: Tensor, lengths: Tensor) -> None:
        if k.shape[2] > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot prefill {k.shape[2]}")
        self.k[:, :, : k.shape[2]] = k
        self.v[:, :, : v.shape[2]] = v

    def write(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        index = _heads_index(pos, k)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)


class SlidingWindowCache(LayerCache):
    """Keys/values of the first ``num_global`` tokens for good, plus the latest ``window`` later
    tokens in a ring buffer: ``O(num_global + window)`` memory however long decoding runs.

    Position ``p`` lives in slot ``p`` if ``p < num_global``, else in ring slot
    ``num_global + (p - num_global) % window``; ``positions [B, slots]`` records each slot's
    absolute position per row (``-1`` = empty, which every
    :class:`~attn_lm.attention.masks.MaskPattern` masks). Slots are therefore not in position
    order: whoever attends must use :attr:`positions`. A step of several tokens must attend over
    the slots *before* :meth:`write` (its first query may need a key that a later token's write
    replaces); a one-token step may write first (it replaces position ``p - window``, out of reach).
    """

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, num_global: int = 0):
        slots = num_global + window
        shape = (batch, n_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        self.window, self.num_global = window, num_global

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v, self.positions]

    def key_positions(self) -> Tensor:
        """Position of every slot per row, ``[B, 1, slots]`` (``-1`` = empty)."""
        return self.positions[:, None, :]

    def slot(self, pos: Tensor) -> Tensor:
        g = self.num_global
        return torch.where(pos < g, pos, g + (pos - g) % self.window)

    def prefill(self, k: Tensor, v: Tensor, lengths: Tensor) -> None:
        """Each slot takes, per row, the latest prompt position that maps to it (``-1`` if none)."""
        g, w = self.num_global, self.window
        slot = torch.arange(self.positions.shape[1], device=k.device)
        last = lengths[:, None] - 1
        ring = g + (slot - g) + w * torch.div(last - slot, w, rounding_mode="floor")  # <= last, in the slot
        pos = torch.where(slot < g, slot, ring)
        pos = torch.where((pos <= last) & (pos >= torch.where(slot < g, 0, g)), pos, -1)  # [B, slots]
        index = _heads_index(pos.clamp(min=0)[:, None], k)
        self.k.copy_(k.gather(2, index))
        self.v.copy_(v.gather(2, index))
        self.positions.copy_(pos)

    def write(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Store tokens one position at a time, so that of several tokens mapping to one slot the
        latest wins (a single scatter with repeated indices has no defined winner)."""
        for t in range(k.shape[2]):
            p = pos[..., t:t + 1]
            index = self.slot(p)
            heads_index = _heads_index(index, k)
            self.k.scatter_(2, heads_index, k[:, :, t:t + 1])
            self.v.scatter_(2, heads_index, v[:, :, t:t + 1])
            self.positions.scatter_(1, index[:, 0].expand(self.positions.shape[0], 1),
                                    p[:, 0].expand(self.positions.shape[0], 1))


class RecurrentStateCache(LayerCache):
    """Kernelized (linear) attention's running sums over every past key (Katharopoulos et al., 2020):
    ``kv = sum_j phi(k_j) v_j^T [B, H, F, D]`` and ``k_sum = sum_j phi(k_j) [B, H, F]``.

    ``O(F D)`` per head whatever the number of tokens consumed, so ``nbytes()`` is constant in the
    generated length (the attention analogue of an RNN hidden state). Positions only enter
    through the features (cosFormer), so the cache itself needs none.
    """

    def __init__(self, batch: int, n_heads: int, feature_dim: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.zeros(batch, n_heads, feature_dim, head_dim, dtype=dtype, device=device)
        self.k_sum = torch.zeros(batch, n_heads, feature_dim, dtype=dtype, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.kv, self.k_sum]

    def state(self) -> tuple[Tensor, Tensor]:
        return self.kv, self.k_sum

    def update(self, state: tuple[Tensor, Tensor]) -> None:
        """Store the sums (in place: the buffers keep their addresses)."""
        self.kv.copy_(state[0])
        self.k_sum.copy_(state[1])


class ChunkSummaryCache(LayerCache):
    """Compressed memory for chunked attention (causal Linformer / Nyströmformer variants).

    ``summary_k/v [B, Hkv, n p, D]``: the ``p = summary_len`` summaries of chunk ``c`` in slots
    ``[c p, (c + 1) p)``, ``n = ceil(max_len / chunk_size)``; ``chunk_k/v [B, Hkv, C, D]``: the raw
    keys/values of the chunk being filled, position ``p`` in slot ``p % C``. Chunk ``c``'s summary
    slots are rewritten at every step inside chunk ``c`` (a fixed-shape step has no branch) and
    read only by later chunks, i.e. once the chunk is complete: ``C + n p`` positions instead of
    ``max_len``.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, chunk_size: int,
                 summary_len: int, dtype: torch.dtype, device: torch.device | str):
        memory = (batch, n_kv_heads, -(-max_len // chunk_size) * summary_len, head_dim)
        chunk = (batch, n_kv_heads, chunk_size, head_dim)
        self.summary_k = torch.zeros(memory, dtype=dtype, device=device)
        self.summary_v = torch.zeros(memory, dtype=dtype, device=device)
        self.chunk_k = torch.zeros(chunk, dtype=dtype, device=device)
        self.chunk_v = torch.zeros(chunk, dtype=dtype, device=device)
        self.chunk_size, self.summary_len = chunk_size, summary_len

    def tensors(self) -> list[Tensor]:
        return [self.summary_k, self.summary_v, self.chunk_k, self.chunk_v]

    def prefill(self, k: Tensor, v: Tensor, summary_k: Tensor, summary_v: Tensor, lengths: Tensor) -> None:
        """Store the summaries of the prompt's complete chunks and, per row, the raw keys of the
        chunk holding its next position (slots past the row's length are padding, masked)."""
        if summary_k.shape[2] > self.summary_k.shape[2]:
            raise ValueError(f"cache holds {self.summary_k.shape[2] // self.summary_len} chunks; "
                             f"cannot prefill {summary_k.shape[2] // self.summary_len}")
        self.summary_k[:, :, : summary_k.shape[2]] = summary_k
        self.summary_v[:, :, : summary_v.shape[2]] = summary_v
        C = self.chunk_size
        start = torch.div(lengths, C, rounding_mode="floor") * C
        pos = (start[:, None] + torch.arange(C, device=k.device)).clamp(max=k.shape[2] - 1)
        index = _heads_index(pos[:, None], self.chunk_k)
        self.chunk_k.copy_(k.gather(2, index))
        self.chunk_v.copy_(v.gather(2, index))

    def write(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Store one token per row (``pos [b, 1, 1]``) in the current chunk."""
        index = _heads_index(pos % self.chunk_size, k)
        self.chunk_k.scatter_(2, index, k)
        self.chunk_v.scatter_(2, index, v)

    def write_summary(self, summary_k: Tensor, summary_v: Tensor, pos: Tensor) -> None:
        """Store the current chunk's summaries ``[B, Hkv, p, D]`` in chunk ``pos // C``'s slots."""
        p = self.summary_len
        slots = torch.div(pos, self.chunk_size, rounding_mode="floor") * p + torch.arange(p, device=pos.device)
        index = _heads_index(slots, summary_k)
        self.summary_k.scatter_(2, index, summary_k)
        self.summary_v.scatter_(2, index, summary_v)
