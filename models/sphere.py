"""A velocity network on the sphere: an adaLN-conditioned residual MLP on ambient coordinates.

`SphereMLP(x, t, *, cond=None) -> v` with `x` `[B, D]` on S^{D-1}, `t` `[B]`, and `v` `[B, D]`
projected onto the tangent space at `x` (`<x, v> = 0`), float32. The conditioning vector
`c = time_mlp(t) [+ label or embedding]` modulates every block (shift, scale, gate;
gates start at zero, so each block starts as the identity). `cond` is an int label `[B]`
(`num_classes` = null label) or a float embedding `[B, cond_dim]` (null = the zero vector);
`cond=None` means null. A shortcut step size `dt` is not supported.

`fourier_features=M > 0` feeds `[x, sin(Bx), cos(Bx)]` instead of `x` to the first layer
(Fourier features, Tancik et al. 2020): the rows of `B` `[M, D]` point in fixed
pseudo-random directions with norms spaced geometrically from 1 to `fourier_max`, so a
small network can resolve structure down to about `1 / fourier_max` radians. `B` is a
function of (M, D, fourier_max) alone (drawn from a fixed key), not a parameter: it is not
trained and not stored in checkpoints.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifolds.sphere import to_tangent

_NUM_FREQS = 64
_FOURIER_KEY = 20201008  # fixed: the Fourier directions are part of the architecture


@functools.lru_cache(maxsize=8)
def fourier_matrix(num: int, dim: int, max_freq: float) -> np.ndarray:
    """`[num, dim]` frequency vectors: fixed pseudo-random unit directions, each scaled by
    one of `num` norms spaced geometrically from 1 to `max_freq` (radians^-1). Computed once
    per arguments, eagerly even inside a trace: a constant of the compiled forward, not a
    random draw in every ODE step's network call."""
    with jax.ensure_compile_time_eval():
        u = jax.random.normal(jax.random.key(_FOURIER_KEY), (num, dim), jnp.float32)
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        norms = jnp.geomspace(1.0, max_freq, num, dtype=jnp.float32)  # num = 1: [1.0]
        b = np.asarray(u * norms[:, None])
    b.flags.writeable = False  # shared by every caller through the cache
    return b


def time_features(t: jax.Array, num_freqs: int = _NUM_FREQS) -> jax.Array:
    """Sinusoidal features of `t` in [0, 1], `[B] -> [B, 2 num_freqs]` (periods 2π/1000 .. 2π)."""
    freqs = jnp.exp(jnp.linspace(0.0, math.log(1000.0), num_freqs, dtype=jnp.float32))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _AdaBlock(nnx.Module):
    """`h + gate * MLP(LN(h) * (1 + scale) + shift)`, with (shift, scale, gate) from `c`."""

    def __init__(self, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, use_scale=False, use_bias=False, **kw)
        self.fc1 = nnx.Linear(hidden, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, hidden, **kw)
        self.mod = nnx.Linear(hidden, 3 * hidden, kernel_init=nnx.initializers.zeros, **kw)

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(self.mod(nnx.silu(c)), 3, axis=-1)
        y = self.norm(h) * (1 + scale) + shift
        return h + gate * self.fc2(nnx.silu(self.fc1(y)))


