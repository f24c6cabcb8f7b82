"""Lightning callbacks around a run: :class:`SpeedMonitor` measures throughput (tokens/s), step
time, peak memory and an MFU estimate, timing windows of ``log_every_n_steps`` steps with a host
clock and synchronizing the device only at window boundaries, so the training step itself never
waits on the host; :class:`StepProgressBar` reads the loss only when it refreshes;
:class:`KernelWarmup` compiles kernels before a wall-clock budget starts;
:class:`NonFiniteLossGuard` stops a run at a non-finite loss.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from .devices import device_name, peak_memory_mb, reset_peak_memory, synchronize

log = logging.getLogger(__name__)


class SpeedMonitor(L.Callback):
    """Logs ``perf/tokens_per_s``, ``perf/step_ms``, ``perf/mfu`` and ``perf/peak_mem_mb``.

    ``peak_flops`` is the device's achievable bf16/fp32 matmul rate used for MFU (``None`` =
    leave MFU out). The run-level averages (first window excluded as warm-up when there are
    several) are kept in :attr:`summary` for ``results.json``.
    """

    def __init__(self, peak_flops: Optional[float] = None):
        self.peak_flops = peak_flops
        self.windows: list[tuple[int, float, int]] = []  # (steps, seconds, tokens)
        self._t0: Optional[float] = None
        self._steps = 0
        self._tokens = 0
        self._fit_start: Optional[float] = None
        self.train_seconds = 0.0
        #: Peak memory and device name, read at the end of training (Lightning moves the module
        #: back to the CPU after ``fit``, so they cannot be read from it afterwards).
        self.peak_memory: tuple[float, str] = (0.0, "")
        self.device_name = ""

    def on_train_start(self, trainer, pl_module) -> None:
        reset_peak_memory(pl_module.device)
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            synchronize(pl_module.device)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        self._tokens += batch[0].numel() * trainer.world_size  # every rank trains on its own batch
        if self._steps >= max(1, trainer.log_every_n_steps):
            self._close_window(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        # Evaluation time is not training time: close the open window before it.
        if self._steps:
            self._close_window(trainer, pl_module)
        self._t0 = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._steps:
            self._close_window(trainer, pl_module)
        if self._fit_start is not None:
            self.train_seconds = time.perf_counter() - self._fit_start
        self.peak_memory = peak_memory_mb(pl_module.device)
        self.device_name = device_name(pl_module.device)

    def _close_window(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        now = time.perf_counter()
        seconds = now - (self._t0 if self._t0 is not None else now)
        self.windows.append((self._steps, seconds, self._tokens))
        if seconds > 0:
            tps = self._tokens / seconds
            metrics = {"perf/tokens_per_s": tps, "perf/step_ms": 1000 * seconds / self._steps,
                       "perf/peak_mem_mb": peak_memory_mb(pl_module.device)[0]}
            mfu = self._mfu(pl_module, tps / trainer.world_size)
            if mfu is not None:
                metrics["perf/mfu"] = mfu
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        self._t0, self._steps, self._tokens = now, 0, 0

    def _mfu(self, pl_module, tokens_per_s: float) -> Optional[float]:
        """Model FLOPs utilisation of one device (``tokens_per_s`` per device, ``peak_flops`` per device)."""
        if not self.peak_flops:
            return None
        seq_len = pl_module.model.config.block_size
        return tokens_per_s * pl_module.model.flops_per_token(seq_len) / self.peak_flops

    @property
    def summary(self) -> dict[str, Any]:
        windows = self.windows[1:] if len(self.windows) > 1 else self.windows
        steps = sum(w[0] for w in windows)
        seconds = sum(w[1] for w in windows)
        tokens = sum(w[2] for w in windows)
        if not steps or seconds <= 0:
            return {}
        return {"tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds / steps,
                "measured_steps": steps, "train_seconds": self.train_seconds}


class KernelWarmup(L.Callback):
    """Compile the run's kernels before training starts, so a wall-clock budget buys training.

    FlexAttention patterns (and ``torch.compile``) compile on their first call: 5-60 s that
    Lightning's ``Timer`` (``trainer.max_time``) would otherwise charge to the budget, so in an
    equal-time comparison mechanisms with compiled kernels would get less training. At
    ``on_fit_start`` (before the Timer starts) this runs one forward+backward on random tokens of
    the training batch shape and one no-grad forward of the evaluation batch shape, in the run's
    precision, then drops the gradients. The RNG states are forked, so the run draws exactly the
    numbers it would have drawn without the warm-up. The seconds spent are in :attr:`seconds`
    (``results.json``: ``warmup_s``).

    Single-process runs only: under DDP/FSDP the wrapped module must see every forward, so
    multi-process runs compile in their first steps as usual.
    """

    def __init__(self, vocab_size: int, train_shape: tuple[int, int], eval_shape: tuple[int, int]):
        self.vocab_size = int(vocab_size)
        self.train_shape, self.eval_shape = tuple(train_shape), tuple(eval_shape)
        self.seconds = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            return
        device = pl_module.device
        start = time.perf_counter()
        was_training = pl_module.training
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            pl_module.train()
            x, y = self._batch(self.train_shape, device)
            with trainer.precision_plugin.train_step_context():
                _, loss = pl_module(x, y)
            loss.backward()
            pl_module.zero_grad(set_to_none=True)
            pl_module.eval()
            x, y = self._batch(self.eval_shape, device)
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                pl_module(x, y)
        pl_module.train(was_training)
        synchronize(device)
        self.seconds = time.perf_counter() - start

    def _batch(self, shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(self.vocab_size, (shape[0], shape[1] + 1), device=device)
        return tokens[:, :-1], tokens[:, 1:]


class NonFiniteLossGuard(L.Callback):
    """Stops training at the first non-finite loss (``on_nonfinite=stop``).

    The module books non-finite losses on the device; this callback reads the flag every
    ``log_every_n_steps`` steps and before every validation (so before any checkpoint is written:
    the last checkpoint on disk predates the bad step) and at the end of training. The flag is
    reduced over ranks so all of them stop together.
    """

    def _check(self, trainer, pl_module) -> None:
        if pl_module.on_nonfinite != "stop":
            return
        never = torch.iinfo(torch.int64).max
        first = pl_module.nonfinite_first_step
        first = trainer.strategy.reduce(torch.where(first < 0, torch.full_like(first, never), first), reduce_op="min")
        if int(first) != never:
            raise FloatingPointError(
                f"non-finite training loss at step {int(first)}: training stopped; checkpoints written before that "
                f"step are kept (last: {getattr(trainer.checkpoint_callback, 'last_model_path', '') or 'none yet'}). "
                "Lower optim.lr, lengthen optim.warmup_steps or lower trainer.gradient_clip_val, or set "
                "on_nonfinite=skip to zero the gradients of such steps instead"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training:
            self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting optimizer steps towards ``max_steps`` over the whole run.

    Budgets here are steps (epochs only mark ``samples_per_epoch`` windows), so the bar neither
    restarts at each epoch nor shows an epoch number or the logger's version. It shows the
    training loss only when it refreshes, read from ``pl_module.last_train_loss``: a metric
    logged with ``prog_bar=True`` is read from the device after every batch (a host sync per
    step)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.set_description("steps")

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """One bar for the whole run (Lightning's resets it every epoch)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._should_update(step, self.train_progress_bar.total or -1):
            self.train_progress_bar.n = step
            self.train_progress_bar.refresh()
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the bar open across epochs (Lightning's closes it)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is not None and trainer.training:
            metrics["loss"] = f"{float(loss):.4g}"
        return metrics


class RunClock(L.Callback):
    """Training time over every segment of a run: the seconds of earlier segments travel in the
    checkpoint (this callback's state), so a resumed run reports the whole run's wall time."""

    def __init__(self) -> None:
        self.previous_s = 0.0
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @property
    def total_s(self) -> float:
        """Seconds of earlier segments plus this one's so far."""
        return self.previous_s + time.perf_counter() - self._start

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.total_s}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.previous_s = float(state_dict["seconds"])


class TextSampler(L.Callback):
    """Every ``every``-th validation, a short continuation of ``prompt`` (temperature 0.8, top-k 50,
    a fixed seed, so samples differ only by what the model learned), written to the log and to
    the loggers that take text (TensorBoard, W&B). Shows what a loss number means."""

    def __init__(self, tokenizer: Any, every: int, max_new_tokens: int, prompt: str = "\n") -> None:
        self.tokenizer, self.every, self.max_new_tokens, self.prompt = tokenizer, every, max_new_tokens, prompt
        self._validations = 0
        self._last_step = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validations += 1
        due = self._validations % self.every == 0 or not trainer.training  # the final evaluation too
        if trainer.sanity_checking or not trainer.is_global_zero or not due or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        text = self.sample(pl_module)
        log.info("sample at step %d:\n%s", trainer.global_step, text)
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):  # W&B
                logger.log_text(key="samples", columns=["step", "text"], data=[[trainer.global_step, text]])
            elif hasattr(logger.experiment, "add_text"):  # TensorBoard
                logger.experiment.add_text("samples", text, trainer.global_step)

    def sample(self, pl_module: L.LightningModule) -> str:
        device = pl_module.device
        prompt = torch.tensor([self.tokenizer.encode(self.prompt).tolist()], device=device)
        generator = torch.Generator(device).manual_seed(0)
        ids = pl_module.model.generate(prompt, self.max_new_tokens, temperature=0.8, top_k=50, generator=generator)
        return self.prompt + self.tokenizer.decode(ids[0, prompt.shape[1]:].tolist())
