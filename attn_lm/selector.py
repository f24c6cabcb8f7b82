"""Pick an attention mechanism for a use case, within a memory budget.

``AttentionSelector().select_for_scenario("long_context", seq_len=16384, memory_constraint=2048)``
returns the :class:`~attn_lm.config.AttentionConfig` of the chosen (causal) mechanism;
``explain()`` says why and lists every candidate with its memory and, when profiled, latency.

Candidates are all registered self-attention mechanisms with their default options (or the
``candidates`` / ``options`` given). The rules read what each mechanism's family declares
(:class:`~attn_lm.attention.base.Attention`: ``exact``, ``quadratic``, shared key/value heads) and
its family's cost model, never mechanism names, so a new mechanism is a candidate in the right
tier with no edit here. Tiers, from the layer's declarations:

* ``exact dense``   — exact softmax over the whole causal context, every head with its own keys
  and values (full, sdpa, flash_v1/v2);
* ``exact shared``  — the same with key/value heads shared by groups of query heads (GQA, MQA):
  a smaller KV cache, but a different (smaller) model;
* ``exact sparse``  — exact softmax restricted to a pattern whose fused path is sub-quadratic
  (sliding window, BigBird...);
* ``sub-quadratic`` — approximations linear or near-linear in the length (kernelized, low-rank,
  recurrent state);
* ``any``           — the rest (quadratic approximations such as diff and mla).

Rules per scenario (:data:`SCENARIOS`): the first tier, in the scenario's order, that has a
candidate within ``memory_constraint`` wins; within it the scenario's objective decides:

* ``training`` (forward + backward): exact dense attention; fastest measured forward + backward
  when profiled, else mechanisms that compile into one graph first, in registration order. Then
  shared K/V heads, sparse, sub-quadratic approximations.
* ``inference`` (forward + a decoding cache of ``seq_len`` tokens): exact full-context attention
  with or without shared K/V heads, the smallest KV cache first (so GQA/MQA), then fastest.
* ``long_context`` (forward + backward): exact sparse patterns, then sub-quadratic
  approximations, then full attention; the lowest memory within the tier.
* ``memory_limited`` (forward + backward): the lowest-memory mechanism of any kind; exact ones
  win ties.

Memory of a candidate — the same quantity :class:`~attn_lm.profiler.AttentionProfiler` measures
(peak extra memory of one step; weights and input not counted), plus the cache for inference:

* ``profile=True``: measured on ``device`` (few iterations); a mechanism whose *measured* memory
  exceeds ``memory_constraint`` is never picked.
* ``profile=False``: the analytic model, in elements times bytes per element ``e``, for batch
  ``B``, length ``T``, width ``d``, ``H`` query heads, ``Hkv`` key/value heads of size ``D``::

      projections   P = B T ((H + 2 Hkv) D + H D + d)        qkv, attention output, output
      CPU path      forward    P e + core
                    fwd + bwd  2 P e + core + B T d e + params e
                               (activations and their gradients, the input and weight gradients)
      fused path    forward    B T (H + 2 Hkv) D e + B T H D e + max(core, B T d e)
                    fwd + bwd  2 P e + core + |W_out| e

  with ``core`` the family's own model, ``layer.core_bytes(B, T, e, backward, fused)`` (see each
  family). ``fused`` models the fused GPU path (FlexAttention's ``BlockMask`` for sparse patterns:
  no ``T x T`` tensor) when ``device`` is a GPU or not given — the path the mechanisms are built
  for — and the CPU path (a sparse pattern as a dense mask) for ``device="cpu"``.

  The fused path's terms are derived from what a step holds, not fitted. A forward under
  ``no_grad`` holds ``qkv`` (``forward``'s locals) and the core's output; the core's temporaries
  are freed when it returns, before the output projection allocates ``B T d``, so the two meet in
  a ``max``. With backward the peak is inside the core's backward: alive are ``qkv`` (the core
  saved views of it), the core's output (saved by the output projection and by fused kernels), the
  layer's output and the gradient it is seeded with (``2 B T d``), the output projection's input
  gradient (``B T H D``) and weight gradient, and the core's input gradients (``B T (H + 2 Hkv)
  D``); the input and QKV weight gradients come later, after the core's saved tensors are freed,
  and the split's concatenated gradient (``B T (H + 2 Hkv) D`` more) only once the core's
  workspace is gone. ``core`` is what the core holds beyond that at its backward's peak (saved
  statistics, fused kernels' workspaces, fp32 copies). The CPU path keeps the coefficients
  measured on CPU (its kernels and their buffers differ).
  ``tests/test_selector_profiler.py`` checks every family's model against CPU measurements.
  Cache (inference) = ``layer.new_cache(B, T).nbytes()`` built on the meta device (exact).

The model ignores allocator rounding and kernel workspaces; ``profile=True`` replaces it by
measurements on the target device.
"""
from __future__ import annotations


from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .attention import AttentionFactory
from .attention.base import Attention
from .config import AttentionConfig
from .profiler import AttentionProfiler, build_layer, resolve_device


def _dense(layer: Attention) -> bool:
    return layer.exact and layer.quadratic and layer.n_kv_heads == layer.n_heads


def _shared(layer: Attention) -> bool:
    return layer.exact and layer.quadratic and layer.n_kv_heads < layer.n_heads


def _sparse(layer: Attention) -> bool:
    return layer.exact and not layer.quadratic


def _subquadratic(layer: Attention) -> bool:
    return not layer.exact and not layer.quadratic


