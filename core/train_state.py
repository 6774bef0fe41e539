"""The one training state of every family, and the optimizer that updates it."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from core.errors import UserError


@flax.struct.dataclass
class TrainState:
    """`params` and `ema` are pure dicts of arrays (`nnx.to_pure_dict` of the network's
    `nnx.Param` state); `opt_state` is optax's; `step` is an int32 scalar. `teacher_ema` is
    a second EMA of the params with its own decay (`config.teacher_ema_decay`), kept only
    when a loss trains against it (the shortcut loss's `teacher="teacher_ema"`); else None."""

    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any
    teacher_ema: Any = None


def make_optimizer(
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, then constant or cosine decay, and global-norm clipping.

    Weight decay applies to matrices and kernels (ndim >= 2), not to biases or norms.
    """
    lr_fn = _schedule(lr, total_steps, warmup_steps, schedule)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(
        optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)


def _schedule(lr: float, total_steps: int, warmup_steps: int, schedule: str):
    """The learning rate as a float (constant, no warm-up) or an optax schedule."""
    warmup = max(int(warmup_steps), 0)
    if schedule == "constant":
        return optax.warmup_constant_schedule(0.0, lr, warmup) if warmup else lr
    if schedule == "cosine":
        warmup = max(warmup, 1)  # optax's cosine schedule starts with at least one warm-up step
        if warmup >= total_steps:  # a run no longer than its warm-up (a quick check): no decay
            return optax.warmup_constant_schedule(0.0, lr, warmup)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
    raise UserError(f"unknown optim.schedule {schedule!r}; known: constant, cosine")


def learning_rate(tx_config: dict, total_steps: int, step: int) -> float:
    """The learning rate `make_optimizer(**tx_config)` uses at `step` (for logging)."""
    fn = _schedule(
        tx_config["lr"],
        total_steps,
        tx_config.get("warmup_steps", 0),
        tx_config.get("schedule", "constant"),
    )
    return float(fn(step)) if callable(fn) else float(fn)


def init_state(
    params, tx: optax.GradientTransformation, *, teacher_ema: bool = False
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        teacher_ema=jax.tree.map(jnp.copy, params) if teacher_ema else None,
    )
