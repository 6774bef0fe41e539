"""The null condition of classifier-free guidance, shared by losses (label dropout, guided
targets) and samplers (guidance): the label `null_cond` (a network's `num_classes`) for
int labels, the zero vector for condition embeddings."""

import jax
import jax.numpy as jnp


def null_like(cond: jax.Array, null_cond: int) -> jax.Array:
    """The null condition shaped like `cond`: label `null_cond`, or zeros for embeddings."""
    if jnp.issubdtype(cond.dtype, jnp.integer):
        return jnp.full_like(cond, null_cond)
    return jnp.zeros_like(cond)