#: Tiers of the rules, each a test of what a layer's family declares (module docstring).
TIERS: dict[str, Callable[[Attention], bool]] = {
    "exact dense": _dense, "exact shared": _shared, "exact sparse": _sparse, "sub-quadratic": _subquadratic,
    "any": lambda layer: True,
}


@dataclass(frozen=True)
class Scenario:
    """A use case: which workload is measured, which tiers are preferred, what decides within a tier."""

    name: str
    rule: str
    backward: bool
    #: Tiers (names of :data:`TIERS`) in order of preference; tiers in one group rank equally.
    tiers: tuple[tuple[str, ...], ...]
    objective: str  # "latency", "cache" or "memory"

    def tier(self, layer: Attention) -> int:
        return next(i for i, group in enumerate(self.tiers) if any(TIERS[t](layer) for t in group))


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("training", "exact dense attention, the fastest forward + backward (one-graph kernels first)",
                 True, (("exact dense",), ("exact shared",), ("exact sparse",), ("sub-quadratic",), ("any",)),
                 "latency"),
        Scenario("inference", "exact full-context attention with the smallest decoding cache (GQA/MQA), then fastest",
                 False, (("exact dense", "exact shared"), ("exact sparse",), ("sub-quadratic",), ("any",)), "cache"),
        Scenario("long_context", "exact sparse attention, then sub-quadratic approximations, then full; least memory",
                 True, (("exact sparse",), ("sub-quadratic",), ("exact dense", "exact shared"), ("any",)), "memory"),
        Scenario("memory_limited", "the lowest-memory mechanism of any kind (exact ones win ties)",
                 True, (("any",),), "memory"),
    )
}


def analytic_memory_bytes(layer: Attention, batch: int, seq_len: int, dtype: torch.dtype, backward: bool,
                          fused: bool) -> float:
    """Peak extra memory of one step of ``layer`` under the model of the module docstring."""
    B, T, e = batch, seq_len, torch.finfo(dtype).bits // 8
    H, Hkv, D, d = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.dims.d_model
    qkv, heads, out = B * T * (H + 2 * Hkv) * D, B * T * H * D, B * T * d
    core = layer.core_bytes(B, T, e, backward, fused)
    if fused:
        if not backward:
            return (qkv + heads) * e + max(core, out * e)
        return 2 * (qkv + heads + out) * e + core + sum(p.numel() for p in layer.out.parameters()) * e
    if not backward:
        return (qkv + heads + out) * e + core
    params = sum(p.numel() for p in layer.parameters())
    return 2 * (qkv + heads + out) * e + core + out * e + params * e


def cache_bytes(layer: Attention, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the layer's decoding cache for ``seq_len`` tokens (allocated on the meta device)."""
    return layer.new_cache(batch, seq_len, dtype, "meta").nbytes()


@dataclass
class Candidate:
    """One mechanism as the selector saw it."""

    name: str
    family: str
    config: AttentionConfig
    memory_mb: float
    memory_source: str  # "measured" or "analytic"
    cache_mb: float = 0.0
    latency_ms: Optional[float] = None
    fits: bool = True
    #: Index of the scenario's tier group the layer falls in (0 = most preferred).
    tier: int = 0
    exact: bool = True
    #: Traces into one graph (``compile_unsupported is None``): the fused kernels, not teaching code.
    compiles: bool = True
    #: Registration order (the last tie-break).
    order: int = 0

    def row(self, with_cache: bool) -> str:
        cache = f" + cache {self.cache_mb:>8.1f} MB" if with_cache else ""
        latency = "" if self.latency_ms is None else f"  {self.latency_ms:>8.2f} ms"
        return (f"  {self.name:<12} {self.family:<15} {self.memory_mb:>10.1f} MB ({self.memory_source}){cache}"
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
            f"chose {c.name!r} ({c.family}): memory {c.memory_mb:.1f} MB ({c.memory_source})"
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
    mechanism). ``options``: per-mechanism options (flat, as in Hydra), e.g.
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
        # Analytic estimates without a device model the fused GPU path the mechanisms are built for.
        device = resolve_device(device) if profile or device is not None else torch.device("cuda")
        settings = {"seq_len": seq_len, "batch_size": batch_size, "d_model": d_model, "n_heads": n_heads,
                    "dtype": str(dtype).removeprefix("torch."),
                    "device": str(device) + ("" if profile else " (analytic model)"), "profile": profile,
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
            fused = device.type == "cuda"
            memory_mb = analytic_memory_bytes(layer, batch, seq_len, dtype, spec.backward, fused) / 2**20
            source, latency = "analytic", None
        return Candidate(layer.name, layer.family, layer.config, memory_mb, source, cache_mb, latency,
                         tier=spec.tier(layer), exact=layer.exact, compiles=layer.compile_unsupported is None,
                         order=AttentionFactory.names().index(layer.name))

    @staticmethod
    def _rank(spec: Scenario, cand: Candidate) -> tuple:
        """Sort key: preferred tier first, then the scenario's objective, then the tie-breaks."""
        speed = (cand.latency_ms if cand.latency_ms is not None else 0.0, not cand.compiles, cand.order)
        memory = cand.memory_mb + cand.cache_mb
        if spec.objective == "latency":
            return (cand.tier, *speed, memory)
        if spec.objective == "cache":
            return (cand.tier, cand.cache_mb, *speed, memory)
        return (cand.tier, memory, not cand.exact, *speed)
