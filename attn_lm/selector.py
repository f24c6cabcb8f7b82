"""Pick an attention mechanism for a use case, within a memory budget.

``AttentionSelector().select_for_scenario("long_context", seq_len=16384, memory_constraint=2048)``
returns the :class:`~attn_lm.config.AttentionConfig` of the chosen (causal) mechanism;
``explain()`` says why and lists every candidate with its memory and, when profiled, latency.

Candidates are all registered self-attention mechanisms with their default options (or the
``candidates`` / ``options`` given), sorted into *kinds* by the family base class they build on:

* ``exact_full``   — exact softmax over the whole causal context, every head with its own keys
  and values (full, sdpa, flash, flash_v1/v2);
* ``shared_kv``    — the same with key/value heads shared by groups of query heads (GQA, MQA):
  a smaller KV cache, but a different (smaller) model;
* ``exact_sparse`` — exact softmax restricted to a sparse pattern (sliding window, BigBird...);
* ``kernel``       — kernelized linear attention (linear, performer, cosformer);
* ``low_rank``     — compressed keys/values (linformer, nystrom);
* ``other``        — anything else (memory modelled as quadratic, to stay on the safe side).

Rules per scenario (:data:`SCENARIOS`): the first tier of kinds, in the scenario's order, that
has a candidate within ``memory_constraint`` wins; within it the scenario's objective decides:

* ``training`` (forward + backward): exact full-context attention; fastest measured forward +
  backward when profiled, else the fused kernels in the order flash > sdpa > full. Then shared
  K/V heads, sparse, low-rank, kernelized.
* ``inference`` (forward + a decoding cache of ``seq_len`` tokens): exact full-context attention
  with or without shared K/V heads, the smallest KV cache first (so GQA/MQA), then fastest.
* ``long_context`` (forward + backward): sub-quadratic exact sparse patterns, then kernelized,
  then low-rank, then full attention; the lowest memory within the tier.
* ``memory_limited`` (forward + backward): the lowest-memory mechanism of any kind; exact ones
  win ties.

Memory of a candidate — the same quantity :class:`~attn_lm.profiler.AttentionProfiler` measures
(peak extra memory of one step; weights and input not counted), plus the cache for inference:

* ``profile=True``: measured on ``device`` (few iterations); a mechanism whose *measured* memory
  exceeds ``memory_constraint`` is never picked.
* ``profile=False``: the analytic model below, in elements times bytes per element ``e``, for
  batch ``B``, length ``T``, width ``d``, ``H`` query heads, ``Hkv`` key/value heads of size
  ``D``::

      projections   P = B T ((H + 2 Hkv) D + H D + d)        qkv, attention output, output
      forward       P e + copies * core
      fwd + bwd     2 P e + copies * core + B T d e + params e
                    (activations and their gradients, the input and weight gradients)
      core (per family; ``k`` = keys a query sees under the pattern, sampled on 256 rows):
        exact, fused kernel (full pattern; FlexAttention for sparse ones on GPU):
                    B H T e           per-row softmax statistics (logsumexp), O(T)
        exact sparse on CPU:  3 T^2 e + T^2   the dense additive bias of the pattern, its copy
                                              and its boolean mask, shared by batch and heads
        flash_v1 with backward: B H T k e     autograd keeps every computed tile, O(T k)
        kernel:     B H (T C + 2 T F + (T / C) F D) max(e, 4)
                    chunk scores, query/key features, chunk states (computed in >= float32)
        low_rank:   B H T (C + (T / C) p) e   each query scores its chunk and all summaries
        matrix state (retention, gla): B H (T C + 2 (T / C) D^2 + 2 T D) max(e, 4)
                    chunk scores, the state before every chunk, float32 copies of q/k/v;
                    deltanet: B H (3 T C + 2 (T / C) D^2 + 4 T D) max(e, 4) (its scores, chunk
                    decays and triangular system, and the pseudo-values u, w)
        other:      B H T^2 e               assumed quadratic
      copies = 1 for the fused kernels and the sparse bias (counted in full above), else 3:
      a materialised score-like tensor coexists with its normalised / multiplied temporaries
      and, with backward, its gradient (3 matches CPU measurements of these families to
      within about 30%, erring high).
      cache (inference) = ``layer.new_cache(B, T).nbytes()`` built on the meta device (exact).

The model is coarse (it ignores allocator rounding and kernel workspaces) but has the right
order for each family; ``profile=True`` replaces it by measurements on the target device.
"""
from __future__ import annotations


