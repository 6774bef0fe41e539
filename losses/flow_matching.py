"""Conditional flow matching on the linear (rectified-flow) path.

`x_t = (1 - t) x0 + t x1`, `x0 ~ N(0, I)`, target `v = x1 - x0`; per-example loss
`mean((net(x_t, t) - v)^2)` over all non-batch dimensions.
"""

import jax
import jax.numpy as jnp

from core.errors import UserError

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_time(
    key: jax.Array,
    n: int,
    *,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> jax.Array:
    """[n] times in (0, 1): uniform, or logit-normal (SD3: sigmoid of N(mean, std))."""
    if time_sampling == "uniform":
        return jax.random.uniform(key, (n,))
    if time_sampling == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,)))
    raise UserError(f"unknown time_sampling {time_sampling!r}; known: {', '.join(TIME_SAMPLINGS)}")


def drop_cond(
    key: jax.Array, cond: jax.Array | None, prob: float, null_cond: int | None
) -> jax.Array | None:
    """Replace each example's condition by the null one with probability `prob`.

    Int labels become `null_cond` (the network's null index, `num_classes`); float
    embeddings `[B, E]` become zeros.
    """
    if cond is None or prob <= 0.0:
        return cond
    drop = jax.random.bernoulli(key, prob, (cond.shape[0],))
    if jnp.issubdtype(cond.dtype, jnp.integer):
        if null_cond is None:
            raise UserError(
                "cond_drop_prob > 0 with int labels needs null_cond (the network's num_classes)"
            )
        return jnp.where(drop, jnp.asarray(null_cond, cond.dtype), cond)
    return jnp.where(drop.reshape((-1,) + (1,) * (cond.ndim - 1)), 0, cond).astype(cond.dtype)


def broadcast_to(t: jax.Array, x: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] with x's rank."""
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def sinkhorn_pairing(
    key: jax.Array, x0: jax.Array, x1: jax.Array, *, reg: float = 0.05, num_iters: int = 100
) -> jax.Array:
    """Minibatch OT (OT-CFM): re-pair noise to data along an entropic OT plan.

    Squared-euclidean cost, scaled by its mean; log-domain Sinkhorn with `reg`; then for
    each data point j a noise index is drawn from column j of the plan. Returns the
    re-ordered `x0` (rows drawn with replacement, as OT-CFM samples from the plan).
    """
    a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    cost = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    cost = cost / jnp.maximum(jnp.mean(cost), 1e-12)
    n = cost.shape[0]
    log_k = -cost / reg
    log_marginal = -jnp.log(n) * jnp.ones((n,))

    def body(carry, _):
        f, g = carry
        f = log_marginal - jax.nn.logsumexp(log_k + g[None, :], axis=1)
        g = log_marginal - jax.nn.logsumexp(log_k + f[:, None], axis=0)
        return (f, g), None

    (f, g), _ = jax.lax.scan(body, (jnp.zeros((n,)), jnp.zeros((n,))), None, length=num_iters)
    log_plan = log_k + f[:, None] + g[None, :]
    idx = jax.random.categorical(key, log_plan.T, axis=-1)  # for each data column j
    return x0[idx]


def loss_flow_matching(
    net,
    batch: dict,
    key: jax.Array,
    *,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
    ot_pairing: bool = False,
    ot_reg: float = 0.05,
    ot_iters: int = 100,
):
    """Flow-matching loss; returns (per-example loss [B], metrics)."""
    x1 = batch["x"].astype(jnp.float32)
    k_t, k_noise, k_drop, k_ot = jax.random.split(key, 4)
    t = sample_time(
        k_t, x1.shape[0], time_sampling=time_sampling, logit_mean=logit_mean, logit_std=logit_std
    )
    x0 = jax.random.normal(k_noise, x1.shape)
    if ot_pairing:
        x0 = sinkhorn_pairing(k_ot, x0, x1, reg=ot_reg, num_iters=ot_iters)
    tb = broadcast_to(t, x1)
    x_t = (1.0 - tb) * x0 + tb * x1
    cond = drop_cond(k_drop, batch.get("cond"), cond_drop_prob, null_cond)
    v = net(x_t, t, cond=cond).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(v - (x1 - x0)), axis=tuple(range(1, x1.ndim)))
    return per_example, {}
