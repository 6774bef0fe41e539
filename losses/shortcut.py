"""Shortcut models (Frans et al. 2024, arXiv 2410.12557): one velocity network `s(x, t, d)`
that also takes the step size `d`, trained so that one step of size `2d` equals two steps of
size `d`. It then samples in 1, 2, 4, ..., `max_steps` steps (`samplers/shortcut.py`).

A batch of `B` rows is split statically:

- `n = B // bootstrap_every` rows are self-consistency rows: every `B // n`-th row (rows
  0, k, 2k, ...; spread so that a data-sharded batch keeps its share of them on each device
  and the step moves no rows between devices). The `i`-th of them gets the level
  `l = J - (i mod J)` (`J = log2(max_steps)`; coarsest first, so every level `1..J` gets a
  row), the step `2d = 2^l / max_steps` and a time on its grid, `t = k · 2d`,
  `k ~ U{0, ..., 1/(2d) - 1}`. With the teacher `s'` (EMA or current parameters, never
  differentiated) at the level below:

      s1 = s'(x_t, t, d),  x' = x_t + d · s1,  s2 = s'(x', t + d, d)
      loss = |s(x_t, t, 2d) - stopgrad((s1 + s2) / 2)|^2

- the other rows are flow-matching rows at the finest level (`dt = 0`, the flow-matching
  limit): `t ~ sample_time`, target `x1 - x0`.

The network sees `d` through `models.step_size.level_dt` (`log2` level / `J`, in [0, 1]).
Options beyond the paper's defaults: `teacher="current"` (the official code's
`bootstrap_ema=0`), `teacher="teacher_ema"` (a second EMA with its own, faster decay,
`config.teacher_ema_decay`, while the slow EMA stays the sampling weights: iSM's "twin EMA",
arXiv 2510.21250, for the lag of a slow EMA teacher behind the network), classifier-free
guidance of weight `bootstrap_cfg_scale` inside the targets of the finest bootstrap level
(whose teacher is the flow-matching velocity; coarser levels inherit the guidance by
distillation, as in the official code), and `target_clip` (clip `x'` and the target to
`[-c, c]`; the official code uses 4). Label dropout applies to every row, so the null label
is trained at every step size.

`ot_pairing=True` re-pairs the batch's noise to its data along a minibatch entropic OT plan
(`losses.flow_matching.sinkhorn_pairing`, as OT-CFM; `ot_reg`, `ot_iters`) before the rows
are split, so the flow-matching rows and the bootstrap rows' `x_t` lie on one coupling's
paths. iSM (arXiv 2510.21250) brings OT pairing to shortcut models as "scaling optimal
transport"; this is its plain minibatch form, over the global batch (under a data-sharded
mesh the `B x B` cost matrix gathers the batch). Its key is `fold_in(key, 1)`, apart
from the `split` that gives the other draws, so those do not depend on this option.
"""

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import UserError
from losses.flow_matching import broadcast_to, drop_cond, sample_time, sinkhorn_pairing
from models.conditioning import null_like
from models.step_size import level_dt, num_levels

TEACHERS = ("ema", "current", "teacher_ema")


def bootstrap_size(batch_size: int, bootstrap_every: int, max_steps: int) -> int:
    """The number of self-consistency rows, `batch_size // bootstrap_every`.

    A UserError (at trace time) unless every one of the `J = log2(max_steps)` bootstrap levels
    gets a row and at least one flow-matching row is left."""
    levels = num_levels(max_steps)
    if bootstrap_every < 2:
        raise UserError(
            f"bootstrap_every must be >= 2 (leaves flow-matching rows), got {bootstrap_every}"
        )
    n = batch_size // bootstrap_every
    if n < levels:
        raise UserError(
            f"shortcut loss: batch size {batch_size} with bootstrap_every={bootstrap_every} "
            f"gives {n} self-consistency row(s), fewer than the {levels} bootstrap levels of "
            f"max_steps={max_steps} (step sizes 1 .. 2/{max_steps}; {levels + 1} levels of d "
            f"with the flow-matching step 1/{max_steps}): use a batch of at least "
            f"{levels * bootstrap_every}, a smaller bootstrap_every or a smaller max_steps"
        )
    return n


def bootstrap_levels(n: int, max_steps: int) -> np.ndarray:
    """`[n]` static student levels `J, J-1, ..., 1, J, ...` (step `2^l / max_steps`)."""
    levels = num_levels(max_steps)
    return levels - np.arange(n) % levels


