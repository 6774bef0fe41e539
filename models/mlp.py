"""Residual MLP velocity net for vectors `[B, dim]` (2-D toy data, points on the sphere), or
for arrays `[B, ...]` of `dim` entries each (images, flattened in and reshaped out: the
CPU-sized network of the memorization sweep)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dtype, Embedding, layer_norm, modulate


class MLPBlock(nnx.Module):
    """`x + gate * W2 silu(W1 modulate(LN(x)))`, with (shift, scale, gate) from the embedding
    (adaLN-Zero: the modulation starts at zero, so the block starts as the identity)."""

    def __init__(self, hidden: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        self.ada = nnx.Linear(hidden, 3 * hidden, kernel_init=zeros, **kw)
        self.fc1 = nnx.Linear(hidden, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, hidden, **kw)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.ada(c), 3, axis=-1)
        h = modulate(layer_norm(x), shift, scale)
        return x + gate * self.fc2(jax.nn.silu(self.fc1(h)))


class MLP(nnx.Module):
    """`net(x [B, dim] or [B, ...dim entries], t [B], *, cond=None, dt=None) -> v` float32
    of `x`'s shape."""

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        num_classes: int = 0,
        cond_dim: int = 0,
        use_dt: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}")
        self.dim, self.dtype = dim, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Embedding(
            hidden,
            num_classes=num_classes,
            cond_dim=cond_dim,
            use_dt=use_dt,
            freq_dim=min(256, 2 * hidden),
            **kw,
        )
        self.inp = nnx.Linear(dim, hidden, **kw)
        self.blocks = nnx.List([MLPBlock(hidden, **kw) for _ in range(depth)])
        self.ada_out = nnx.Linear(
            hidden, 2 * hidden, kernel_init=nnx.initializers.zeros_init(), **kw
        )
        self.out = nnx.Linear(hidden, dim, **kw)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        cond: jax.Array | None = None,
        dt: jax.Array | None = None,
    ) -> jax.Array:
        shape = x.shape
        if x.ndim < 2 or math.prod(shape[1:]) != self.dim:
            raise ValueError(
                f"MLP expects x of shape [B, {self.dim}] (or [B, ...] of {self.dim} entries), "
                f"got {list(shape)}"
            )
        x = x.reshape(shape[0], self.dim)
        c = jax.nn.silu(self.embed(x, t, cond, dt))
        h = self.inp(x.astype(self.dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = jnp.split(self.ada_out(c), 2, axis=-1)
        out = self.out(modulate(layer_norm(h), shift, scale)).astype(jnp.float32)
        return out.reshape(shape)
