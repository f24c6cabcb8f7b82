"""Parallelism strategies and what they change about training, kept apart from the model and the
training loop (as torchtitan does): nothing outside this module knows that FSDP exists.

Data parallel (``trainer=ddp``) is Lightning's ``DDPStrategy`` as is. Fully sharded data parallel
(``trainer=fsdp``) needs to know the model's repeating unit: :func:`fsdp_strategy` wraps every
:class:`~attn_lm.model.TransformerBlock` in its own FSDP unit, so parameters, gradients and
optimizer state are sharded block by block and gathered one block at a time. Mixed precision
comes from the trainer's ``precision`` (``bf16-mixed``). ``use_orig_params=True`` keeps the
original parameter names, so AdamW's decay/no-decay groups survive the wrapping (and
``torch.compile`` sees the original parameters), though with the wrappers' segments in them
(:func:`unwrapped_name`); gradient clipping by norm goes through the root module
(:func:`clip_sharded`); and a trained sharded module is evaluated anew (:func:`evaluate_trained`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp import FullyShardedDataParallel

from .model import TransformerBlock

#: Path segments that FSDP and activation-checkpointing wrappers (and ``torch.compile``) insert
#: into parameter names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False,
                  state_dict_type: str = "full", use_orig_params: bool = True, **kwargs) -> FSDPStrategy:
    """Lightning FSDP with one unit per TransformerBlock (optionally re-computing each block's
    activations in the backward pass: ``activation_checkpointing``)."""
    blocks = {TransformerBlock}
    return FSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        use_orig_params=use_orig_params,
        **kwargs,
    )


def is_sharded(strategy: Strategy) -> bool:
    return isinstance(strategy, FSDPStrategy)


def unwrapped_name(name: str) -> str:
    """A parameter's name as in the unwrapped model (wrapper segments removed)."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def clip_sharded(root: Any, max_norm: Optional[float], algorithm: Optional[str]) -> bool:
    """Clip by the global norm when ``root`` (the strategy's wrapped model) is a root FSDP module;
    returns whether it clipped. Each rank holds a shard of the gradients, so
    ``torch.nn.utils.clip_grad_norm_`` would clip by a local norm (Lightning refuses norm clipping
    there); the root module's ``clip_grad_norm_`` reduces over ranks."""
    if max_norm is None or algorithm == "value" or not isinstance(root, FullyShardedDataParallel):
        return False
    root.clip_grad_norm_(max_norm)
    return True


def evaluate_trained(trainer: L.Trainer, module: L.LightningModule, datamodule: Any, stages: Sequence[str],
                     final: Path, fresh_trainer: Callable[[], L.Trainer]) -> list[dict[str, float]]:
    """The metrics of each of ``stages`` (``validate``, ``test``) for the weights ``trainer`` just
    trained.

    Under FSDP the trained module cannot be evaluated again (its root parameters stay flattened
    after ``fit``, and a later ``validate``/``test`` fails inside FSDP): the weights are saved to
    ``final`` and each stage runs on a fresh module, wrapped anew by ``fresh_trainer()``, that
    loads them."""
    if not is_sharded(trainer.strategy):
        return [getattr(trainer, stage)(module, datamodule=datamodule, verbose=False)[0] for stage in stages]
    trainer.save_checkpoint(final)
    return [getattr(fresh_trainer(), stage)(type(module)(**module.hparams), datamodule=datamodule,
                                            ckpt_path=str(final), verbose=False)[0] for stage in stages]
