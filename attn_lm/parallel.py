"""Parallelism strategies, kept apart from the model and the training loop (as torchtitan does).

Data parallel (``trainer=ddp``) is Lightning's ``DDPStrategy`` as is. Fully sharded data parallel
(``trainer=fsdp``) needs to know the model's repeating unit: :func:`fsdp_strategy` wraps every
:class:`~attn_lm.model.TransformerBlock` in its own FSDP unit, so parameters, gradients and
optimizer state are sharded block by block and gathered one block at a time. Mixed precision
comes from the trainer's ``precision`` (``bf16-mixed``). ``use_orig_params=True`` keeps the
original parameter names, so AdamW's decay/no-decay groups survive the wrapping (and
``torch.compile`` sees the original parameters); gradient clipping by norm goes through the root
module's ``clip_grad_norm_`` (:meth:`attn_lm.lit_module.LitGPT.configure_gradient_clipping`).

After ``fit`` the module's root parameters stay flattened, so a later ``validate``/``test`` on
the same module fails inside FSDP; :func:`attn_lm.train.train` evaluates a sharded run on a
fresh module loaded from the final checkpoint instead.
"""
from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from .model import TransformerBlock


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
