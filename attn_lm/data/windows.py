"""From a long array of token ids to ``(x, y)`` training and evaluation windows.

Both kinds of item are a pair of ``int64`` tensors of length ``block_size``: ``x = ids[s:s+T]``
and ``y = ids[s+1:s+T+1]`` (the next token at every position). Targets that must not be scored
are :data:`IGNORE_INDEX` (``-1``), which the model's cross-entropy ignores.

Training (:class:`RandomWindows` + :class:`EpochSampler`)
    Item ``i`` is the window at an offset drawn from a generator seeded with ``(seed, i)``. The
    sampler hands out *global* sample indices that continue from the samples already consumed
    (``global_step * batch * accumulation * world_size`` during training), so every epoch sees
    fresh windows, any batch can be recomputed from its indices alone, a run resumed from any
    checkpoint continues the exact stream, and no state lives in worker processes. Under DDP
    Lightning's ``DistributedSamplerWrapper`` shards these indices across ranks.

Evaluation (:class:`EvalWindows`)
    A deterministic pass in which every target (token positions ``1 .. n-1``) is scored exactly
    once. With ``stride == block_size`` the windows are disjoint. With a smaller stride each
    window after the first scores only its last ``stride`` targets, the preceding
    ``block_size - stride`` serving as context (a sliding-window evaluation: more compute, a
    truer picture of long-context loss). The last window always ends at the last token; targets
    that an earlier window already scored are masked.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: Target value that the loss ignores (``F.cross_entropy(..., ignore_index=-1)``).
IGNORE_INDEX = -1

Window = tuple[torch.Tensor, torch.Tensor]


def _window(tokens: Any, start: int, block_size: int) -> Window:
    chunk = torch.from_numpy(np.asarray(tokens[start : start + block_size + 1], dtype=np.int64))
    return chunk[:-1], chunk[1:].clone()


class RandomWindows(Dataset):
    """Windows at pseudo-random offsets; item ``i`` depends only on ``(seed, i)``.

    ``len`` is the number of samples per epoch; indices past it are valid too (later epochs).
    """

    def __init__(self, tokens: Any, block_size: int, samples_per_epoch: int, seed: int) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"need at least block_size+1 = {block_size + 1} tokens, got {len(tokens)}")
        self.tokens = tokens
        self.block_size = block_size
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed

    def __len__(self) -> int:
        return self.samples_per_epoch

    def offset(self, index: int) -> int:
        """Start of window ``index``, uniform over every window that fits in the split."""
        rng = np.random.default_rng((self.seed, index))
        return int(rng.integers(0, len(self.tokens) - self.block_size))

    def __getitem__(self, index: int) -> Window:
        return _window(self.tokens, self.offset(index), self.block_size)


class EpochSampler(Sampler[int]):
    """Yields ``samples_per_epoch`` consecutive global sample indices per pass.

    Without ``position`` pass ``e`` (``set_epoch``) yields ``e*N ... e*N+N-1``. With ``position``
    (a callable returning how many samples training has consumed, i.e. ``global_step * batch *
    accumulation * world_size``) a pass starts right after the consumed ones. The stream of
    windows then depends on the optimizer step alone, so a run resumed from any checkpoint, even
    mid-epoch, sees exactly the windows an uninterrupted run would (however the loop counts
    epochs, and however often it re-creates its iterator).
    """

    def __init__(self, samples_per_epoch: int, position: Optional[Callable[[], int]] = None) -> None:
        self.samples_per_epoch = samples_per_epoch
        self.position = position
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        first = self.position() if self.position is not None else self.epoch * self.samples_per_epoch
        return iter(range(first, first + self.samples_per_epoch))

    def __len__(self) -> int:
        return self.samples_per_epoch


class StepPositionedLoader(DataLoader):
    """The training ``DataLoader``: resumable mid-epoch without state of its own.

    Its position lives in the :class:`EpochSampler`, which derives it from the trainer's global
    step, and a checkpoint restores the global step. So the loader's own state is empty, and
    ``state_dict``/``load_state_dict`` say so; having them tells Lightning the loader resumes
    correctly from a mid-epoch checkpoint (otherwise it warns that the loader "is not resumable").
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            raise ValueError(f"unexpected training-loader state {sorted(state_dict)}: the position follows the "
                             "global step, nothing else is restored")


def training_loader(dataset: Dataset, batch_size: int, samples_per_epoch: int, trainer: Any = None,
                    **options: Any) -> StepPositionedLoader:
    """The training loader of a data module: with a ``trainer``, windows follow the optimizer step,
    so resuming from any checkpoint (even mid-epoch) continues the exact stream of an
    uninterrupted run; all ranks' samples count."""
    position = None
    if trainer is not None:
        def position() -> int:
            return trainer.global_step * batch_size * trainer.accumulate_grad_batches * trainer.world_size
    return StepPositionedLoader(dataset, batch_size=batch_size, sampler=EpochSampler(samples_per_epoch, position),
                                drop_last=True, **options)


def eval_windows(n_tokens: int, block_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts of the evaluation windows and how many leading targets of each to mask.

    Window ``k`` covers targets at token positions ``starts[k]+1 .. starts[k]+block_size`` and
    scores all but the first ``masked[k]``, so that positions ``1 .. n_tokens-1`` are scored
    exactly once. Requires ``n_tokens >= block_size + 1`` and ``1 <= stride <= block_size``.
    """
    last_start = n_tokens - 1 - block_size
    starts = np.arange(0, last_start + 1, stride, dtype=np.int64)
    masked = np.full(len(starts), block_size - stride, dtype=np.int64)
    masked[0] = 0
    scored_up_to = int(starts[-1]) + block_size
    if scored_up_to < n_tokens - 1:
        starts = np.append(starts, last_start)
        masked = np.append(masked, scored_up_to - last_start)
    return starts, masked


class EvalWindows(Dataset):
    """The deterministic evaluation pass over ``tokens`` (see :func:`eval_windows`)."""

    def __init__(self, tokens: Any, block_size: int, stride: Optional[int] = None) -> None:
        stride = block_size if stride is None else stride
        if not 1 <= stride <= block_size:
            raise ValueError(f"eval stride must be in [1, block_size={block_size}], got {stride}")
        if len(tokens) < block_size + 1:
            raise ValueError(f"need at least block_size+1 = {block_size + 1} tokens, got {len(tokens)}")
        self.tokens = tokens
        self.block_size = block_size
        self.starts, self.masked = eval_windows(len(tokens), block_size, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Window:
        x, y = _window(self.tokens, int(self.starts[index]), self.block_size)
        y[: int(self.masked[index])] = IGNORE_INDEX
        return x, y
