"""The LightningModule: loss, evaluation metrics, optimizer and learning-rate schedule around
:class:`attn_lm.model.GPT`. The loop, precision, gradient clipping/accumulation, checkpointing
and logging are Lightning's.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .config import GPTConfig, gpt_config_from_dict
from .model import GPT
from .parallel import clip_sharded, unwrapped_name


class LitGPT(L.LightningModule):
    """Trains a :class:`GPT` as a causal language model.

    ``optim``: ``lr``, ``weight_decay``, ``betas``, ``eps``, ``warmup_steps``, ``min_lr_ratio``
    (cosine floor as a fraction of ``lr``) and ``fused`` (``auto`` = fused AdamW on CUDA).
    Evaluation reports the token-weighted mean loss over the whole split (targets of ``-1`` are
    not scored), its perplexity, and the data module's unit metrics (bits per character/byte,
    word perplexity) when it provides them. ``accuracy=True`` (tasks scored by recall, e.g.
    MQAR) also reports the token accuracy over the scored targets (``val/accuracy``).

    With ``compile`` on, the first batch of every evaluation (validation or test) is also run by
    the eager model; if the compiled loss disagrees (:data:`EVAL_RTOL`, :data:`EVAL_ATOL`), a
    warning says so and evaluation runs eagerly from then on. Compiled evaluation was silently
    wrong once (Inductor's FlexAttention without autograd, sparse patterns with RoPE: benchmarks/
    RESULTS.md 5e, 5f) while training agreed; one eager batch per evaluation keeps such a bug out
    of the reported numbers.
    """

    def __init__(self, model_config: GPTConfig | dict, optim: dict[str, Any], compile: bool = False,
                 on_nonfinite: str = "stop", accuracy: bool = False, compile_mode: str = "default"):
        super().__init__()
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; valid: 'stop', 'skip'")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
        if not isinstance(model_config, GPTConfig):  # restored from a checkpoint's hyperparameters
            model_config = gpt_config_from_dict(model_config)
        self.save_hyperparameters({"model_config": asdict(model_config), "optim": dict(optim), "compile": compile,
                                   "on_nonfinite": on_nonfinite, "accuracy": accuracy,
                                   "compile_mode": compile_mode})
        self.model_config = model_config
        self.optim = dict(optim)
        self.model = GPT(model_config)
        # Matrices (linear and embedding weights) decay; biases and norm gains do not. Decided on
        # the unwrapped model by name: under FSDP the parameters are flat shards by the time
        # configure_optimizers runs, and their shapes no longer tell.
        object.__setattr__(self, "_decays", {name: param.dim() >= 2 for name, param in self.model.named_parameters()})
        self.compile = compile
        self.compile_mode = compile_mode
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Argmax over the vocabulary against targets != -1, accumulated on the device (no host
        # sync per step: validate_args=False skips torchmetrics' value checks, which read back).
        self.accuracy = accuracy
        if accuracy:
            self.val_accuracy, self.test_accuracy = (
                MulticlassAccuracy(model_config.vocab_size, average="micro", ignore_index=-1, validate_args=False)
                for _ in range(2))
        object.__setattr__(self, "_compiled", None)
        # Non-finite losses are booked on the device (no host sync per step): the first step that
        # had one and how many there were. NonFiniteLossGuard reads them at intervals.
        self.on_nonfinite = on_nonfinite
        self.register_buffer("nonfinite_first_step", torch.tensor(-1), persistent=False)
        self.register_buffer("nonfinite_count", torch.tensor(0), persistent=False)
        self._step_finite: Optional[torch.Tensor] = None
        self._eval_rows = 0  # the evaluation batch size the compiled model was given first
        self._compiled_eval_agrees = True  # until a check against the eager model says otherwise
        #: The last training loss, on the device (read by the progress bar at its refresh interval).
        self.last_train_loss: Optional[torch.Tensor] = None

    def configure_model(self) -> None:
        if self.compile and self._compiled is None:
            # Kept out of the module tree (no duplicate parameters in checkpoints).
            object.__setattr__(self, "_compiled", compile_for_training(self.model, self.compile_mode))

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, return_logits: bool = True):
        """The model's forward (compiled when ``compile`` is on); training passes
        ``return_logits=False`` for the fused head and loss (:mod:`attn_lm.loss`)."""
        if self._compiled is None:
            return self.model(idx, targets, return_logits=return_logits)
        self.model.prepare_fused(idx.shape[1], idx.device)  # outside the graph: see its docstring
        if self.compile_mode == "reduce-overhead":
            # Each call replays the graph into the same output buffers: declare a new step, so
            # CUDA graph trees never wait for the previous step's outputs to die.
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(idx, targets, return_logits=return_logits)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y, return_logits=False)
        self._book_nonfinite(torch.isfinite(loss.detach()))
        # Not self.log: Lightning reads logged values from the device (after every batch for the
        # progress bar, every log interval for the loggers), and each read makes the GPU wait
        # (measured +11% step time on an H200 for one per step). StepLogger and StepProgressBar
        # read it one interval late instead. Under CUDA graphs (compile_mode=reduce-overhead) the
        # next step overwrites ``loss`` in place, so they get a copy; otherwise no extra kernel.
        graphs = self._compiled is not None and self.compile_mode == "reduce-overhead"
        self.last_train_loss = loss.detach().clone() if graphs else loss.detach()
        return loss

    def _book_nonfinite(self, finite: torch.Tensor) -> None:
        first = self.nonfinite_first_step
        step = torch.full_like(first, self.global_step)
        first.copy_(torch.where(~finite & (first < 0), step, first))
        self.nonfinite_count.add_((~finite).long())
        self._step_finite = finite

    def on_before_optimizer_step(self, optimizer) -> None:
        """``on_nonfinite=skip``: zero the gradients of a step whose loss was not finite (on the
        device, no sync). AdamW still applies its momentum and weight decay for that step."""
        if self.on_nonfinite == "skip" and self._step_finite is not None:
            bad = ~self._step_finite
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.masked_fill_(bad, 0.0)

    def _eval_step(self, batch, batch_idx: int, split: str) -> None:
        x, y = batch
        if self._compiled is not None and self._compiled_eval_agrees:
            x, y = self._pad_eval_batch(x, y)
            logits, loss = self(x, y)
            if batch_idx == 0:
                logits, loss = self._check_compiled_eval(x, y, logits, loss, split)
        else:
            logits, loss = self.model(x, y)
        getattr(self, f"{split}_loss").update(loss.detach(), weight=(y != -1).sum())
        if self.accuracy:
            getattr(self, f"{split}_accuracy").update(logits.detach().argmax(-1), y)

    def _check_compiled_eval(self, x, y, logits, loss, split: str):
        """The compiled ``(logits, loss)`` of this batch when the eager model agrees on the loss;
        otherwise the eager ones, a warning, and eager evaluation from then on (one host sync per
        evaluation)."""
        eager_logits, eager_loss = self.model(x, y)
        if torch.isclose(loss.float(), eager_loss.float(), rtol=EVAL_RTOL, atol=EVAL_ATOL):
            return logits, loss
        self._compiled_eval_agrees = False
        warnings.warn(f"compiled evaluation disagrees with the eager model on the first {split} batch at step "
                      f"{self.global_step} (loss {float(loss):.4f} against {float(eager_loss):.4f}), where the "
                      "two should compute the same numbers; evaluating eagerly from now on (training stays "
                      "compiled)", stacklevel=2)
        return eager_logits, eager_loss

    def _pad_eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad a short (last) evaluation batch to the first batch's size with unscored targets, so
        the compiled model sees one evaluation shape (no recompilation); the loss is unchanged,
        since targets of -1 are not scored."""
        rows = max(self._eval_rows, x.shape[0])
        self._eval_rows = rows
        if x.shape[0] == rows:
            return x, y
        pad = rows - x.shape[0]
        return (torch.cat([x, x.new_zeros(pad, x.shape[1])]), torch.cat([y, y.new_full((pad, y.shape[1]), -1)]))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def _eval_epoch_end(self, split: str) -> None:
        metric = getattr(self, f"{split}_loss")
        loss = metric.compute()
        metric.reset()
        if self.accuracy:
            accuracy = getattr(self, f"{split}_accuracy")
            self.log(f"{split}/accuracy", accuracy.compute(), prog_bar=True, rank_zero_only=True)
            accuracy.reset()
        # MeanMetric.compute() already reduced over ranks: every rank holds the same value.
        self.log(f"{split}/loss", loss, prog_bar=True, rank_zero_only=True)
        self.log(f"{split}/ppl", torch.exp(loss), prog_bar=True, rank_zero_only=True)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "extra_metrics"):
            data_split = {"val": "validation"}.get(split, split)
            for name, value in dm.extra_metrics(data_split, float(loss)).items():
                self.log(f"{split}/{name}", float(value), rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            plain = unwrapped_name(name)
            if plain not in self._decays:  # a wrapper this code does not know renamed it: say so, never guess
                raise RuntimeError(f"parameter {name!r} (as {plain!r}) is not a parameter of the GPT; add the "
                                   "wrapper's name segment to attn_lm.parallel.WRAPPER_SEGMENTS")
            (decay if self._decays[plain] else no_decay).append(param)
        o = self.optim
        fused = o.get("fused", "auto")
        if fused == "auto":
            # fp16 mixed precision scales gradients; keep its unscaling in Lightning's GradScaler path.
            fused = self.device.type == "cuda" and "16-mixed" != str(self.trainer.precision)
        self._fused = bool(fused)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"], betas=tuple(o["betas"]), eps=o.get("eps", 1e-8), fused=fused,
        )
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total):  # a wall-clock budget: decay over the time instead of the steps
            timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
            if timer is None:
                raise ValueError("no training budget: set trainer.max_steps, trainer.max_epochs or trainer.max_time")
            schedule = warmup_cosine(int(o["warmup_steps"]), None, float(o["min_lr_ratio"]), timer)
        else:
            schedule = warmup_cosine(int(o["warmup_steps"]), max(1, int(total)), float(o["min_lr_ratio"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by the global norm under FSDP (:func:`~attn_lm.parallel.clip_sharded`). Clip here
        too when AdamW is fused: Lightning refuses to clip for optimizers that may unscale
        gradients themselves, but without fp16 loss scaling the gradients are already unscaled."""
        if clip_sharded(self.trainer.strategy.model, gradient_clip_val, gradient_clip_algorithm):
            return
        if not getattr(self, "_fused", False) or gradient_clip_val is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)


#: How far a compiled evaluation loss may be from the eager model's on the same batch. Under bf16
#: autocast their logits differ by up to ~1e-2 per element (rounding; seen on CPU), a mean loss by
#: far less; the FlexAttention bug of RESULTS.md 5e moved the validation loss by 0.6 at 6.9.
EVAL_RTOL = 1e-2
EVAL_ATOL = 1e-2

#: ``torch.compile`` modes a run may choose (``compile_mode``): ``default`` launches the compiled
#: kernels one by one; ``reduce-overhead`` replays them as CUDA graphs (on CUDA; elsewhere it is
#: ``default``), which takes the host's kernel launches out of the step.
COMPILE_MODES = ("default", "reduce-overhead")


def compile_for_training(model: GPT, mode: str = "default") -> Optional[torch.nn.Module]:
    """``torch.compile`` the model as training runs it: one graph for the whole forward and loss
    (``fullgraph``: a graph break would leave the loss, and its fp32 logits, to eager kernels)
    with static shapes (training windows never change shape, and evaluation pads its last batch:
    ``LitGPT._pad_eval_batch``). ``mode`` is one of :data:`COMPILE_MODES`.

    A model with a layer that cannot be traced (``compile_unsupported``: the tile-loop teaching
    code) is not compiled: its Python tile loops dominate the step, and graph breaks around every
    such layer cost more than compiling the rest saves. Returns ``None`` then, with a warning
    that says why."""
    reasons = model.untraceable
    if reasons:
        warnings.warn("compile=true: the model runs eagerly, since " +
                      "; ".join(f"{name}: {why}" for name, why in reasons.items()), stacklevel=2)
        return None
    return torch.compile(model, fullgraph=True, dynamic=False, mode=mode)


def warmup_cosine(warmup_steps: int, total_steps: Optional[int], min_ratio: float, timer: Optional[Timer] = None):
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``total_steps`` (and flat after). With a wall-clock budget (``timer``, the
    ``trainer.max_time`` callback, and no step count) the decay follows the fraction of the
    training time used, so every run of an equal-time comparison gets a whole schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if timer is not None:
            elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train") or 0.0
            progress = min(1.0, elapsed / max(1e-9, elapsed + remaining))
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
