"""FlashAttention written out tile by tile in PyTorch: ``flash_v1`` (Dao et al., 2022,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", Algorithm 1) and
``flash_v2`` (Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning").

This is TEACHING code: the Python loops run over tiles (never over tokens), so every step of the
algorithm is visible, but each tile is a separate small matmul. For speed use ``flash`` (the fused
SDPA kernels); both mechanisms here compute exactly the same function as ``full``.

The problem
-----------
Standard attention writes ``S = Q K^T / sqrt(d)`` and ``P = softmax(S)`` (both ``N x N``) to GPU
main memory (HBM) and reads them back: ``Theta(N d + N^2)`` HBM accesses and ``O(N^2)`` memory.
FlashAttention splits ``Q`` into row tiles ``Q_i`` and ``K, V`` into tiles ``K_j, V_j`` of
``block_size`` rows that fit in on-chip SRAM (size ``M``), computes each score tile
``S_ij = Q_i K_j^T / sqrt(d)`` on chip and never writes ``S`` or ``P``: ``O(N)`` extra memory and
``Theta(N^2 d^2 / M)`` HBM accesses, many times fewer for typical ``d`` (64-128) and ``M``
(~100 KB). The FLOPs are the same ``O(N^2 d)``; the win is IO.

Online softmax
--------------
A row's softmax needs the max and the sum over *all* its keys, but a tile only shows some of
them. Keep per query row a running max ``m`` and running sum ``l``; for a new score tile
``S_ij`` (row-wise):

    m_new = max(m, rowmax(S_ij))
    P~    = exp(S_ij - m_new)
    l_new = exp(m - m_new) * l + rowsum(P~)
    acc   = exp(m - m_new) * acc + P~ V_j        (unnormalised output)

after the last tile ``O = acc / l`` is exact, and ``L = m + log(l)`` is the row's logsumexp.
``exp(m - m_new)`` rescales what was accumulated under the old max. Rows that have seen no
allowed key yet have ``m = -inf``; the shift then uses 0 instead (``exp(-inf - 0) = 0``) so no
``-inf - (-inf) = NaN`` appears, and a row that never sees a key outputs zeros.

Loop orders
-----------
* v1 (Algorithm 1): OUTER loop over key/value tiles ``j``, INNER loop over query tiles ``i``. The
  output tiles ``O_i`` and the statistics ``m_i, l_i`` live in HBM and are read, updated and
  written back for every ``(i, j)``; ``O_i`` is kept *normalised*, so each update is
  ``O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j)`` with
  ``m~ = rowmax(S_ij)``, ``P~ = exp(S_ij - m~)``.
* v2: OUTER loop over query tiles, INNER over key tiles. ``m, l`` and the *unnormalised*
  accumulator stay on chip for the whole inner loop, are rescaled only by ``e^(m_old - m_new)``,
  divided by ``l`` once at the end, and only ``O_i`` and the logsumexp ``L_i`` are written.

Why v2 is faster: the ``diag(l)`` / ``diag(l_new)^-1`` rescaling of v1 costs a multiply and a
divide over the ``[block, d]`` output tile per ``(i, j)`` step; v2 divides once per row. Those are
non-matmul FLOPs, which run ~16x slower than tensor-core matmul FLOPs on an A100, so removing
them matters. v2 also writes one statistic (``L``) instead of two, touches HBM for ``O_i`` once
instead of once per key tile, and its outer loop over query tiles is embarrassingly parallel
(one thread block per query tile, even at batch 1), while v1's outer loop carries state.

Block skipping
--------------
A tile whose pattern mask (``self.pattern``, e.g. causal) is all ``False`` is skipped without a
matmul: under causal masking about half the tiles, ``n (n + 1) / 2`` of ``n^2``. Partially masked
tiles (the diagonal) apply the mask; ALiBi and user masks are added inside the tile loop.
``tile_stats`` records how many tiles the last forward computed.

Backward pass
-------------
The real kernels do not store ``P``; they recompute each ``P_ij = exp(S_ij - L_i)`` from the saved
logsumexp ``L`` (a little extra compute for ``O(N)`` memory). ``flash_v2`` does exactly that in
:class:`FlashV2Function` (backward loops: outer over key tiles, accumulating ``dK_j, dV_j``,
inner over query tiles, accumulating ``dQ_i``; ``D_i = rowsum(dO_i * O_i)``). ``flash_v1`` lets
autograd differentiate through its loops, which keeps every tile's ``P~`` alive: exact, but
``O(N^2)`` activation memory (in ``n^2`` tiles, never one ``N x N`` tensor).

Attention dropout is applied to ``P~`` inside the loop (``l`` sums the undropped values, so this
is dropout of the normalised probabilities). Each tile's dropout mask comes from a generator
seeded with ``(seed, i, j)`` so the backward pass regenerates it, as the kernels do with their
Philox seed/offset; it is a different random stream from the reference path, so dropout cannot
be compared with the reference number for number (only with ``eval()`` / ``dropout=0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..positions import ALiBi
from .base import SoftmaxAttention
from .config import option
from .factory import register
from .functional import repeat_kv
from .masks import MaskPattern


class TileStats(NamedTuple):
    """Score tiles computed by the last forward, out of all ``n_q_tiles * n_kv_tiles``."""

    computed: int
    total: int


class TileGrid:
    """The tiling of one attention call: query/key tile slices, and what turns ``Q_i K_j^T`` into
    the masked, biased scores of tile ``(i, j)`` (pattern, ALiBi, user mask, dropout).

    Nothing here is ``T x S``: masks and biases are built per tile from positions, and the user
    mask is sliced per tile. ``computed`` counts the tiles :meth:`visible` let through.
    """

    def __init__(self, pattern: MaskPattern, alibi: Optional[ALiBi], q_pos: Tensor, kv_pos: Tensor,
                 mask: Optional[Tensor], block: int, dropout_p: float):
        self.pattern, self.alibi = pattern, alibi
        self.q_pos, self.kv_pos = q_pos, kv_pos
        self.q_tiles = [slice(a, min(a + block, len(q_pos))) for a in range(0, len(q_pos), block)]
        self.kv_tiles = [slice(a, min(a + block, len(kv_pos))) for a in range(0, len(kv_pos), block)]
        # Leading singleton dims make every broadcastable mask 4-D, so tiles slice dims -2, -1.
        self.mask = None if mask is None else mask[(None,) * (4 - mask.dim())]
        self.dropout_p = dropout_p
        self.seed = int(torch.randint(2**62, ())) if dropout_p > 0 else 0
        self.computed = 0

    @property
    def total(self) -> int:
        return len(self.q_tiles) * len(self.kv_tiles)

    def visible(self, i: int, j: int) -> Optional[Tensor]:
        """The pattern's boolean ``[tq, tk]`` mask of tile ``(i, j)``, or ``None`` if it is empty
        (the tile is skipped: no matmul, no memory traffic)."""
        allowed = self.pattern.dense(self.q_pos[self.q_tiles[i]], self.kv_pos[self.kv_tiles[j]])
        if not allowed.any():
            return None
        self.computed += 1
        return allowed

    def scores(self, q_i: Tensor, k_j: Tensor, i: int, j: int, allowed: Tensor) -> Tensor:
        """``S_ij = Q_i K_j^T / sqrt(d)`` plus ALiBi and additive masks, ``-inf`` where not allowed."""
        qs, ks = self.q_tiles[i], self.kv_tiles[j]
        s = q_i @ k_j.transpose(-2, -1) / math.sqrt(q_i.shape[-1])
        if self.alibi is not None:
            s = s + self.alibi.bias(self.q_pos[qs], self.kv_pos[ks], s.dtype)
        if self.mask is not None:
            rows = qs if self.mask.shape[-2] > 1 else slice(None)
            cols = ks if self.mask.shape[-1] > 1 else slice(None)
            tile = self.mask[..., rows, cols]
            if tile.dtype == torch.bool:
                allowed = allowed & tile
            else:
                s = s + tile.to(s.dtype)
        return s if allowed.all() else s.masked_fill(~allowed, float("-inf"))

    def dropout(self, x: Tensor, i: int, j: int) -> Tensor:
        """Inverted dropout with a mask that depends only on ``(seed, i, j)``: the backward pass
        calls this again and gets the same mask (the kernels' Philox seed/offset trick)."""
        if self.dropout_p == 0:
            return x
        gen = torch.Generator(device=x.device).manual_seed(self.seed + i * len(self.kv_tiles) + j)
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= self.dropout_p
        return x * keep / (1.0 - self.dropout_p)


def _shift(m: Tensor) -> Tensor:
    """The running max used as exponent shift, with ``-inf`` (no key seen yet) replaced by 0."""
    return m.masked_fill(torch.isneginf(m), 0.0)


def _nonzero(l: Tensor) -> Tensor:
    """Row sums safe to divide by: a row with no allowed key has ``l = 0`` and a zero numerator."""
    return l.masked_fill(l == 0, 1.0)


def flash_v1_forward(q: Tensor, k: Tensor, v: Tensor, grid: TileGrid) -> Tensor:
    """FlashAttention Algorithm 1 on ``q, k, v [B, H, *, D]`` (same number of heads).

    ``O``, ``l``, ``m`` are lists of per-query-tile blocks standing for the HBM arrays of the
    paper; each inner step loads ``O_i, l_i, m_i``, updates them and writes them back.
    """
    B, H, _, D = q.shape
    O = [q.new_zeros(B, H, qs.stop - qs.start, D) for qs in grid.q_tiles]
    l = [q.new_zeros(B, H, qs.stop - qs.start, 1) for qs in grid.q_tiles]
    m = [q.new_full((B, H, qs.stop - qs.start, 1), float("-inf")) for qs in grid.q_tiles]
    for j, ks in enumerate(grid.kv_tiles):                 # outer: key/value tiles
        k_j, v_j = k[:, :, ks], v[:, :, ks]
        for i, qs in enumerate(grid.q_tiles):              # inner: query tiles
            allowed = grid.visible(i, j)
            if allowed is None:
                continue
            s = grid.scores(q[:, :, qs], k_j, i, j, allowed)
            # m is only a numerical shift (the output does not depend on it), so no gradient.
            m_tile = s.amax(dim=-1, keepdim=True).detach()
            p = torch.exp(s - _shift(m_tile))
            m_new = torch.maximum(m[i], m_tile)
            old, new = torch.exp(m[i] - _shift(m_new)), torch.exp(m_tile - _shift(m_new))
            l_new = old * l[i] + new * p.sum(dim=-1, keepdim=True)
            O[i] = (l[i] * old * O[i] + new * (grid.dropout(p, i, j) @ v_j)) / _nonzero(l_new)
            l[i], m[i] = l_new, m_new
    return torch.cat(O, dim=2)


def flash_v2_forward(q: Tensor, k: Tensor, v: Tensor, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 forward on ``q, k, v [B, H, *, D]``: returns ``O`` and the logsumexp
    ``L [B, H, T, 1]`` of every score row (``-inf`` for rows with no allowed key)."""
    B, H, _, D = q.shape
    out, lse = [], []
    for i, qs in enumerate(grid.q_tiles):                  # outer: query tiles (parallel on GPU)
        q_i = q[:, :, qs]
        m = q.new_full((B, H, qs.stop - qs.start, 1), float("-inf"))
        l = q.new_zeros(B, H, qs.stop - qs.start, 1)
        acc = q.new_zeros(B, H, qs.stop - qs.start, D)
        for j, ks in enumerate(grid.kv_tiles):             # inner: key/value tiles
            allowed = grid.visible(i, j)
            if allowed is None:
                continue
            s = grid.scores(q_i, k[:, :, ks], i, j, allowed)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - _shift(m_new))
            alpha = torch.exp(m - _shift(m_new))
            l = alpha * l + p.sum(dim=-1, keepdim=True)
            acc = alpha * acc + grid.dropout(p, i, j) @ v[:, :, ks]
            m = m_new
        out.append(acc / _nonzero(l))                      # normalise once per row
        lse.append(m + torch.log(l))
    return torch.cat(out, dim=2), torch.cat(lse, dim=2)


class FlashV2Function(torch.autograd.Function):
    """FlashAttention-2 with its own backward: saves only ``q, k, v, O`` and the logsumexp ``L``,
    and recomputes each probability tile ``P_ij = exp(S_ij - L_i)`` in the backward pass:

        D_i   = rowsum(dO_i * O_i)
        dV_j += P_ij^T dO_i                     (P_ij with the forward's dropout mask applied)
        dP_ij = dO_i V_j^T                      (dropout mask applied)
        dS_ij = P_ij * (dP_ij - D_i)
        dQ_i += dS_ij K_j / sqrt(d),   dK_j += dS_ij^T Q_i / sqrt(d)

    Masks and ALiBi are constants (no gradient). Not twice differentiable.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, grid: TileGrid) -> Tensor:
        out, lse = flash_v2_forward(q, k, v, grid)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grid = grid
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # the backward runs under the forward's autocast state
    def backward(ctx, d_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grid: TileGrid = ctx.grid
        scale = 1.0 / math.sqrt(q.shape[-1])
        # Rows with no allowed key have L = -inf; +inf makes their recomputed P exactly 0.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        delta = (d_out * out).sum(dim=-1, keepdim=True)
        dq = [torch.zeros_like(q[:, :, qs]) for qs in grid.q_tiles]
        dk, dv = [], []
        for j, ks in enumerate(grid.kv_tiles):             # outer: key tiles (dK_j, dV_j on chip)
            k_j, v_j = k[:, :, ks], v[:, :, ks]
            dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)
            for i, qs in enumerate(grid.q_tiles):          # inner: query tiles
                allowed = grid.visible(i, j)
                if allowed is None:
                    continue
                q_i, do_i = q[:, :, qs], d_out[:, :, qs]
                p = torch.exp(grid.scores(q_i, k_j, i, j, allowed) - lse[:, :, qs])
                dv_j += grid.dropout(p, i, j).transpose(-2, -1) @ do_i
                dp = grid.dropout(do_i @ v_j.transpose(-2, -1), i, j)
                ds = p * (dp - delta[:, :, qs])
                dq[i] += ds @ k_j * scale
                dk_j += ds.transpose(-2, -1) @ q_i * scale
            dk.append(dk_j)
            dv.append(dv_j)
        return torch.cat(dq, dim=2), torch.cat(dk, dim=2), torch.cat(dv, dim=2), None


class _BlockwiseAttention(SoftmaxAttention):
    """Shared plumbing: tiles of ``tile`` queries and keys, GQA heads expanded, stats."""

    family = "flash_blockwise"
    kernel_of = "full"
    renamed_options = {"block_size": "tile"}

    @dataclass(frozen=True)
    class Options:
        #: Queries and keys per tile (the on-chip block of the real kernels).
        tile: int = option(64, 4, *range(1, 10))
    compile_unsupported = ("teaching code: empty tiles are skipped by data-dependent Python branches and counted in "
                           "Python state, which torch.compile cannot trace; these layers run eagerly inside a compiled "
                           "model (use 'flash' for the fused kernel)")
    wants_compile = False  # the tile loop is the point: compiling would unroll it (and cannot, see above)

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.tile_stats: Optional[TileStats] = None

    @torch.compiler.disable
    def attend(self, q, k, v, q_pos, kv_pos, mask):
        grid = TileGrid(self.pattern, self.alibi, q_pos, kv_pos, mask, self.options.tile, self.attn_dropout)
        n_heads = q.shape[1]
        k, v = repeat_kv(k, n_heads), repeat_kv(v, n_heads)
        if torch.is_grad_enabled():
            # A tile of the projections' transposed [B, T, H, D] layout cannot fold B and H into
            # one matmul batch (for B > 1), so each tile matmul copies its operands, and autograd
            # keeps every copy: 1.5 GB for flash_v1 at B=16, T=1k on an H200, against 192 MB for
            # one contiguous copy of each input. Without autograd the copies die with their tile.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = self.tiled(q, k, v, grid)
        self.tile_stats = TileStats(grid.computed, grid.total)
        return out

    def tiled(self, q: Tensor, k: Tensor, v: Tensor, grid: TileGrid) -> Tensor:
        raise NotImplementedError


@register("flash_v1")
class FlashV1Attention(_BlockwiseAttention):
    """FlashAttention (v1, Algorithm 1) in PyTorch tiles: outer loop over key/value tiles, inner
    over query tiles, normalised output rescaled at every step. Backward: autograd through the
    loops. Time ``O(T^2 d)``, extra memory ``O(T)`` (forward). Teaching code; use ``flash``."""

    description = "FlashAttention-1 written tile by tile (teaching code, exact; 'flash' is the fast path)"

    def tiled(self, q, k, v, grid):
        return flash_v1_forward(q, k, v, grid)

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """With backward, autograd keeps what every computed tile made: its probabilities
        (``T k`` in all, for ``k`` keys per query) and the ``tile x D`` output block its update
        wrote (``T k D / tile``); coefficients measured on CPU. Forward only, ``O(T)`` like the
        fused kernels."""
        if not backward:
            return super().core_bytes(batch, seq_len, elem, backward, fused)
        keys = seq_len * self.pattern.density(seq_len)
        return (1.2 + 1.75 * self.head_dim / self.options.tile) * batch * self.n_heads * seq_len * keys * elem


@register("flash_v2")
class FlashV2Attention(_BlockwiseAttention):
    """FlashAttention-2 in PyTorch tiles: outer loop over query tiles, inner over key tiles,
    unnormalised accumulator, one division per row, logsumexp saved; hand-written backward that
    recomputes ``P`` from it. Time ``O(T^2 d)``, extra memory ``O(T)`` forward and backward.
    Teaching code; use ``flash``."""

    description = "FlashAttention-2 written tile by tile, recomputing backward (teaching code, exact)"

    def tiled(self, q, k, v, grid):
        return FlashV2Function.apply(q, k, v, grid)