class SphereMLP(nnx.Module):
    """Tangent velocity field on S^{dim-1}; see the module docstring.

    Args:
      dim: ambient dimension D (3 for S²).
      hidden, depth: width and number of residual blocks.
      num_classes: > 0 for int-label conditioning (label `num_classes` is null).
      cond_dim: > 0 for float-embedding conditioning `[B, cond_dim]`.
      fourier_features: M > 0 adds `sin/cos(Bx)` of M fixed frequency vectors to the
        input (module docstring); 0 feeds `x` alone.
      fourier_max: the largest frequency norm, in radians^-1 (>= 1).
      dtype, param_dtype: compute and parameter dtypes (output is float32).
    """

    def __init__(
        self,
        dim: int = 3,
        hidden: int = 512,
        depth: int = 6,
        num_classes: int = 0,
        cond_dim: int = 0,
        fourier_features: int = 0,
        fourier_max: float = 64.0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if num_classes and cond_dim:
            raise ValueError("SphereMLP takes either num_classes or cond_dim, not both")
        if fourier_features < 0 or not fourier_max >= 1.0:
            raise ValueError(
                f"SphereMLP needs fourier_features >= 0 and fourier_max >= 1, got "
                f"{fourier_features} and {fourier_max}"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim, self.num_classes, self.cond_dim = dim, num_classes, cond_dim
        self.dtype = dtype
        self.fourier_features, self.fourier_max = fourier_features, float(fourier_max)
        self.embed_x = nnx.Linear(dim + 2 * fourier_features, hidden, **kw)
        self.time1 = nnx.Linear(2 * _NUM_FREQS, hidden, **kw)
        self.time2 = nnx.Linear(hidden, hidden, **kw)
        self.label = nnx.Embed(num_classes + 1, hidden, **kw) if num_classes else None
        self.embed_cond = nnx.Linear(cond_dim, hidden, **kw) if cond_dim else None
        self.blocks = nnx.List([_AdaBlock(hidden, **kw) for _ in range(depth)])
        self.norm_out = nnx.LayerNorm(hidden, use_scale=False, use_bias=False, **kw)
        self.mod_out = nnx.Linear(hidden, 2 * hidden, kernel_init=nnx.initializers.zeros, **kw)
        self.out = nnx.Linear(hidden, dim, **kw)

    def _cond_vector(self, cond: jax.Array | None, batch: int) -> jax.Array | None:
        """The embedding `[B, hidden]` of `cond` (None where the net is unconditional)."""
        if self.label is not None:
            if cond is None:
                cond = jnp.full((batch,), self.num_classes, jnp.int32)
            if cond.shape != (batch,) or not jnp.issubdtype(cond.dtype, jnp.integer):
                raise ValueError(
                    f"SphereMLP with num_classes={self.num_classes} takes int "
                    f"labels [B]=[{batch}], got {cond.dtype} {cond.shape}"
                )
            return self.label(cond)
        if self.embed_cond is not None:
            if cond is None:
                cond = jnp.zeros((batch, self.cond_dim), self.dtype)
            if cond.shape != (batch, self.cond_dim):
                raise ValueError(
                    f"SphereMLP with cond_dim={self.cond_dim} takes embeddings "
                    f"[B, {self.cond_dim}], got shape {cond.shape}"
                )
            return self.embed_cond(cond.astype(self.dtype))
        if cond is not None:
            raise ValueError(
                "this SphereMLP is unconditional (num_classes=0, cond_dim=0) but got cond"
            )
        return None

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        cond: jax.Array | None = None,
        dt: jax.Array | None = None,
    ) -> jax.Array:
        """`x` `[B, D]` on the sphere, `t` `[B]` (or scalar) -> tangent velocity `[B, D]`."""
        if dt is not None:
            raise ValueError("SphereMLP does not take a shortcut step size dt")
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"SphereMLP(dim={self.dim}) takes x [B, {self.dim}], got {x.shape}")
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        c = self.time2(nnx.silu(self.time1(time_features(t).astype(self.dtype))))
        extra = self._cond_vector(cond, batch)
        if extra is not None:
            c = c + extra
        feats = x.astype(jnp.float32)
        if self.fourier_features:
            b = fourier_matrix(self.fourier_features, self.dim, self.fourier_max)
            angles = feats @ b.T
            feats = jnp.concatenate([feats, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        h = self.embed_x(feats.astype(self.dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = jnp.split(self.mod_out(nnx.silu(c)), 2, axis=-1)
        v = self.out(nnx.silu(self.norm_out(h) * (1 + scale) + shift))
        return to_tangent(x.astype(jnp.float32), v.astype(jnp.float32))
