"""Compare finished runs: ``python scripts/compare.py <multirun dir | run dirs...> [--out DIR]``
(console script ``attn-lm-compare``).

Reads every run directory below the given paths (a directory with ``results.json`` or Hydra's
``.hydra/``), groups the runs by their per-layer mechanisms and sequence length (plus any other
setting that differs between them, except the seed), and writes into ``--out``:

* ``report.md``   — one row per group: parameters, validation / test perplexity as mean ± standard
  deviation over seeds, per the tokenizer's unit (byte, char, word or BPE token: the ``unit``
  column), bits per that unit, training tokens/s, step time, peak memory, wall time, budget; then the runs that
  failed or never ran, and the plots;
* ``summary.csv`` — the same numbers per group (means and standard deviations), ``runs.csv`` —
  one row per run, failed ones included;
* ``pareto.png``  — quality (perplexity, or accuracy for recall runs) vs training tokens/s, the
  Pareto front (no other group is both faster and better) marked;
* ``val_loss.png`` — validation loss over steps and over training time, from each run's
  ``csv/version_*/metrics.csv`` (time = the sum of the measured step times before each
  evaluation, so evaluation itself is not counted);
* ``seq_len.png`` — peak memory and tokens/s against sequence length per mechanism (when runs
  at several ``data.block_size`` exist; otherwise it says there is only one length).

``--wandb`` also logs the table and the plots to Weights & Biases (offline without an API key).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from .budgets import budget_summary, register_resolvers, si

#: Config keys that never distinguish groups (seeds are what groups aggregate over).
IGNORED_KEYS = ("seed", "data.seed", "skip_completed", "compare.kernel_variants", "data.cache_dir", "data.num_workers",
                "trainer.enable_progress_bar", "logger.", "hydra.")


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    get: Callable[[dict], Optional[float]]
    fmt: str
    higher_is_better: bool = False


def _test(name: str) -> Callable[[dict], Optional[float]]:
    return lambda r: (r.get("test_metrics") or {}).get(f"test/{name}")


METRICS = (
    Metric("val_acc", "val accuracy", lambda r: (r.get("val_metrics") or {}).get("val/accuracy"), "{:.3f}", True),
    Metric("test_acc", "test accuracy", _test("accuracy"), "{:.3f}", True),
    Metric("val_ppl", "val ppl", lambda r: r.get("val_ppl"), "{:.2f}"),
    Metric("test_ppl", "test ppl", _test("ppl"), "{:.2f}"),
    Metric("test_bits", "test bits/unit", lambda r: _test(f"bits_per_{r.get('unit')}")(r), "{:.3f}"),
    Metric("tokens_per_s", "train tokens/s", lambda r: r.get("tokens_per_s"), "{:,.0f}"),
    Metric("step_ms", "step ms", lambda r: r.get("step_ms"), "{:.1f}"),
    Metric("peak_memory_mb", "peak MB", lambda r: r.get("peak_memory_mb"), "{:,.0f}"),
    Metric("wall_time_s", "wall s", lambda r: r.get("wall_time_s"), "{:.1f}"),
)
METRIC = {m.key: m for m in METRICS}


# ----------------------------------------------------------------------------- loading
@dataclass
class Run:
    """A run whose ``results.json`` says ``status: complete``."""

    path: Path
    results: dict
    mechanism: str
    block_size: int
    seed: Any
    flat_config: dict

    def value(self, metric: Metric) -> Optional[float]:
        value = metric.get(self.results)
        return None if value is None or not math.isfinite(float(value)) else float(value)


@dataclass
class FailedRun:
    """A run directory without a complete ``results.json``, or a job of a sweep that never started."""

    path: Optional[Path]
    overrides: list[str]
    reason: str


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return flat


def mechanism_label(layers: Sequence[str]) -> str:
    """``[local, local, full, full]`` -> ``local×2+full×2``; ``[full, full]`` -> ``full``."""
    runs = [(name, len(list(group))) for name, group in groupby(layers)]
    if len(runs) == 1:
        return runs[0][0]
    return "+".join(name if count == 1 else f"{name}×{count}" for name, count in runs)


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Run directories (``results.json`` or ``.hydra/``) at or below ``paths``, sorted."""
    found = set()
    for root in paths:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory (give a multirun directory or run directories)")
        for directory, subdirs, files in os.walk(root):
            if "results.json" in files or ".hydra" in subdirs:
                found.add(Path(directory))
                subdirs[:] = []  # a run's own folders (csv, checkpoints) hold no runs
    return sorted(found)


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def load_run(run_dir: Path) -> Run | FailedRun:
    path = run_dir / "results.json"
    if not path.is_file():
        return FailedRun(run_dir, _overrides(run_dir), "no results.json (failed or interrupted; see its .log file)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return FailedRun(run_dir, _overrides(run_dir), f"unreadable results.json ({err})")
    if results.get("status") != "complete":
        return FailedRun(run_dir, _overrides(run_dir), f"results.json has status {results.get('status')!r}")
    config = results.get("config") or {}
    return Run(run_dir, results, mechanism_label(results["attention"]), int(config["data"]["block_size"]),
               config.get("seed"), flatten(config))


def parse_overrides(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _canonical(overrides: Sequence[str]) -> frozenset:
    """A job's overrides as ``(key, value)`` pairs, so ``x=False`` (how Hydra saves a job's
    overrides) equals ``x=false`` (how it was typed)."""
    return frozenset((o.get_key_element(), json.dumps(o.value(), sort_keys=True, default=str))
                     for o in parse_overrides(overrides))


def sweep_jobs(params: Mapping[str, Any], overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a basic-sweeper multirun in the order it runs them: the product of
    ``hydra.sweeper.params`` and the command-line ``overrides`` (a key in both takes the command
    line's values at the params' place), the last swept key varying fastest; ``hydra.*`` overrides
    configure the sweep, not its jobs. Hydra's own code, so the order is the one the sweep follows."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    return BasicSweeper.split_arguments([o for o in parsed if not o.is_hydra_override()], None)[0]


def _expected_jobs(multirun_yaml: Path) -> list[list[str]]:
    """The jobs a basic-sweeper multirun was asked for (:func:`sweep_jobs` of its saved config).
    Empty for other sweepers (e.g. Optuna). The presets' swept values may be ``${attn_lm.*}``
    interpolations (compare_all's ``attention``, every registered mechanism), so the resolvers are
    registered first; they resolve against today's registry."""
    register_resolvers()
    saved = OmegaConf.load(multirun_yaml)
    if not str(OmegaConf.select(saved, "hydra.sweeper._target_", default="")).endswith("BasicSweeper"):
        return []
    params = OmegaConf.select(saved, "hydra.sweeper.params", default=None) or {}
    return sweep_jobs(params, [str(o) for o in saved.hydra.overrides.task])


def load_runs(paths: Sequence[Path]) -> tuple[list[Run], list[FailedRun]]:
    """Complete runs, and failed runs plus sweep jobs that never started (no directory)."""
    runs: list[Run] = []
    failed: list[FailedRun] = []
    for run_dir in find_run_dirs(paths):
        loaded = load_run(run_dir)
        (runs if isinstance(loaded, Run) else failed).append(loaded)
    seen = {_canonical(_overrides(r.path)) for r in runs} | {_canonical(f.overrides) for f in failed}
    for root in paths:
        multirun_yaml = Path(root) / "multirun.yaml"
        if multirun_yaml.is_file():
            failed += [FailedRun(None, job, "never started (no run directory)")
                       for job in _expected_jobs(multirun_yaml) if _canonical(job) not in seen]
    return runs, failed


# ----------------------------------------------------------------------------- grouping
@dataclass
class Group:
    """Runs that differ only in their seed."""

    mechanism: str
    block_size: int
    extras: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    pareto: bool = False

    @property
    def label(self) -> str:
        return _label(self.mechanism, self.extras)

    def values(self, metric: Metric) -> list[float]:
        return [v for v in (r.value(metric) for r in self.runs) if v is not None]

    def mean(self, metric: Metric) -> Optional[float]:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: Metric) -> Optional[float]:
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None

    def ci(self, metric: Metric) -> Optional[float]:
        """Half-width of the 95% t-interval of the mean over seeds (``None`` with one seed)."""
        return t_halfwidth(self.values(metric))

    def interval(self, metric: Metric) -> Optional[tuple[float, float]]:
        mean, half = self.mean(metric), self.ci(metric)
        return None if mean is None or half is None else (mean - half, mean + half)

    def first(self, key: str) -> Any:
        return self.runs[0].results.get(key)


def _label(mechanism: str, extras: Mapping[str, Any]) -> str:
    extra = ", ".join(f"{k}={_short(v)}" for k, v in extras.items())
    return f"{mechanism} ({extra})" if extra else mechanism


def t_halfwidth(values: Sequence[float], confidence: float = 0.95) -> Optional[float]:
    """``t_{n-1} * s / sqrt(n)``: half-width of the t-interval of the mean of ``values`` (few seeds:
    the t quantile, not the normal one, is what makes 3 seeds' interval honest)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group by (mechanisms, block size), split further by any other differing config value."""
    buckets: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        buckets.setdefault((run.mechanism, run.block_size), []).append(run)
    groups = []
    for (mechanism, block_size), members in buckets.items():
        keys = sorted({k for r in members for k in r.flat_config if not _ignored(k)})
        differing = [k for k in keys if len({json.dumps(r.flat_config.get(k), sort_keys=True) for r in members}) > 1]
        by_extras: dict[str, Group] = {}
        for run in members:
            extras = {k: run.flat_config.get(k) for k in differing}
            key = json.dumps(extras, sort_keys=True)
            by_extras.setdefault(key, Group(mechanism, block_size, extras)).runs.append(run)
        groups += by_extras.values()
    groups.sort(key=lambda g: (g.block_size, g.mechanism, json.dumps(g.extras, sort_keys=True)))
    mark_pareto(groups)
    return groups


def quality_metric(groups: Sequence[Group]) -> Metric:
    """Test perplexity when every group has it, else validation perplexity."""
    test = METRIC["test_ppl"]
    return test if all(g.values(test) for g in groups) else METRIC["val_ppl"]


def mark_pareto(groups: Sequence[Group]) -> None:
    """Flag the groups that no other group *of the same sequence length* beats on both quality (the
    ranking metric: perplexity, lower, or recall accuracy, higher) and tokens/s (higher): runs at
    different lengths are not comparable on either axis."""
    quality, speed = ranking_metric(groups), METRIC["tokens_per_s"]
    sign = -1.0 if quality.higher_is_better else 1.0  # compare "lower is better" throughout
    points = [(g, g.mean(quality), g.mean(speed)) for g in groups]
    points = [(g, sign * q, s) for g, q, s in points if q is not None and s is not None]
    for g, q, s in points:
        g.pareto = not any(q2 <= q and s2 >= s and (q2 < q or s2 > s)
                           for g2, q2, s2 in points if g2.block_size == g.block_size)


# ----------------------------------------------------------------------------- tables
def _cell(group: Group, metric: Metric) -> str:
    mean, half = group.mean(metric), group.ci(metric)
    if mean is None:
        return "-"
    return metric.fmt.format(mean) + ("" if half is None else " ± " + metric.fmt.format(half))


def run_structure(results: Mapping[str, Any]) -> str:
    """The mechanism options a run used (windows, blocks, chunks...), e.g. ``window_size=32``
    (defaults included: the mechanism's options as the run resolved them)."""
    import warnings

    from .attention import AttentionFactory
    from .attention.config import AttnLmDeprecationWarning
    from .config import attention_config_from_dict

    node = (results.get("config") or {}).get("attention") or {}
    try:
        with warnings.catch_warnings():  # old option names of finished runs: nothing to act on here
            warnings.simplefilter("ignore", AttnLmDeprecationWarning)
            options = AttentionFactory.resolve(attention_config_from_dict(node)).option_values()
    except (TypeError, ValueError):  # an old or foreign config: say nothing rather than guess
        return ""
    return ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("backend", "kernel"))


def full_attention_reasons(results: Mapping[str, Any]) -> list[str]:
    """Why a run's layers were plain full attention at its context length (``covers_context``):
    such a row is full attention under another name."""
    from .from_hydra import full_attention_layers, gpt_config

    config = results.get("config") or {}
    try:
        model = gpt_config(OmegaConf.create(config), vocab_size=1)
        return full_attention_layers(model, int(config["data"]["block_size"]))
    except (KeyError, TypeError, ValueError):
        return []


def _present(groups: Sequence[Group]) -> list[Metric]:
    """Metrics that at least one group has (older results.json lack the unit, so their bits)."""
    return [m for m in METRICS if any(g.values(m) for g in groups)]


def run_budget(results: Mapping[str, Any]) -> str:
    """The budget of a run in words, from its config and the process count it recorded (older
    runs: the count its ``trainer.devices``/``num_nodes`` give)."""
    return budget_summary(results["config"], results.get("processes"))["text"]


def summary_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        row = {"mechanism": g.label, "block_size": g.block_size, "seeds": len(g.runs), "params": g.first("params"),
               "pareto": g.pareto}
        for m in METRICS:
            row[f"{m.key}_mean"], row[f"{m.key}_std"], row[f"{m.key}_ci95"] = g.mean(m), g.std(m), g.ci(m)
        row["structure"] = run_structure(g.runs[0].results)
        row["full_attention"] = "; ".join(full_attention_reasons(g.runs[0].results))
        row["peak_memory_kind"] = g.first("peak_memory_kind")
        row["budget"] = run_budget(g.runs[0].results)
        row["device"] = g.first("device")
        rows.append(row)
    return rows


def run_rows(runs: Sequence[Run], failed: Sequence[FailedRun]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        rows.append({"status": "complete", "run_dir": str(r.path), "mechanism": r.mechanism,
                     "block_size": r.block_size, "seed": r.seed, "params": r.results.get("params"),
                     "steps": r.results.get("steps"), "tokens_seen": r.results.get("tokens_seen"),
                     **{m.key: r.value(m) for m in METRICS},
                     "budget": run_budget(r.results), "reason": ""})
    for f in failed:
        rows.append({"status": "failed" if f.path else "missing", "run_dir": str(f.path or ""),
                     "mechanism": " ".join(f.overrides), "reason": f.reason})
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(groups: Sequence[Group]) -> str:
    metrics = _present(groups)
    header = ["#", "mechanism", "T", "sizes", "seeds", "params", "unit", *[m.header for m in metrics], "budget",
              "Pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, g in enumerate(groups, 1):
        full = full_attention_reasons(g.runs[0].results)
        # Red and named: a pattern that covers the context is full attention, not a sparse result.
        label = g.label + (f' <span style="color:red">🔴 full attention ({"; ".join(full)})</span>' if full else "")
        cells = [str(number), label, str(g.block_size), run_structure(g.runs[0].results) or "-", str(len(g.runs)),
                 f"{g.first('params'):,}", str(g.first("unit") or "token"),
                 *[_cell(g, m) for m in metrics], run_budget(g.runs[0].results),
                 "✓" if g.pareto else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking_metric(groups: Sequence[Group]) -> Metric:
    """Accuracy when every group has it (recall tasks: MQAR), else perplexity (:func:`quality_metric`)."""
    for key in ("test_acc", "val_acc"):
        if groups and all(g.values(METRIC[key]) for g in groups):
            return METRIC[key]
    return quality_metric(groups)


def separable(a: Group, b: Group, metric: Metric) -> bool:
    """Whether the 95% intervals of two groups are disjoint (no interval with one seed: not separable)."""
    ia, ib = a.interval(metric), b.interval(metric)
    return ia is not None and ib is not None and (ia[1] < ib[0] or ib[1] < ia[0])


def ranking_lines(groups: Sequence[Group]) -> list[str]:
    """Per sequence length, the groups best first; a rank whose interval overlaps the one above is
    marked "not separable": the seeds do not tell those two apart."""
    metric = ranking_metric(groups)
    degenerate = recall_controls(groups, metric) if metric.higher_is_better else {}
    lines = []
    for length in sorted({g.block_size for g in groups}):
        ranked = sorted((g for g in groups if g.block_size == length and g.mean(metric) is not None),
                        key=lambda g: g.mean(metric), reverse=metric.higher_is_better)
        lines += [f"### T={length}, by {metric.header} ({'higher' if metric.higher_is_better else 'lower'} is better)",
                  ""]
        if degenerate.get(length):
            lines += ["Not a recall ranking: the full-attention control does not solve every cell of this length "
                      "(see the recall section).", ""]
        for rank, (above, g) in enumerate(zip([None, *ranked], ranked), 1):
            note = ""
            if above is not None and not separable(above, g, metric):
                why = "95% intervals overlap" if g.ci(metric) is not None and above.ci(metric) is not None \
                    else "one seed, no interval"
                note = f" — **not separable** from {above.label} ({why})"
            lines.append(f"{rank}. {g.label}: {_cell(g, metric)}{note}")
        lines.append("")
    return lines


def mean_curve(group: Group) -> Optional[tuple[Any, Any]]:
    """Validation loss against training tokens, averaged over the group's seeds at the first run's
    evaluation points (``None`` without curves)."""
    import numpy as np

    per_step = (group.first("budget") or {}).get("tokens_per_step")
    curves = [c for c in (validation_curve(r.path) for r in group.runs) if c is not None]
    if not curves or not per_step:
        return None
    steps = np.asarray(curves[0][0])
    loss = np.mean([np.interp(steps, c[0], c[2]) for c in curves], axis=0)
    return steps * per_step, loss


def last_crossing(a: tuple[Any, Any], b: tuple[Any, Any]) -> Optional[tuple[float, bool]]:
    """Where two curves ``(tokens, loss)`` last cross within their common range, and whether ``a``
    is the lower one after it; ``None`` when they never cross."""
    import numpy as np

    grid = np.union1d(a[0], b[0])
    grid = grid[(grid >= max(a[0][0], b[0][0])) & (grid <= min(a[0][-1], b[0][-1]))]
    if len(grid) < 2:
        return None
    diff = np.interp(grid, *a) - np.interp(grid, *b)
    changes = np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]
    if not changes.size:
        return None
    i = changes[-1]
    tokens = grid[i] + (grid[i + 1] - grid[i]) * diff[i] / (diff[i] - diff[i + 1])
    return float(tokens), bool(diff[-1] < 0)


def crossover_lines(groups: Sequence[Group]) -> list[str]:
    """"X overtakes Y after N tokens" for every pair of groups (same T) whose mean validation curves
    cross: the ranking at the end of the budget is not the ranking all along."""
    from itertools import combinations

    lines = []
    for length in sorted({g.block_size for g in groups}):
        curves = [(g, mean_curve(g)) for g in groups if g.block_size == length]
        for (a, ca), (b, cb) in combinations([(g, c) for g, c in curves if c is not None], 2):
            crossing = last_crossing(ca, cb)
            if crossing is not None:
                winner, loser = (a, b) if crossing[1] else (b, a)
                lines.append(f"- T={length}: {winner.label} overtakes {loser.label} after {si(crossing[0])} tokens")
    return lines


def rope_unsupported() -> dict[str, str]:
    """Registered mechanisms that refuse RoPE, with their reason (comparison presets use RoPE)."""
    from .attention import AttentionFactory
    from .config import AttentionConfig

    reasons = {}
    for name in AttentionFactory.names():
        try:
            AttentionFactory.resolve(AttentionConfig(attention_type=name, position="rope"))
        except ValueError as err:
            reasons[name] = str(err)
    return reasons


def position_lines(groups: Sequence[Group]) -> list[str]:
    used = sorted({str(r.flat_config.get("model.position")) for g in groups for r in g.runs})
    refused = rope_unsupported()
    return [f"Position encodings in these runs (model.position): {', '.join(used)}. Comparison presets use RoPE "
            "(model.position=rope,learned adds the learned-position ablation rows). Mechanisms that cannot take "
            "RoPE: " + ("; ".join(f"{n} ({why})" for n, why in refused.items()) if refused else "none") + ".", ""]


#: The model-width axis of recall sweeps (compare_recall).
WIDTH_KEY = "model.d_model"


def recall_series(groups: Sequence[Group], metric: Metric) -> dict[int, dict[str, list[tuple[int, Group]]]]:
    """``{T: {mechanism label without the width: [(d_model, group), ...]}}`` for groups with ``metric``."""
    series: dict[int, dict[str, list[tuple[int, Group]]]] = {}
    for g in groups:
        width = g.runs[0].flat_config.get(WIDTH_KEY)
        if width is None or g.mean(metric) is None:
            continue
        label = _label(g.mechanism, {k: v for k, v in g.extras.items() if k != WIDTH_KEY})
        series.setdefault(g.block_size, {}).setdefault(label, []).append((int(width), g))
    for lines in series.values():
        for points in lines.values():
            points.sort(key=lambda p: p[0])
    return series


#: Accuracy at which ``full`` attention, the control of a recall cell, counts as solving it (Zoology
#: trains attention to ~1.0 at every width; below this the budget, not the mechanism, is measured).
SOLVED_ACCURACY = 0.9


def recall_controls(groups: Sequence[Group], metric: Metric) -> dict[int, list[str]]:
    """Per sequence length, a warning for each width where ``full`` attention (the control) is
    missing or does not solve the task in every seed: there the accuracies rank how fast
    mechanisms learn in the budget, not whether they can recall (a degenerate cell, or an
    unreliable one when the control's mean clears the bar but a seed of it did not)."""
    warnings: dict[int, list[str]] = {}
    for length, by_label in sorted(recall_series(groups, metric).items()):
        widths = sorted({w for points in by_label.values() for w, _ in points})
        for width in widths:
            controls = [g for points in by_label.values() for w, g in points if w == width and g.mechanism == "full"]
            if not controls:
                why = "no `full` row, so nothing shows that this budget lets attention recall (add attention=full)"
            else:
                best = max(controls, key=lambda g: g.mean(metric))
                seeds = best.values(metric)
                solved = sum(v >= SOLVED_ACCURACY for v in seeds)
                per_seed = (f"; per seed {', '.join(f'{v:.3f}' for v in seeds)}: solved in {solved} of {len(seeds)}"
                            if len(seeds) > 1 else "")
                if best.mean(metric) < SOLVED_ACCURACY:
                    why = (f"**degenerate**: `full`, the control, reaches only {best.mean(metric):.3f} "
                           f"(< {SOLVED_ACCURACY}{per_seed}), so this budget does not let attention recall and the "
                           "cell ranks learning speed, not recall; lengthen budget.steps or tune optim.lr before "
                           "reading it")
                elif solved < len(seeds):
                    why = (f"**unreliable**: `full`, the control, averages {best.mean(metric):.3f} but not every "
                           f"seed solved the task{per_seed}, so in the others the budget ranked learning speed, "
                           "not recall; lengthen budget.steps before reading the ranking as recall")
                else:
                    continue
            warnings.setdefault(length, []).append(f"- T={length}, d_model={width}: {why}.")
    return warnings


def recall_table(groups: Sequence[Group]) -> list[str]:
    """Accuracy per mechanism (rows) and model width (columns), one block per sequence length,
    then :func:`recall_controls`' warnings."""
    metric = ranking_metric(groups)
    series = recall_series(groups, metric)
    widths = sorted({w for lines in series.values() for points in lines.values() for w, _ in points})
    if not metric.higher_is_better or not series:
        return []
    lines = [f"## Recall: {metric.header} against model width", "",
             "| mechanism | T | " + " | ".join(f"d_model={w}" for w in widths) + " |", "|---|---|" + "---|" * len(widths)]
    for length, by_label in sorted(series.items()):
        for label, points in by_label.items():
            cells = {w: _cell(g, metric) for w, g in points}
            lines.append(f"| {label} | {length} | " + " | ".join(cells.get(w, "-") for w in widths) + " |")
    controls = [line for warnings in recall_controls(groups, metric).values() for line in warnings]
    return lines + [""] + (controls + [""] if controls else [])


def markdown_report(groups: Sequence[Group], failed: Sequence[FailedRun], plots: Sequence[Path],
                    sources: Sequence[Path]) -> str:
    devices = sorted({str(r.results.get("device")) for g in groups for r in g.runs})
    kinds = sorted({str(r.results.get("peak_memory_kind")) for g in groups for r in g.runs})
    lines = ["# Attention mechanism comparison", "",
             "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    if groups:
        lines += [markdown_table(groups), "",
                  f"Mean ± half-width of the 95% t-interval over seeds (none with one seed; standard "
                  f"deviations are in summary.csv). Sizes: each row's structural options (the comparison "
                  f"presets scale them with T: compare.structure_fraction). Device: {'; '.join(devices)}. Peak memory: "
                  f"{', '.join(kinds)}" + (" (cpu_peak_rss: each run's own peak resident set size, reset at "
                                           "its start; cpu_max_rss: the process high-water mark, which runs that "
                                           "shared a process inherit)" if any("cpu" in k for k in kinds) else "")
                  + f". Pareto: no other row of the same T has both better {ranking_metric(groups).header} and "
                  "higher tokens/s.", ""]
        lines += recall_table(groups)
        lines += ["## Rankings", ""] + ranking_lines(groups)
        crossings = crossover_lines(groups)
        lines += ["## Validation curves that cross", ""] + (crossings or ["No two mean validation curves cross."]) + [""]
        lines += ["## Position encoding", ""] + position_lines(groups)
    else:
        lines += ["No complete runs found.", ""]
    if failed:
        lines += [f"## Failed or missing runs ({len(failed)})", "", "| run | overrides | reason |", "|---|---|---|"]
        lines += [f"| `{f.path or '-'}` | {' '.join(f.overrides) or '-'} | {f.reason} |" for f in failed]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- curves and plots
def latest_metrics_csv(run_dir: Path) -> Optional[Path]:
    """The newest ``csv/version_N/metrics.csv`` (a re-run into the same folder adds a version)."""
    found = [p for p in run_dir.glob("csv/version_*/metrics.csv") if p.parent.name.split("_")[-1].isdigit()]
    return max(found, key=lambda p: int(p.parent.name.split("_")[-1])) if found else None


def validation_curve(run_dir: Path) -> Optional[tuple[list[float], list[float], list[float]]]:
    """``(steps, training seconds, val loss)`` of a run from its metrics.csv (``None`` without one).

    Training seconds at a step = the cumulative sum of ``perf/step_ms`` times the steps of each
    measured window up to that step (interpolated between window ends).
    """
    import numpy as np

    path = latest_metrics_csv(run_dir)
    if path is None:
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    windows = [(float(r["step"]), float(r["perf/step_ms"])) for r in rows if r.get("perf/step_ms")]
    val = [(float(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    if not val:
        return None
    ends, seconds, last = [0.0], [0.0], 0.0
    for step, step_ms in windows:
        if step > last:
            seconds.append(seconds[-1] + (step - last) * step_ms / 1000.0)
            ends.append(step)
            last = step
    steps = [s for s, _ in val]
    return steps, list(np.interp(steps, ends, seconds)), [v for _, v in val]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_colors(plt, labels: Iterable[str]) -> dict[str, Any]:
    """One colour per label, the same in every plot (tab20 beyond ten labels)."""
    labels = sorted(set(labels))
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def scale_axis(ax, which: str, values: Iterable[float], formatter: Any = None) -> None:
    """Log scale when the values span more than 3x (20 mechanisms' throughputs do); ``formatter``
    labels the ticks (e.g. ``EngFormatter``: 250k, 1.2M instead of a 1e6 offset). A log axis
    also labels its minor ticks at 2x and 5x a power of ten (its decades alone are too few)."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    values = [v for v in values if v is not None and v > 0]
    axis = getattr(ax, f"{which}axis")
    formatter = formatter or ScalarFormatter(useOffset=False)
    axis.set_major_formatter(formatter)
    if values and max(values) > 3 * min(values):
        getattr(ax, f"set_{which}scale")("log")
        axis.set_major_formatter(FuncFormatter(lambda v, pos: formatter.format_data(v)))
        axis.set_minor_formatter(FuncFormatter(
            lambda v, pos: formatter.format_data(v) if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))


def _si_axis():
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="")


def numbered_legend(fig, plt, groups: Sequence[Group], color: Mapping[str, Any]) -> None:
    """The legend table of numbered points: ``n  label (T)``, outside the panels."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*" if g.pareto else "o", linestyle="", color=color[g.label],
                      label=f"{n}  {g.label}, T={g.block_size}") for n, g in enumerate(groups, 1)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
               ncol=1 + len(handles) // 30, title="# (table row)")


def plot_pareto(groups: Sequence[Group], path: Path) -> None:
    """Quality (the ranking metric) against tokens/s, one panel per sequence length, the Pareto
    front dashed; points carry their table row number (a legend table names them: 20 labels would
    collide)."""
    plt = _pyplot()
    quality, speed = ranking_metric(groups), METRIC["tokens_per_s"]
    color = label_colors(plt, (g.label for g in groups))
    points = [(n, g, g.mean(speed), g.mean(quality)) for n, g in enumerate(groups, 1) if g.mean(speed) and g.mean(quality)]
    lengths = sorted({g.block_size for _, g, _, _ in points}) or [0]
    fig, axes = plt.subplots(1, len(lengths), figsize=(7 * len(lengths), 5.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        panel = [(n, g, x, y) for n, g, x, y in points if g.block_size == length]
        for n, g, x, y in panel:
            ax.errorbar(x, y, xerr=g.ci(speed) or 0, yerr=g.ci(quality) or 0, fmt="*" if g.pareto else "o",
                        markersize=12 if g.pareto else 7, capsize=3, color=color[g.label])
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9, weight="bold")
        front = sorted((x, y) for _, g, x, y in panel if g.pareto)
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", linestyle="--")
        scale_axis(ax, "x", [x for _, _, x, _ in panel], _si_axis())
        scale_axis(ax, "y", [y for _, _, _, y in panel])
        ax.set_xlabel("training tokens/s (higher is better)")
        ax.set_ylabel(f"{quality.header} ({'higher' if quality.higher_is_better else 'lower'} is better)")
        ax.set_title(f"T={length}: {quality.header} vs throughput (★ and dashed: Pareto front)")
        ax.grid(alpha=0.3, which="both")
    numbered_legend(fig, plt, [g for _, g, _, _ in points], color)
    _save(fig, plt, path)


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps the legend outside the panels
    plt.close(fig)


def plot_validation(groups: Sequence[Group], path: Path) -> None:
    """Validation loss over steps and over training time, one row per sequence length; a
    mechanism keeps its colour in every row, seeds share it."""
    plt = _pyplot()
    lengths = sorted({g.block_size for g in groups}) or [0]
    color = label_colors(plt, (g.label for g in groups))
    fig, axes = plt.subplots(len(lengths), 2, figsize=(13, 4.2 * len(lengths)), squeeze=False)
    for (by_step, by_time), length in zip(axes, lengths):
        losses = []
        for n, g in enumerate(groups, 1):
            if g.block_size != length:
                continue
            for j, run in enumerate(g.runs):
                curve = validation_curve(run.path)
                if curve is None:
                    continue
                steps, seconds, loss = curve
                losses += loss
                style = {"color": color[g.label], "marker": ".", "alpha": 0.8}
                by_step.plot(steps, loss, label=f"{n}  {g.label}" if j == 0 else None, **style)
                by_time.plot(seconds, loss, **style)
        by_step.set_xlabel("step")
        by_time.set_xlabel("training time (s, evaluation excluded)")
        for ax in (by_step, by_time):
            ax.set_ylabel(f"validation loss (T={length})")
            scale_axis(ax, "y", losses)
            ax.grid(alpha=0.3, which="both")
        handles = by_step.get_legend_handles_labels()
        if handles[0]:
            by_time.legend(*handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 + len(handles[0]) // 24)
    fig.suptitle("Validation loss (one line per run; seeds share a colour; numbers: table rows)")
    _save(fig, plt, path)


def plot_sequence_length(groups: Sequence[Group], path: Path) -> None:
    plt = _pyplot()
    lengths = sorted({g.block_size for g in groups})
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(lengths) < 2:
        for ax in (memory, speed):
            ax.axis("off")
        fig.text(0.5, 0.5, f"Only one sequence length (T={lengths[0] if lengths else '-'}) in these runs:\n"
                 "sweep data.block_size=128,256,512 to see memory and throughput against length.",
                 ha="center", va="center", fontsize=12)
    else:
        lines: dict[str, list[Group]] = {}
        for g in groups:
            lines.setdefault(g.label, []).append(g)
        color = label_colors(plt, lines)
        for label, members in lines.items():
            members.sort(key=lambda g: g.block_size)
            xs = [g.block_size for g in members]
            memory.plot(xs, [g.mean(METRIC["peak_memory_mb"]) for g in members], marker="o", label=label, color=color[label])
            speed.plot(xs, [g.mean(METRIC["tokens_per_s"]) for g in members], marker="o", label=label, color=color[label])
        for ax, name, key, unit in ((memory, "peak memory (MB)", "peak_memory_mb", None),
                                    (speed, "training tokens/s", "tokens_per_s", _si_axis())):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T (data.block_size)")
            ax.set_ylabel(name)
            scale_axis(ax, "y", [g.mean(METRIC[key]) for g in groups], unit)
            ax.grid(alpha=0.3, which="both")
        speed.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 + len(lines) // 24)
    fig.suptitle("Peak memory and throughput vs sequence length")
    _save(fig, plt, path)


def plot_recall(groups: Sequence[Group], path: Path) -> None:
    """Recall accuracy against model width per mechanism, one panel per sequence length (Zoology's
    figure): which mechanisms recall, and how much width they need to."""
    plt = _pyplot()
    metric = ranking_metric(groups)
    series = recall_series(groups, metric)
    color = label_colors(plt, (label for lines in series.values() for label in lines))
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 4.2), squeeze=False, sharey=True)
    for ax, (length, lines) in zip(axes[0], sorted(series.items())):
        for label, points in lines.items():
            ax.errorbar([w for w, _ in points], [g.mean(metric) for _, g in points],
                        yerr=[g.ci(metric) or 0 for _, g in points], marker="o", capsize=3, label=label,
                        color=color[label])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({w for points in lines.values() for w, _ in points}))
        ax.xaxis.set_major_formatter("{x:.0f}")  # 64, 128, 256 rather than 2^6
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel("model width (d_model)")
        ax.set_title(f"T={length}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric.header)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 + len(color) // 24)
    fig.suptitle(f"Associative recall (MQAR): {metric.header} vs model width (bars: 95% t-interval over seeds)")
    _save(fig, plt, path)


# ----------------------------------------------------------------------------- entry points
@dataclass
class Report:
    groups: list[Group]
    failed: list[FailedRun]
    files: dict[str, Path]


def build_report(paths: Sequence[Path | str], out: Path | str) -> Report:
    """Load, group, and write ``report.md``, ``summary.csv``, ``runs.csv`` and the plots to ``out``."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, failed = load_runs(paths)
    groups = group_runs(runs)
    files = {"summary.csv": out / "summary.csv", "runs.csv": out / "runs.csv"}
    write_csv(files["summary.csv"], summary_rows(groups) or [{"mechanism": "no complete runs"}])
    write_csv(files["runs.csv"], run_rows(runs, failed) or [{"status": "no runs found"}])
    plots = []
    if groups:
        drawings = [("pareto.png", plot_pareto), ("val_loss.png", plot_validation),
                    ("seq_len.png", plot_sequence_length)]
        if recall_series(groups, ranking_metric(groups)) and ranking_metric(groups).higher_is_better:
            drawings.append(("recall.png", plot_recall))
        for name, draw in drawings:
            draw(groups, out / name)
            plots.append(out / name)
            files[name] = out / name
    files["report.md"] = out / "report.md"
    files["report.md"].write_text(markdown_report(groups, failed, plots, paths))
    return Report(groups, failed, files)


def log_to_wandb(report: Report, project: str) -> None:
    """Log the summary as a ``wandb.Table`` and the plots as images (offline without WANDB_API_KEY)."""
    import wandb

    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    rows = summary_rows(report.groups)
    out = report.files["report.md"].parent
    run = wandb.init(project=project, job_type="compare", dir=str(out), name="compare-attention")
    table = wandb.Table(columns=list(rows[0]), data=[[_wandb_value(row[c]) for c in row] for row in rows])
    run.log({"comparison": table,
             **{name: wandb.Image(str(path)) for name, path in report.files.items() if path.suffix == ".png"}})
    run.finish()


def _wandb_value(value: Any) -> Any:
    return "" if value is None else value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attn-lm-compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="multirun directories and/or run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <the one path>/report, or ./compare_report)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to Weights & Biases")
    parser.add_argument("--wandb-project", default="attn_lm")
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] / "report" if len(args.paths) == 1 else Path("compare_report"))
    report = build_report(args.paths, out)
    if report.groups:
        print(markdown_table(report.groups))
    else:
        print("no complete runs found")
    for f in report.failed:
        print(f"{'failed' if f.path else 'missing'}: {f.path or ' '.join(f.overrides)}: {f.reason}")
    print(f"report: {report.files['report.md']}")
    if args.wandb and report.groups:
        log_to_wandb(report, args.wandb_project)
    return 0 if report.groups else 1


if __name__ == "__main__":
    raise SystemExit(main())