from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from .attention import AttentionFactory
from .attention.base import Attention, SoftmaxAttention
from .attention.flash_blockwise import FlashV1Attention
from .attention.deltanet import DeltaNetAttention
from .attention.kernelized import KernelizedAttention
from .attention.lowrank import ChunkedLowRankAttention
from .attention.retention import MatrixStateAttention
from .config import AttentionConfig
from .profiler import AttentionProfiler, build_layer, resolve_device

KINDS = ("exact_full", "shared_kv", "exact_sparse", "kernel", "low_rank", "other")


@dataclass(frozen=True)
class Scenario:
    """A use case: which workload is measured, which kinds are preferred, what decides within a tier."""

    name: str
    rule: str
    backward: bool
    #: Tiers of kinds in order of preference; kinds in one tier rank equally.
    tiers: tuple[tuple[str, ...], ...]
    objective: str  # "latency", "cache" or "memory"

    def tier(self, kind: str) -> int:
        return next(i for i, tier in enumerate(self.tiers) if kind in tier)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("training", "exact full-context attention, the fastest forward + backward (flash > sdpa > full)",
                 True, (("exact_full",), ("shared_kv",), ("exact_sparse",), ("low_rank",), ("kernel",), ("other",)),
                 "latency"),
        Scenario("inference", "exact full-context attention with the smallest decoding cache (GQA/MQA), then fastest",
                 False, (("exact_full", "shared_kv"), ("exact_sparse",), ("kernel",), ("low_rank",), ("other",)),
                 "cache"),
        Scenario("long_context", "sub-quadratic exact sparse attention, then kernelized, then low-rank; least memory",
                 True, (("exact_sparse",), ("kernel",), ("low_rank",), ("exact_full", "shared_kv"), ("other",)),
                 "memory"),
        Scenario("memory_limited", "the lowest-memory mechanism of any kind (exact ones win ties)",
                 True, (KINDS,), "memory"),
    )
}
#: Live copies of a materialised score-like tensor at the peak (see the module docstring).
MATERIALISED_COPIES = 3
#: Tie-break among otherwise equal candidates: fused kernels first.
PREFERRED = ("flash", "sdpa", "full")


def kind_of(layer: Attention) -> str:
    """Which of :data:`KINDS` a layer belongs to (by the family base class it builds on)."""
    if isinstance(layer, SoftmaxAttention) and layer.exact:  # not diff: softmax maps, but not one softmax
        if not layer.pattern.is_full:
            return "exact_sparse"
        return "shared_kv" if layer.n_kv_heads < layer.n_heads else "exact_full"
    if isinstance(layer, KernelizedAttention):
        return "kernel"
    if isinstance(layer, ChunkedLowRankAttention):
        return "low_rank"
    return "other"


def keys_per_query(layer: SoftmaxAttention, seq_len: int, rows: int = 256) -> float:
    """Mean number of keys a query may attend to under the layer's pattern (causal, absolute
    positions), from ``rows`` evenly spaced query positions (``rows x seq_len`` booleans)."""
    q = torch.linspace(0, seq_len - 1, min(rows, seq_len)).long()
    return layer.pattern.dense(q, torch.arange(seq_len)).sum(-1).double().mean().item()


def analytic_memory_bytes(layer: Attention, batch: int, seq_len: int, dtype: torch.dtype, backward: bool,
                          device: torch.device) -> float:
    """Peak extra memory of one step of ``layer`` under the model of the module docstring."""
    B, T, e = batch, seq_len, torch.finfo(dtype).bits // 8
    H, Hkv, D, d = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.config.d_model
    projections = B * T * ((H + 2 * Hkv) * D + H * D + d)
    core, fused = _core_bytes(layer, B, T, e, backward, device)
    core = core if fused else MATERIALISED_COPIES * core
    if not backward:
        return projections * e + core
    params = sum(p.numel() for p in layer.parameters())
    return 2 * projections * e + core + B * T * d * e + params * e