def grid_times(key: jax.Array, levels: np.ndarray, max_steps: int) -> jax.Array:
    """`[n]` times on the grid of each row's step `2^l / max_steps`: `k · 2^l / max_steps`."""
    steps = max_steps // 2**levels  # student steps from 0 to 1 at each level
    k = jax.random.randint(key, levels.shape, 0, steps)
    return k.astype(jnp.float32) / steps.astype(np.float32)


def _teacher_velocity(teacher, x, t, dt, cond, guide: np.ndarray, scale: float, null_cond):
    """`teacher(x, t, cond, dt)`, with classifier-free guidance of weight `scale` on the
    static rows `guide` (evaluated on the batch plus those rows with the null condition)."""
    if cond is None or guide.size == 0 or scale == 1.0:
        return teacher(x, t, cond=cond, dt=dt).astype(jnp.float32)
    n = x.shape[0]
    take = lambda a: jnp.concatenate([a, a[guide]])
    null = null_like(cond[guide], null_cond)
    both = teacher(take(x), take(t), cond=jnp.concatenate([cond, null]), dt=take(dt))
    both = both.astype(jnp.float32)
    v_cond, v_null = both[:n], both[n:]
    guided = v_null + scale * (v_cond[guide] - v_null)
    return v_cond.at[guide].set(guided)


def self_consistency_target(
    teacher,
    x_t: jax.Array,
    t: jax.Array,
    levels: np.ndarray,
    cond: jax.Array | None = None,
    *,
    max_steps: int,
    cfg_scale: float = 1.0,
    null_cond: int | None = None,
    clip: float | None = None,
) -> jax.Array:
    """`[n, ...]` target for `s(x_t, t, 2^l / max_steps)` (static `levels` `[n]`, each >= 1):
    the mean of two teacher steps of half that size, under `stop_gradient`."""
    half = jnp.asarray(2.0 ** (levels - 1) / max_steps, jnp.float32)
    dt = jnp.asarray(level_dt(levels - 1, max_steps), jnp.float32)
    guide = np.flatnonzero(levels == 1)  # teacher = the flow-matching velocity
    clip_ = (lambda a: jnp.clip(a, -clip, clip)) if clip else (lambda a: a)
    kw = dict(guide=guide, scale=cfg_scale, null_cond=null_cond)
    s1 = _teacher_velocity(teacher, x_t, t, dt, cond, **kw)
    x_mid = clip_(x_t + broadcast_to(half, x_t) * s1)
    s2 = _teacher_velocity(teacher, x_mid, t + half, dt, cond, **kw)
    return jax.lax.stop_gradient(clip_(0.5 * (s1 + s2)))


