"""Autoregressive decoding, gpt-fast style: prefill once, then one fixed-shape step per token.

Small pure functions do the work:

* :func:`prefill` — one forward over the prompts through the full-sequence fast path
  (SDPA / FlexAttention / chunked scans), filling the per-layer caches (``GPT.new_caches``);
* :func:`decode_one_token` — one token per row at explicit positions ``input_pos [B, 1]`` (a
  device tensor). Every cache is preallocated and written at ``input_pos``, so the step has the
  same shapes and host code at every position: :func:`compile_step` compiles it whole
  (``fullgraph``: a graph break is an error, never a silent eager fallback) and, on GPU, captures
  it once in a CUDA graph (:class:`CUDAGraphStep`), so a step is one graph replay instead of
  hundreds of launches;
* :func:`~attn_lm.sampling.sample_next` — greedy / temperature / top-k / top-p on the device.

:class:`Decoder` drives them and keeps the bookkeeping on the host (row lengths, the context
window), so no token is read back unless the caller asks: ``GPT.generate`` reads nothing until
the end, the CLI reads every few tokens to stream text.

Dependencies run one way: this module imports nothing from :mod:`attn_lm.model`; it drives a
model only through ``model(idx, caches=, input_pos=, lengths=)``, ``model.new_caches``,
``model.config`` and the names and traceability of its layers (``layer_types``,
``untraceable``); ``GPT.generate`` is a thin wrapper over :class:`Decoder`.

The compiled prefill (``Decoder(compile_prefill=True)``, off by default). Eager, a 512-token
prefill of a GPT-2-small model is 1,500-4,000 small ops (CPU count), launch-bound on a GPU: 8-13
ms on an H200, the time of 13-20 compiled steps. :func:`compile_prefill_fn` compiles
:func:`prefill` with Inductor, ``fullgraph`` and **static shapes** at bucketed widths
(:func:`prefill_width`: the next power of two, capped at the cache size): the rows are
right-padded to their bucket and ``lengths`` hides the padding, as every family's prefill already
does for a batch of uneven prompts. A process therefore compiles once per (bucket, batch), not
once per prompt length. Dynamic shapes (gpt-fast's ``dynamic=True``) would not give one graph
for every mechanism: the sparse patterns specialise on the length (FlexAttention's ``BlockMask``
is cached per length; the CPU bias is filled in length-dependent blocks) and the chunked families
guard on it, so they would recompile per length. No CUDA graphs for the prefill: it runs once
per generation, Inductor's fusion removes most of its launches, and a graph per bucket would pin
that width's activations in the graph pool. Off by default because compiling costs seconds to
save milliseconds per prompt: worth it for many prompts (a server, a benchmark), not for one
(``python -m attn_lm.generate``, where the ``compile_prefill`` key turns it on). Re-runs without
caches (``use_cache=False``, or past the context window below) stay eager. The first compiled
prefill of each (bucket, batch) of a model is checked against an eager prefill run just before it
(the compiled one then rewrites the caches): if their logits disagree (:data:`PREFILL_RTOL`), a
warning says so, the eager prefill runs again into the caches and that model prefills eagerly from
then on, in every decoder (compiled FlexAttention without autograd was silently wrong once on the
GPU, benchmarks/RESULTS.md 5f).

Batches of prompts of different lengths: prompts come left-padded (row ``b``'s prompt is its
last ``prompt_lengths[b]`` tokens, as in Hugging Face), are right-aligned to positions
``0 .. n_b - 1`` for the prefill (padding after the prompt, which causal attention never sees,
and which caches overwrite before reaching it), and every row then decodes at its own positions.
Each row gives the tokens it would give decoded alone.

The context window: the model conditions on at most the last ``max_context`` tokens (default
``context_len``, the training length). ``max_context > context_len`` lets a model whose positions
extrapolate (see :mod:`attn_lm.positions`) read longer contexts; learned positions cannot.
Once a row holds ``max_context`` tokens, the next token pushes the oldest one out of its window.
Cached keys/values (or recurrent sums) of the tokens that stay were computed with the dropped
token in their context, so the cache cannot be trimmed: from then on every step is one full
forward over each row's last ``max_context`` tokens, at positions ``0 .. max_context - 1`` --
the same cost and the same tokens as ``use_cache=False``; exact, not fast. Give
``max_context >= prompt + new tokens`` (for relative positions) to stay on the fast path.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Callable, Optional

import torch
import torch._dynamo.config as dynamo_config
from torch import Tensor, nn
from torch._dynamo import exc as dynamo_exc
from torch._dynamo.exc import TorchDynamoException

from .cache import LayerCache
from .sampling import check_sampling, sample_next

#: ``(model, token [B, 1], input_pos [B, 1], caches) -> logits [B, V]``.
StepFn = Callable[[nn.Module, Tensor, Tensor, Sequence[LayerCache]], Tensor]


def context_window(model: nn.Module, max_context: Optional[int] = None) -> int:
    """How many of the latest tokens ``model`` conditions on: ``max_context``, default ``context_len``."""
    context_len, position = model.config.context_len, model.config.position
    window = context_len if max_context is None else max_context
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"max_context must be a positive number of tokens or None (= context_len), got {max_context!r}")
    if position == "learned" and window > context_len:
        raise ValueError(
            f"max_context={window} is longer than context_len={context_len}, and learned positions are not "
            f"defined past it; use max_context <= {context_len} or a model trained with position=alibi/rope/xpos/none"
        )
    return window


def prefill(model: nn.Module, idx: Tensor, lengths: Optional[Tensor] = None,
            caches: Optional[Sequence[LayerCache]] = None) -> Tensor:
    """Logits ``[B, V]`` for the token after each row's prompt: ``idx [B, T]`` right-padded,
    ``lengths [B]`` real tokens per row (device tensor; ``None``: every row has ``T``). With
    ``caches``, they hold the prompts afterwards. One forward over ``T`` positions (``O(T^2)`` or
    the mechanism's fast-path cost)."""
    logits = model(idx, caches=caches, lengths=lengths)
    if lengths is None:
        return logits[:, -1]
    return logits[torch.arange(idx.shape[0], device=idx.device), lengths - 1]


def decode_one_token(model: nn.Module, token: Tensor, input_pos: Tensor, caches: Sequence[LayerCache]) -> Tensor:
    """Logits ``[B, V]`` after feeding ``token [B, 1]`` at positions ``input_pos [B, 1]``. Fixed
    shapes at every position; costs what the mechanism's cache costs to read (the whole KV
    buffer, a ring buffer, a recurrent state)."""
    return model(token, caches=caches, input_pos=input_pos)[:, -1]


#: Recompilations Dynamo allows per compiled function: each model, batch and cache size (and each
#: prefill width bucket) is one of the same function. Past it Dynamo raises (fullgraph, recent
#: torch) or runs eager in silence (older torch); :class:`Decoder` warns and decodes eagerly either way.
RECOMPILE_LIMIT = 256


def _raise_recompile_limit() -> None:
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))


