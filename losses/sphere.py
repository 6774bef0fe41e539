"""Riemannian flow matching on the sphere (Chen & Lipman, arXiv 2302.03660).

Noise `x0` is uniform on S^{D-1}, the path is the geodesic `x_t = exp_{x0}(t log_{x0}(x1))`,
and the conditional target is its velocity `u_t = log_{x_t}(x1) / (1 - t)`, computed in closed
form (`manifolds.sphere.geodesic_velocity`, no division by `1 - t`). The per-example loss is
`|P_{x_t} v(x_t, t) - u_t|²`, the squared Riemannian (= ambient) norm in the tangent space at
`x_t`; the network output is projected first, so any ambient network can be trained.
"""

import jax
import jax.numpy as jnp

from core.errors import UserError
from losses.flow_matching import drop_cond
from manifolds.sphere import geodesic, geodesic_velocity, to_tangent, uniform


def loss_sphere_fm(
    net,
    batch: dict,
    key: jax.Array,
    *,
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
    t_eps: float = 0.0,
) -> tuple[jax.Array, dict]:
    """Riemannian flow-matching loss on the sphere.

    Args:
      net: `net(x [B, D], t [B], *, cond) -> v [B, D]`.
      batch: `{"x": [B, D] unit vectors (data, t = 1), optional "cond": [B] or [B, E]}`.
      key: randomness for the noise, the times and the condition dropout.
      cond_drop_prob: probability of replacing `cond` by the null condition (guidance).
      null_cond: the null label for int labels (normally the network's `num_classes`);
        float embeddings are nulled to the zero vector (`losses.flow_matching.drop_cond`).
      t_eps: `t ~ U[0, 1 - t_eps]`. The target has no singularity at `t = 1`, so 0 is safe.

    Returns:
      `(per_example [B], metrics)` with metrics `target_sq_norm` (mean `|u_t|²`).
    """
    x1 = batch["x"]
    if x1.ndim != 2:
        raise UserError(f"loss_sphere_fm needs x [B, D] points on the sphere, got {x1.shape}")
    b, d = x1.shape
    cond = batch.get("cond")
    if (
        cond_drop_prob > 0
        and cond is not None
        and null_cond is None
        and jnp.issubdtype(cond.dtype, jnp.integer)
    ):
        raise UserError(
            "cond_drop_prob > 0 with int labels needs null_cond "
            "(the network's null label, normally num_classes)"
        )
    key_x0, key_t, key_drop = jax.random.split(key, 3)
    x0 = uniform(key_x0, (b,), d, x1.dtype)
    t = jax.random.uniform(key_t, (b,), x1.dtype, 0.0, 1.0 - t_eps)
    x_t = geodesic(x0, x1, t)
    target = jax.lax.stop_gradient(geodesic_velocity(x0, x1, t))
    cond = drop_cond(key_drop, cond, cond_drop_prob, null_cond)
    v = to_tangent(x_t, net(x_t, t, cond=cond).astype(jnp.float32))
    per_example = jnp.sum(jnp.square(v - target), axis=-1)
    return per_example, {"target_sq_norm": jnp.mean(jnp.sum(jnp.square(target), axis=-1))}