def _core_bytes(layer: Attention, B: int, T: int, e: int, backward: bool, device: torch.device) -> tuple[float, bool]:
    """The family term of the model and whether it is counted in full already (fused kernels,
    the sparse bias) rather than a materialised tensor with temporaries."""
    H, D = layer.n_heads, layer.head_dim
    kind = kind_of(layer)
    if isinstance(layer, FlashV1Attention) and backward:
        return B * H * T * keys_per_query(layer, T) * e, False
    if kind in ("exact_full", "shared_kv") or (kind == "exact_sparse" and device.type == "cuda"):
        return float(B * H * T * e), True
    if kind == "exact_sparse":
        return 3.0 * T * T * e + T * T, True
    if kind == "kernel":
        C, F = min(layer.opt("chunk_size"), T), layer.feature_dim
        return B * H * (T * C + 2 * T * F + (T / C) * F * D) * max(e, 4), False
    if isinstance(layer, MatrixStateAttention):  # chunk scores, chunk states, float32
        C = min(layer.opt("chunk_size"), T)
        if isinstance(layer, DeltaNetAttention):  # scores, decays and the triangular system; u, w
            return B * H * (3 * T * C + 2 * (T / C) * D * D + 4 * T * D) * max(e, 4), False
        return B * H * (T * C + 2 * (T / C) * D * D + 2 * T * D) * max(e, 4), False
    if kind == "low_rank":
        C, p = min(layer.chunk_size, T), layer.summary_len
        return B * H * T * (C + (T / C) * p) * e, False
    return float(B * H * T * T * e), False