#: What a compiled call raises when it cannot be compiled: Dynamo's errors, and the recompile
#: limit (``FailOnRecompileLimitHit``: under ``fullgraph``, or ``fail_on_recompile_limit_hit``).
COMPILE_ERRORS = (TorchDynamoException, *(getattr(dynamo_exc, name) for name in ("FailOnRecompileLimitHit",)
                                          if hasattr(dynamo_exc, name)))


def _fail_on_recompile_limit():
    """A context in which hitting the recompile limit raises instead of running eager silently."""
    if not hasattr(dynamo_config, "fail_on_recompile_limit_hit"):  # torch < 2.7: the limit is raised at least
        return contextlib.nullcontext()
    return dynamo_config.patch(fail_on_recompile_limit_hit=True)


def compile_step(device: torch.device, tune: bool = True) -> StepFn:
    """:func:`decode_one_token` compiled as one graph with Inductor, and on GPU replayed from a CUDA
    graph (:class:`CUDAGraphStep`). ``fullgraph=True`` turns a graph break into an error. Each model
    is a recompilation of the same function, so the recompile limit is raised (past it, see
    :data:`RECOMPILE_LIMIT`).

    ``tune`` (GPU only): Inductor's coordinate-descent tuning of the step's kernels, gpt-fast's
    setting. With it Inductor also turns a matmul with one row (every projection of a batch-1
    step) into a reduction that it tunes and fuses with its neighbours, instead of a cuBLAS call:
    a batch-1 step is bound by the latency of its ~200 small kernels, not by bandwidth (RESULTS.md
    6g). Measured on an H200 at the GPT-2-small shape: +11-18% tokens/s (``full`` and ``local``
    at batch 1, ``full`` at batch 8) for ~12 s more compilation per step graph (Inductor caches
    the tuned configs on disk, so a later process reuses them)."""
    _raise_recompile_limit()
    if device.type != "cuda":
        return torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    return CUDAGraphStep(torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                                       options={"coordinate_descent_tuning": tune}))


