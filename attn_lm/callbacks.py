"""Lightning callbacks around a run: :class:`SpeedMonitor` measures throughput (tokens/s), step
time, peak memory and an MFU estimate over windows of ``log_every_n_steps`` steps;
:class:`StepLogger` logs the training loss and learning rate; :class:`StepProgressBar` shows the
loss when it refreshes; :class:`KernelWarmup` compiles kernels before a wall-clock budget starts;
:class:`NonFiniteLossGuard` stops a run at a non-finite loss.

None of them waits for the device during training: a host read of a CUDA tensor (``float(t)``)
waits for every kernel queued so far, and the GPU then idles while the host prepares the next
step (benchmarks/RESULTS.md 3f). They read device values one interval late instead
(:class:`LaggedRead`), and time windows with CUDA events.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from .devices import device_name, peak_memory_mb, reset_peak_memory, synchronize

log = logging.getLogger(__name__)


class LaggedRead:
    """A device value read on the host one read late, without waiting for the device.

    ``swap(value, tag)`` queues a copy of ``value`` into pinned host memory behind the work on the
    current stream, and returns the ``(tag, host value)`` that the previous ``swap`` queued
    (``None`` the first time). Swaps happen at intervals of many steps, so the previous copy has
    long finished and waiting for it costs nothing. Every rank swaps at the same steps and gets
    the same sequence of values, so decisions taken on them agree across ranks. ``flush()``
    returns the last queued value, waiting for it (end of training). Off CUDA a copy is done at once.
    """

    def __init__(self) -> None:
        self._queued: Optional[tuple[Any, torch.Tensor, Optional[torch.cuda.Event]]] = None

    def swap(self, value: torch.Tensor, tag: Any = None) -> Optional[tuple[Any, torch.Tensor]]:
        previous = self.flush()
        value = value.detach()
        if value.device.type != "cuda":
            self._queued = (tag, value.clone(), None)
            return previous
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._queued = (tag, host, copied)
        return previous

    def flush(self) -> Optional[tuple[Any, torch.Tensor]]:
        if self._queued is None:
            return None
        tag, host, copied = self._queued
        self._queued = None
        if copied is not None:
            copied.synchronize()  # waits for this copy only, not for the kernels queued after it
        return tag, host


class WindowClock:
    """Marks on the device's timeline: CUDA events on a GPU (their elapsed time includes any idle
    time of the stream between them; recording one does not wait), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (waits for ``end`` on a GPU)."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class SpeedMonitor(L.Callback):
    """Logs ``perf/tokens_per_s``, ``perf/step_ms``, ``perf/mfu`` and ``perf/peak_mem_mb``.

    ``peak_flops`` is the device's achievable bf16/fp32 matmul rate used for MFU (``None`` =
    leave MFU out). A window of ``log_every_n_steps`` steps runs from one mark of a
    :class:`WindowClock` to the next; it is measured and logged when the next window closes (its
    end mark has long passed by then), and at validation and the end of training. The run-level
    averages (first window excluded as warm-up when there are several) are kept in
    :attr:`summary` for ``results.json``.
    """

    def __init__(self, peak_flops: Optional[float] = None):
        self.peak_flops = peak_flops
        self.windows: list[tuple[int, float, int]] = []  # (steps, seconds, tokens)
        self._clock: Optional[WindowClock] = None
        self._start: Any = None  # the open window's start mark
        self._steps = 0
        self._tokens = 0
        self._closed: list[tuple[int, int, Any, Any, int, float]] = []  # not yet measured
        self._fit_start: Optional[float] = None
        self.train_seconds = 0.0
        #: Peak memory and device name, read at the end of training (Lightning moves the module
        #: back to the CPU after ``fit``, so they cannot be read from it afterwards).
        self.peak_memory: tuple[float, str] = (0.0, "")
        self.device_name = ""

    def on_train_start(self, trainer, pl_module) -> None:
        reset_peak_memory(pl_module.device)
        self._clock = WindowClock(pl_module.device)
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = self._clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        self._tokens += batch[0].numel() * trainer.world_size  # every rank trains on its own batch
        if self._steps >= max(1, trainer.log_every_n_steps):
            self._close_window(trainer, pl_module)
            self._measure(trainer, pl_module, keep_last=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        # Evaluation time is not training time: close the open window before it.
        if self._steps:
            self._close_window(trainer, pl_module)
        self._measure(trainer, pl_module)
        self._start = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._steps:
            self._close_window(trainer, pl_module)
        self._measure(trainer, pl_module)
        if self._fit_start is not None:
            self.train_seconds = time.perf_counter() - self._fit_start
        self.peak_memory = peak_memory_mb(pl_module.device)
        self.device_name = device_name(pl_module.device)

    def _close_window(self, trainer, pl_module) -> None:
        end = self._clock.mark()
        self._closed.append((self._steps, self._tokens, self._start, end, trainer.global_step,
                             peak_memory_mb(pl_module.device)[0]))
        self._start, self._steps, self._tokens = end, 0, 0

    def _measure(self, trainer, pl_module, keep_last: bool = False) -> None:
        """Measure and log the closed windows (all but the newest with ``keep_last``)."""
        while len(self._closed) > int(keep_last):
            steps, tokens, start, end, step, peak_mb = self._closed.pop(0)
            seconds = self._clock.seconds(start, end)
            self.windows.append((steps, seconds, tokens))
            if seconds <= 0:
                continue
            tps = tokens / seconds
            metrics = {"perf/tokens_per_s": tps, "perf/step_ms": 1000 * seconds / steps, "perf/peak_mem_mb": peak_mb}
            mfu = self._mfu(pl_module, tps / trainer.world_size)
            if mfu is not None:
                metrics["perf/mfu"] = mfu
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)

    def _mfu(self, pl_module, tokens_per_s: float) -> Optional[float]:
        """Model FLOPs utilisation of one device (``tokens_per_s`` per device, ``peak_flops`` per device)."""
        if not self.peak_flops:
            return None
        seq_len = pl_module.model.config.context_len
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
                _, loss = pl_module(x, y, return_logits=False)  # the training step's graph
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

    The module books non-finite losses on the device. Every ``log_every_n_steps`` steps this
    callback queues a host copy of the first bad step (reduced over ranks, so all of them stop
    together) and acts on the copy queued one interval before (:class:`LaggedRead`): a bad step
    stops the run at most two intervals later, with no wait for the device. Before every
    validation (so before any checkpoint is written: the last checkpoint on disk predates the
    bad step) and at the end of training it reads the flag at once.
    """

    def __init__(self) -> None:
        self._lagged = LaggedRead()

    def _first_bad_step(self, trainer, pl_module) -> torch.Tensor:
        first = pl_module.nonfinite_first_step
        return trainer.strategy.reduce(torch.where(first < 0, torch.full_like(first, NEVER), first), reduce_op="min")

    def _stop_if_bad(self, trainer, first: torch.Tensor) -> None:
        if int(first) != NEVER:
            raise FloatingPointError(
                f"non-finite training loss at step {int(first)}: training stopped; checkpoints written before that "
                f"step are kept (last: {getattr(trainer.checkpoint_callback, 'last_model_path', '') or 'none yet'}). "
                "Lower optim.lr, lengthen optim.warmup_steps or lower trainer.gradient_clip_val, or set "
                "on_nonfinite=skip to zero the gradients of such steps instead"
            )

    def _check_now(self, trainer, pl_module) -> None:
        if pl_module.on_nonfinite == "stop":
            self._lagged.flush()
            self._stop_if_bad(trainer, self._first_bad_step(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.on_nonfinite == "stop" and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            previous = self._lagged.swap(self._first_bad_step(trainer, pl_module))
            if previous is not None:
                self._stop_if_bad(trainer, previous[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training:
            self._check_now(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check_now(trainer, pl_module)


#: No non-finite loss yet (the first bad step is reduced with ``min`` over ranks).
NEVER = torch.iinfo(torch.int64).max


class StepLogger(L.Callback):
    """Logs ``train/loss`` and ``lr`` every ``log_every_n_steps`` optimizer steps, at the step
    that produced them. The loss is read one interval late (:class:`LaggedRead`; the last one at
    the end of training): Lightning's ``self.log`` would read it from the device at once. The
    learning rate is the optimizer's own float, never a device tensor."""

    def __init__(self) -> None:
        self._loss = LaggedRead()
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch completed (0-based)
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is None or step == self._last_step or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        self._last_step = step
        self._log(trainer, self._loss.swap(loss, tag=step))
        if trainer.is_global_zero and trainer.optimizers:
            lr = {"lr" if i == 0 else f"lr/group{i}": float(group["lr"])
                  for i, group in enumerate(trainer.optimizers[0].param_groups)}
            for logger in trainer.loggers:
                logger.log_metrics(lr, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, self._loss.flush())

    def _log(self, trainer, read: Optional[tuple[int, torch.Tensor]]) -> None:
        if read is None or not trainer.is_global_zero:
            return
        step, loss = read
        for logger in trainer.loggers:
            logger.log_metrics({"train/loss": float(loss)}, step=step)


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar counting optimizer steps towards ``max_steps`` over the whole run.

    Budgets here are steps (epochs only mark ``samples_per_epoch`` windows), so the bar neither
    restarts at each epoch nor shows an epoch number or the logger's version. At each refresh it
    shows the training loss of the previous refresh (:class:`LaggedRead` of
    ``pl_module.last_train_loss``): a metric logged with ``prog_bar=True`` is read from the device
    after every batch, and even one read per refresh would make the GPU wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss = LaggedRead()
        self._shown: Optional[str] = None

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
            previous = self._loss.swap(loss)
            if previous is not None:
                self._shown = f"{float(previous[1]):.4g}"
        if self._shown is not None:
            metrics["loss"] = self._shown
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
    the loggers that take text (TensorBoard, W&B). Shows what a loss number means. ``seconds``:
    wall time spent sampling (``results.json``: ``sample_s``; the decoding is eager, so on a GPU it
    is launch-bound, not compute-bound)."""

    def __init__(self, tokenizer: Any, every: int, max_new_tokens: int, prompt: str = "\n") -> None:
        self.tokenizer, self.every, self.max_new_tokens, self.prompt = tokenizer, every, max_new_tokens, prompt
        self._validations = 0
        self._last_step = -1
        self.seconds = 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validations += 1
        # trainer.training is False in every validation, the ones inside fit too: the final
        # evaluation is the one outside fit.
        due = self._validations % self.every == 0 or trainer.state.fn != TrainerFn.FITTING
        if trainer.sanity_checking or not trainer.is_global_zero or not due or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        start = time.perf_counter()
        text = self.sample(pl_module)  # tokenizer.decode reads the tokens back: the time includes the GPU's
        self.seconds += time.perf_counter() - start
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