def cache_bytes(layer: Attention, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the layer's decoding cache for ``seq_len`` tokens (allocated on the meta device)."""
    return layer.new_cache(batch, seq_len, dtype, "meta").nbytes()


@dataclass
class Candidate:
    """One mechanism as the selector saw it."""

    name: str
    kind: str
    config: AttentionConfig
    memory_mb: float
    memory_source: str  # "measured" or "analytic"
    cache_mb: float = 0.0
    latency_ms: Optional[float] = None
    fits: bool = True

    def row(self, with_cache: bool) -> str:
        cache = f" + cache {self.cache_mb:>8.1f} MB" if with_cache else ""
        latency = "" if self.latency_ms is None else f"  {self.latency_ms:>8.2f} ms"
        return (f"  {self.name:<12} {self.kind:<12} {self.memory_mb:>10.1f} MB ({self.memory_source}){cache}"
                f"{latency}{'' if self.fits else '  OVER BUDGET'}")


@dataclass
class Selection:
    """The outcome of :meth:`AttentionSelector.select_for_scenario`."""

    scenario: Scenario
    chosen: Candidate
    candidates: list[Candidate]
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why it was not a candidate
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def explanation(self) -> str:
        s, c = self.scenario, self.chosen
        budget = self.settings["memory_constraint"]
        lines = [
            f"scenario {s.name!r} ({'forward + backward' if s.backward else 'forward + decoding cache'}; "
            + ", ".join(f"{k}={v}" for k, v in self.settings.items() if k != "memory_constraint") + ")",
            f"rule: {s.rule}",
            f"chose {c.name!r} ({c.kind}): memory {c.memory_mb:.1f} MB ({c.memory_source})"
            + (f" + cache {c.cache_mb:.1f} MB" if c.cache_mb else "")
            + ("" if budget is None else f" within the {budget:.1f} MB budget")
            + ("" if c.latency_ms is None else f", {c.latency_ms:.2f} ms per step (measured)"),
            "candidates, best first (memory per step" + (" + decoding cache" if not s.backward else "")
            + ("; latency per step, measured" if self.settings["profile"] else "") + "):",
            *(cand.row(with_cache=not s.backward) for cand in self.candidates),
        ]
        lines += [f"  {name:<12} not a candidate: {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


class AttentionSelector:
    """Chooses a mechanism per scenario (rules and memory model: see the module docstring).

    ``candidates``: mechanism names to consider (default: every registered self-attention
    mechanism). ``options``: per-mechanism :class:`AttentionConfig` fields, e.g.
    ``{"local": {"window_size": 512}}``. ``iterations``: timed iterations per candidate when
    profiling.
    """

    def __init__(self, candidates: Optional[Sequence[str]] = None,
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None, iterations: int = 5):
        self.candidates = list(candidates) if candidates is not None else AttentionFactory.names()
        self.options = {name: dict(opts) for name, opts in (options or {}).items()}
        self.iterations = iterations
        self.last: Optional[Selection] = None

    def select_for_scenario(
        self,
        scenario: str,
        seq_len: int,
        memory_constraint: Optional[float] = None,
        batch_size: int = 1,
        d_model: int = 512,
        n_heads: int = 8,
        profile: bool = False,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
    ) -> AttentionConfig:
        """The causal :class:`AttentionConfig` chosen for ``scenario`` (one of :data:`SCENARIOS`).

        ``memory_constraint`` (MB) bounds the candidate's memory (measured with ``profile=True``,
        analytic otherwise); ``ValueError`` when no candidate fits, with every candidate's memory.
        """
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
        spec = SCENARIOS[scenario]
        device = resolve_device(device)
        settings = {"seq_len": seq_len, "batch_size": batch_size, "d_model": d_model, "n_heads": n_heads,
                    "dtype": str(dtype).removeprefix("torch."), "device": str(device), "profile": profile,
                    "memory_constraint": memory_constraint}
        rejected: dict[str, str] = {}
        candidates = []
        for name in self.candidates:
            try:
                candidates.append(self._candidate(name, spec, seq_len, batch_size, d_model, n_heads, profile,
                                                  device, dtype))
            except ValueError as err:  # the mechanism cannot be built with these settings
                rejected[name] = str(err)
        for cand in candidates:
            cand.fits = memory_constraint is None or cand.memory_mb + cand.cache_mb <= memory_constraint
        fitting = [c for c in candidates if c.fits]
        if not fitting:
            table = "\n".join(c.row(with_cache=not spec.backward) for c in candidates)
            raise ValueError(
                f"no attention mechanism fits memory_constraint={memory_constraint} MB for scenario {scenario!r} "
                f"(seq_len={seq_len}, batch_size={batch_size}, d_model={d_model}, n_heads={n_heads}); "
                f"candidates:\n{table}\nraise the constraint, or lower seq_len / batch_size"
            )
        chosen = min(fitting, key=lambda c: self._rank(spec, c))
        self.last = Selection(spec, chosen, sorted(candidates, key=lambda c: self._rank(spec, c)), rejected, settings)
        return chosen.config

    def explain(self) -> str:
        """Why the last :meth:`select_for_scenario` chose what it chose."""
        if self.last is None:
            raise RuntimeError("nothing selected yet: call select_for_scenario(...) first")
        return self.last.explanation

    # ----------------------------------------------------------------- internals
    def _candidate(self, name: str, spec: Scenario, seq_len: int, batch: int, d_model: int, n_heads: int,
                   profile: bool, device: torch.device, dtype: torch.dtype) -> Candidate:
        options = self.options.get(name, {})
        layer = build_layer(name, d_model, n_heads, seq_len, **options)
        if layer.uses_context:
            raise ValueError("cross-attention reads keys/values from a context tensor; not a self-attention choice")
        cache_mb = cache_bytes(layer, batch, seq_len, dtype) / 2**20 if not spec.backward else 0.0
        if profile:
            measured = AttentionProfiler.profile_attention(
                name, batch_size=batch, seq_len=seq_len, num_iterations=self.iterations, d_model=d_model,
                n_heads=n_heads, dtype=dtype, device=device, backward=spec.backward, warmup=1, **options)
            memory_mb, source, latency = measured["memory_mb"], "measured", measured["avg_latency_ms"]
        else:
            memory_mb = analytic_memory_bytes(layer, batch, seq_len, dtype, spec.backward, device) / 2**20
            source, latency = "analytic", None
        return Candidate(layer.name, kind_of(layer), layer.config, memory_mb, source, cache_mb, latency)

    @staticmethod
    def _rank(spec: Scenario, cand: Candidate) -> tuple:
        """Sort key: preferred kind first, then the scenario's objective, then the tie-breaks."""
        tier = spec.tier(cand.kind)
        preferred = PREFERRED.index(cand.name) if cand.name in PREFERRED else len(PREFERRED)
        speed = (cand.latency_ms if cand.latency_ms is not None else 0.0, preferred)
        memory = cand.memory_mb + cand.cache_mb
        exactness = KINDS.index(cand.kind)
        if spec.objective == "latency":
            return (tier, *speed, memory)
        if spec.objective == "cache":
            return (tier, cand.cache_mb, *speed, memory)
        return (tier, memory, exactness, *speed)