class CUDAGraphStep:
    """A compiled step replayed from one explicitly captured CUDA graph (gpt-fast's recipe).

    The first call on a set of caches runs ``step_fn`` (it compiles, Triton tunes its kernels, and
    it is that token's real step), then captures one more call into a CUDA graph whose inputs are
    two static tensors, the token and the positions. Every later call copies its token and
    positions into them and replays the graph: three launches of host work per token. Under
    Inductor's own CUDA graphs (``mode="reduce-overhead"``, graph trees, which evaluate Dynamo's
    guards and check their recordings at every call) a decoding step took the host 0.4-1 ms, against
    0.15-0.24 ms captured and ~0.5 ms of GPU work per token at the GPT-2-small shape, so a step was
    bound by the host in some processes and not in others (benchmarks/RESULTS.md 6h).

    The graph reads the model's parameters and writes the caches at the addresses they had at
    capture, like the graph trees' static inputs: parameters and cache buffers must be updated in
    place (as optimizers, ``load_state_dict`` and a prefill do), never replaced; a new list of
    caches (a new batch size), a new model or a new token shape is captured anew. The output
    tensor is the graph's own and is overwritten by the next replay: copy it to keep it. If the
    capture fails (an operation CUDA graphs do not allow), the compiled step runs without a graph
    from then on, after a one-line warning with the reason.
    """

    def __init__(self, step_fn: StepFn):
        self.step_fn = step_fn
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.captured: tuple = ()  # (model, caches, token shape) of the graph
        self.static_token = self.static_pos = self.static_logits = None
        self.capture_failed = False

    def __call__(self, model: nn.Module, token: Tensor, input_pos: Tensor, caches: Sequence[LayerCache]) -> Tensor:
        if self.capture_failed:
            return self.step_fn(model, token, input_pos, caches)
        captured = self.captured
        if captured and captured[0] is model and captured[1] is caches and captured[2] == token.shape:
            self.static_token.copy_(token)
            self.static_pos.copy_(input_pos)
            if torch.cuda.current_device() == token.device.index:
                self.graph.replay()
            else:  # a model on another GPU than the current one: replay on its device's stream
                with torch.cuda.device(token.device):
                    self.graph.replay()
            return self.static_logits
        with torch.cuda.device(token.device):
            return self._run_and_capture(model, token, input_pos, caches)

    def _run_and_capture(self, model: nn.Module, token: Tensor, input_pos: Tensor,
                         caches: Sequence[LayerCache]) -> Tensor:
        """The real step (compiling on first use), then the capture of the next ones. Both run on
        the capture's side stream, so lazy initialisation (cuBLAS workspaces, Triton's tuning)
        happens before the capture and on its stream, as CUDA graphs require."""
        self.graph, self.captured = None, ()  # free the previous graph's pool first
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self.step_fn(model, token, input_pos, caches)
            static_token, static_pos = token.clone(), input_pos.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=side):  # records the kernels; runs none of them
                    static_logits = self.step_fn(model, static_token, static_pos, caches)
            except RuntimeError as error:
                reason = " ".join(str(error).split())[:200]
                warnings.warn(f"the compiled decoding step could not be captured in a CUDA graph ({reason}); it runs "
                              "without one, one launch per kernel", stacklevel=5)
                self.capture_failed = True
        current.wait_stream(side)
        logits.record_stream(current)
        if not self.capture_failed:
            self.graph, self.captured = graph, (model, caches, token.shape)
            self.static_token, self.static_pos, self.static_logits = static_token, static_pos, static_logits
        return logits


#: ``(model, idx [B, W], lengths [B], caches) -> logits [B, V]``, as :func:`prefill`.
PrefillFn = Callable[[nn.Module, Tensor, Optional[Tensor], Optional[Sequence[LayerCache]]], Tensor]