def bootstrap_rows(batch_size: int, n: int) -> np.ndarray:
    """The batch rows `[n]` that hold the self-consistency targets: every `B // n`-th row
    (0, k, 2k, ...), so that under a data-sharded batch each device holds its share of them
    and gathers and scatters of those rows are reshapes, with no cross-device traffic (a
    prefix of the batch would live on the first devices only)."""
    if n == 0:
        return np.zeros((0,), int)
    return np.arange(n) * (batch_size // n)


def _strided(rows: np.ndarray, length: int) -> int | None:
    """`k` when `rows` is `0, k, 2k, ...` (k >= 1) and `rows.size * k <= length` (whole
    blocks of `k` rows), else None."""
    if rows.size == 0 or rows[0] != 0:
        return None
    k = int(rows[1] - rows[0]) if rows.size > 1 else 1
    strided = k >= 1 and np.array_equal(rows, np.arange(rows.size) * k)
    return k if strided and rows.size * k <= length else None


def take_rows(a: jax.Array, rows: np.ndarray) -> jax.Array:
    """`a[rows]` for static `rows`; strided rows as a reshape (no gather under sharding)."""
    k = _strided(rows, a.shape[0])
    if k is None:
        return a[rows]
    m = rows.size * k
    return a[:m].reshape(rows.size, k, *a.shape[1:])[:, 0]


def put_rows(a: jax.Array, rows: np.ndarray, values: jax.Array) -> jax.Array:
    """`a.at[rows].set(values)` for static `rows`; strided rows as a reshape."""
    k = _strided(rows, a.shape[0])
    if k is None:
        return a.at[rows].set(values)
    m = rows.size * k
    head = a[:m].reshape(rows.size, k, *a.shape[1:]).at[:, 0].set(values)
    return jnp.concatenate([head.reshape(m, *a.shape[1:]), a[m:]])


def shortcut_targets(
    teacher,
    x0: jax.Array,
    x1: jax.Array,
    t: jax.Array,
    levels: np.ndarray,
    cond: jax.Array | None = None,
    **target_kw,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(x_t, dt, target)` for rows at static `levels` `[B]`: rows of level >= 1 get the
    self-consistency target (`self_consistency_target(**target_kw)`), rows of level 0 (the
    smallest step: flow-matching rows, `dt = 0`) the target `x1 - x0`. Any layout works;
    `bootstrap_rows`' strided one moves no data between devices."""
    rows = np.flatnonzero(levels > 0)
    tb = broadcast_to(t, x1)
    x_t = (1.0 - tb) * x0 + tb * x1
    target = x1 - x0
    if rows.size:
        boot = self_consistency_target(
            teacher,
            take_rows(x_t, rows),
            take_rows(t, rows),
            levels[rows],
            None if cond is None else take_rows(cond, rows),
            **target_kw,
        )
        target = put_rows(target, rows, boot)
    dt = jnp.asarray(level_dt(levels, target_kw["max_steps"]), jnp.float32)
    return x_t, dt, target


def _level_metrics(per_example: jax.Array, levels: np.ndarray, max_steps: int) -> dict:
    """Mean loss of the flow-matching rows and of each bootstrap level, named by the number
    of sampling steps it serves (`loss_k1` is the one-step level)."""
    masked_mean = lambda mask: jnp.sum(jnp.where(mask, per_example, 0.0)) / np.sum(mask)
    metrics = {"loss_fm": masked_mean(levels == 0)}  # static masks: no gathers
    for level in np.unique(levels[levels > 0]):
        metrics[f"loss_k{max_steps // 2**level}"] = masked_mean(levels == level)
    return metrics


def loss_shortcut(
    net,
    batch: dict,
    key: jax.Array,
    *,
    bootstrap_every: int = 8,
    max_steps: int = 128,
    teacher: str = "ema",
    bootstrap_cfg_scale: float = 1.0,
    target_clip: float | None = None,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
    ot_pairing: bool = False,
    ot_reg: float = 0.05,
    ot_iters: int = 100,
    ema_net=None,
    teacher_ema_net=None,
):
    """Shortcut-model loss; returns (per-example loss [B], metrics). See the module doc."""
    if teacher not in TEACHERS:
        raise UserError(f"unknown shortcut teacher {teacher!r}; known: {', '.join(TEACHERS)}")
    if teacher == "ema" and ema_net is None:
        raise UserError(
            "shortcut loss with teacher='ema' needs ema_net (the trainer passes it); "
            "pass ema_net= or use teacher='current'"
        )
    if (teacher == "teacher_ema") != (teacher_ema_net is not None):
        raise UserError(
            "shortcut loss with teacher='teacher_ema' needs a teacher EMA: set "
            "teacher_ema_decay > 0 (e.g. 0.99)"
            if teacher == "teacher_ema"
            else f"a teacher EMA is kept (teacher_ema_decay > 0) but loss.teacher={teacher!r} "
            "never uses it: set loss.teacher='teacher_ema' or teacher_ema_decay=0"
        )
    x1 = batch["x"].astype(jnp.float32)
    batch_size = x1.shape[0]
    n = bootstrap_size(batch_size, bootstrap_every, max_steps)
    rows = bootstrap_rows(batch_size, n)
    levels = np.zeros(batch_size, int)
    levels[rows] = bootstrap_levels(n, max_steps)
    k_grid, k_t, k_noise, k_drop = jax.random.split(key, 4)
    t = sample_time(
        k_t, batch_size, time_sampling=time_sampling, logit_mean=logit_mean, logit_std=logit_std
    )
    t = put_rows(t, rows, grid_times(k_grid, levels[rows], max_steps))
    x0 = jax.random.normal(k_noise, x1.shape)
    if ot_pairing:
        k_ot = jax.random.fold_in(key, 1)
        x0 = sinkhorn_pairing(k_ot, x0, x1, reg=ot_reg, num_iters=ot_iters)
    cond = drop_cond(k_drop, batch.get("cond"), cond_drop_prob, null_cond)
    if cond is not None and bootstrap_cfg_scale != 1.0 and null_cond is None:
        raise UserError("bootstrap_cfg_scale != 1 needs null_cond (the network's num_classes)")
    teachers = {"current": net, "ema": ema_net, "teacher_ema": teacher_ema_net}
    x_t, dt, target = shortcut_targets(
        teachers[teacher],
        x0,
        x1,
        t,
        levels,
        cond,
        max_steps=max_steps,
        cfg_scale=bootstrap_cfg_scale,
        null_cond=null_cond,
        clip=target_clip,
    )
    v = net(x_t, t, cond=cond, dt=dt).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(v - target), axis=tuple(range(1, x1.ndim)))
    return per_example, _level_metrics(per_example, levels, max_steps)