#: Narrowest width a compiled prefill runs at (shorter prompts share its graph).
MIN_PREFILL_WIDTH = 16


def prefill_width(width: int, capacity: int) -> int:
    """The width a compiled prefill of ``width``-token rows runs at: the next power of two (at least
    :data:`MIN_PREFILL_WIDTH`), capped at the cache's ``capacity`` (``width <= capacity``).

    Widths are bucketed because the compiled prefill has static shapes (one graph per width and
    batch): ``log2(capacity / 16) + 2`` graphs at most, whatever the prompts, for at most twice the
    prompt's prefill FLOPs (none for a prompt of a power-of-two length)."""
    if not 1 <= width <= capacity:
        raise ValueError(f"a prefill of {width} tokens does not fit a cache of {capacity} positions")
    return min(capacity, max(MIN_PREFILL_WIDTH, 1 << (width - 1).bit_length()))


#: How far (relative norm) a compiled prefill's logits may be from the eager prefill's: bf16
#: rounding moves them by ~1e-2 per element at most, their norm far less.
PREFILL_RTOL = 2e-2
#: Per model, the (width, batch) shapes whose compiled prefill was checked against eager; and the
#: models whose compiled prefill disagreed, which prefill eagerly from then on.
_PREFILL_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set[tuple[int, int]]]" = weakref.WeakKeyDictionary()
_PREFILL_DISAGREES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def prefill_disagrees(compiled: Tensor, eager: Tensor) -> bool:
    """Whether compiled prefill logits differ from the eager ones by more than :data:`PREFILL_RTOL`
    in relative norm (or are not finite where eager's are)."""
    compiled, eager = compiled.float(), eager.float()
    return not bool((compiled - eager).norm() <= PREFILL_RTOL * eager.norm())


def compile_prefill_fn() -> PrefillFn:
    """:func:`prefill` compiled as one graph (``fullgraph``: a graph break is an error, never a
    silent eager fallback) with Inductor and static shapes (``dynamic=False``: each width bucket,
    :func:`prefill_width`, and batch size is its own graph). The same mode on every device: no
    CUDA graphs (module docstring)."""
    _raise_recompile_limit()
    return torch.compile(prefill, fullgraph=True, dynamic=False)


def compile_error_reason(error: Exception) -> str:
    """The first lines of a compilation error, as one short line (e.g. ``backend='inductor'
    raised: <why>``); for the recompile limit, the limit."""
    if not isinstance(error, TorchDynamoException):  # FailOnRecompileLimitHit
        return f"{error}: more than torch._dynamo.config.recompile_limit = {dynamo_config.recompile_limit} graphs"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(error).__name__


class Decoder:
    """One generation with a model: row lengths, the token history, the context window, the
    caches and the (eager or compiled) decoding step.

    ``max_len``: how many tokens (left-padded prompt width + generated) a row will hold at most;
    caches are allocated once for ``min(max_len, max_context)`` positions and reused by every
    prefill of this decoder. ``max_context``: tokens the model conditions on (default
    ``context_len``). ``compile``: run the step through :func:`compile_step`, with its kernels
    tuned unless ``tune_step=False``.
    ``compile_prefill``: run the prefill that fills the caches through :func:`compile_prefill_fn`
    at bucketed widths (module docstring); independent of ``compile``. A model with a layer that
    cannot be traced (``compile_unsupported``, the tile-loop teaching code) prefills eagerly, and
    so does one whose prefill fails to compile, each after a one-line warning with the reason.
    """

    def __init__(self, model: nn.Module, max_len: int, use_cache: bool = True, max_context: Optional[int] = None,
                 compile: bool = False, compile_prefill: bool = False, tune_step: bool = True):
        window = context_window(model, max_context)
        self.model, self.use_cache, self.window, self.max_len = model, use_cache, window, max_len
        self.capacity = min(max_len, window)
        self.device = next(model.parameters()).device
        self.compile = compile
        self.step_fn: StepFn = compile_step(self.device, tune_step) if compile else decode_one_token
        untraceable = getattr(model, "untraceable", {}) if compile_prefill else {}
        if untraceable:
            warnings.warn("compile_prefill: the prefill runs eagerly, since " +
                          "; ".join(f"{name}: {why}" for name, why in untraceable.items()), stacklevel=2)
        if compile_prefill and model in _PREFILL_DISAGREES:
            warnings.warn("compile_prefill: the prefill runs eagerly, since this model's compiled prefill "
                          "disagreed with the eager one (see the earlier warning)", stacklevel=2)
        self.compile_prefill = compile_prefill and not untraceable and model not in _PREFILL_DISAGREES
        self.prefill_fn: PrefillFn = compile_prefill_fn() if self.compile_prefill else prefill
        self.caches: list[LayerCache] = []
        self.caches_batch = 0
        self._step_unchecked = True  # the next compiled step may compile (see _compiled_step)
        self.tokens: Optional[Tensor] = None  # [B, max_len] right-padded history
        self.lengths: list[int] = []  # tokens per row so far (host ints: no sync)
        self.input_pos: Optional[Tensor] = None  # [B, 1] position of each row's next token

    @torch.no_grad()
    def prefill(self, idx: Tensor, prompt_lengths: Optional[Sequence[int]] = None) -> Tensor:
        """Start from the prompts ``idx [B, T]`` (``T >= 1``), left-padded: row ``b``'s prompt is
        its last ``prompt_lengths[b]`` tokens (default: all ``T``). Returns the next-token logits
        ``[B, V]``."""
        if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype != torch.long:
            raise ValueError(f"expected a non-empty prompt of token ids, int64 [B, T >= 1]; got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        B, T = idx.shape
        lengths = [T] * B if prompt_lengths is None else [int(n) for n in prompt_lengths]
        if len(lengths) != B or not all(1 <= n <= T for n in lengths):
            raise ValueError(f"prompt_lengths must give one length in [1, {T}] per row of the {B} prompts, "
                             f"got {list(prompt_lengths)}")
        self.tokens = idx.new_zeros(B, max(self.max_len, T))
        pad = torch.tensor([T - n for n in lengths], device=idx.device)
        self.tokens[:, :T] = idx.gather(1, (torch.arange(T, device=idx.device) + pad[:, None]) % T)
        self.lengths = lengths
        self.input_pos = torch.tensor(lengths, device=idx.device)[:, None]
        return self._prefill_window()

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Append ``token [B, 1]`` to every row and return the logits ``[B, V]`` for the next one."""
        if self.tokens is None:
            raise RuntimeError("Decoder.step() before prefill(): give the prompt first")
        if max(self.lengths) >= self.tokens.shape[1]:
            raise ValueError(f"this Decoder was sized for max_len={self.max_len} tokens per row; make a new one")
        pos = self.input_pos
        self.tokens.scatter_(1, pos, token)
        self.input_pos = pos + 1
        self.lengths = [n + 1 for n in self.lengths]
        if not (self.use_cache and max(self.lengths) <= self.capacity):
            return self._prefill_window()
        if not self.compile:
            return decode_one_token(self.model, token, pos, self.caches)
        return self._compiled_step(token, pos)

    def _compiled_step(self, token: Tensor, pos: Tensor) -> Tensor:
        """The compiled step; if it cannot be compiled, the eager one after a one-line warning
        with the reason (never silently)."""
        if token.stride() != (1, 1):  # e.g. a column slice: the compiled step is specialised to strides
            token = token.clone(memory_format=torch.contiguous_format)
        # Past the recompile limit Dynamo raises FailOnRecompileLimitHit under fullgraph (recent
        # torch) or would run eager in silence (torch without that default): both must end in the
        # warned fallback below, not a crash or silence. Only the first step on a set of caches
        # can compile (later ones pass the same shapes and buffers), so only it runs with the hard
        # failure switched on; the rest skip the config patch, a few percent of a graph replay.
        try:
            with _fail_on_recompile_limit() if self._step_unchecked else contextlib.nullcontext():
                logits = self.step_fn(self.model, token, pos, self.caches)
            self._step_unchecked = False
        except COMPILE_ERRORS as error:  # raised while compiling, before any cache is written
            warnings.warn(f"the decoding step of {'/'.join(sorted(set(self.model.layer_types)))} cannot be compiled "
                          f"({compile_error_reason(error)}); decoding eagerly", stacklevel=3)
            self.compile, self.step_fn = False, decode_one_token
            return decode_one_token(self.model, token, pos, self.caches)
        # A CUDA graph's output lives in its static pool and is overwritten by the next replay.
        return logits.clone()

    def _prefill_window(self) -> Tensor:
        """Prefill each row's last ``max_context`` tokens, into the caches while the next token
        still fits them (module docstring: the context window)."""
        lengths = [min(n, self.window) for n in self.lengths]
        width = max(lengths)
        caches = self._caches(len(lengths)) if self.use_cache and max(self.lengths) < self.capacity else None
        if caches is not None and self.compile_prefill:
            return self._compiled_prefill(lengths, caches)
        starts = torch.tensor([n - m for n, m in zip(self.lengths, lengths)], device=self.tokens.device)
        index = (starts[:, None] + torch.arange(width, device=starts.device)).clamp(max=self.tokens.shape[1] - 1)
        context = self.tokens.gather(1, index)
        padded = torch.tensor(lengths, device=context.device) if min(lengths) < width else None
        return prefill(self.model, context, padded, caches)

    def _compiled_prefill(self, lengths: list[int], caches: list[LayerCache]) -> Tensor:
        """The compiled prefill of every row's tokens (all of them: the caches hold whole rows),
        right-padded to the width bucket (:func:`prefill_width`); ``lengths`` is always passed, so
        a batch of equal prompts and one of uneven prompts share a graph. If it cannot be
        compiled: the eager prefill after a one-line warning with the reason (never silently);
        the eager prefill rewrites every cache slot a step reads, whatever a failed call left. The
        first call of each (width, batch) of a model is checked against the eager prefill
        (module docstring)."""
        width = prefill_width(max(lengths), self.capacity)
        context = self.tokens[:, :width].contiguous()  # a fresh [B, width] tensor: the same strides for every decoder
        rows = torch.tensor(lengths, device=context.device)
        checked = _PREFILL_CHECKED.setdefault(self.model, set())
        shape = (width, len(lengths))
        eager = None if shape in checked else prefill(self.model, context, rows, caches)  # the check's reference
        try:
            with _fail_on_recompile_limit():
                logits = self.prefill_fn(self.model, context, rows, caches)  # rewrites the caches
        except COMPILE_ERRORS as error:
            warnings.warn(f"the prefill of {'/'.join(sorted(set(self.model.layer_types)))} cannot be compiled "
                          f"({compile_error_reason(error)}); prefilling eagerly", stacklevel=4)
            self.compile_prefill, self.prefill_fn = False, prefill
            return prefill(self.model, context, rows, caches)
        if eager is None:
            return logits
        checked.add(shape)
        if not prefill_disagrees(logits, eager):
            return logits
        _PREFILL_DISAGREES.add(self.model)
        self.compile_prefill, self.prefill_fn = False, prefill
        warnings.warn(f"the compiled prefill of {'/'.join(sorted(set(self.model.layer_types)))} disagrees with "
                      f"the eager prefill (width {width}, batch {len(lengths)}); prefilling this model eagerly "
                      "from now on", stacklevel=4)
        return prefill(self.model, context, rows, caches)

    def _caches(self, batch: int) -> list[LayerCache]:
        """The caches, allocated at the first prefill of a batch size and reused (prefill rewrites
        every slot a later step reads), so a compiled step keeps its buffers' addresses."""
        if self.caches_batch != batch:
            self.caches = self.model.new_caches(batch, self.capacity)
            self.caches_batch = batch
            self._step_unchecked = True  # new buffers: the next compiled step may compile (and is captured anew)
        return self.caches

    def cache_nbytes(self) -> int:
        """Bytes held by the decoding caches of all layers (0 without caches)."""
        return sum(cache.nbytes() for cache in self.caches)

    def stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
               prompt_lengths: Optional[Sequence[int]] = None) -> Iterator[Tensor]:
        """Yield ``max_new_tokens`` sampled tokens ``[B, 1]`` (device tensors, never read here)
        one at a time, continuing the left-padded prompts ``idx``.

        The model runs in eval mode (no dropout) while the generator is alive; its previous mode
        is restored when the generator finishes or is closed.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.prefill(idx, prompt_lengths) if max_new_tokens else None
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)
                yield token
                if i + 1 < max_new_tokens:
                    logits = self.step(token)
        finally:
            self.model.train(was_training)
