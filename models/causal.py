"""The causal transformer layer and its key/value cache, shared by the autoregressive models
(TarFlow's flow blocks, `models/tarflow.py`; GIVT, `models/givt.py`).

Shapes: `B` batch, `T` (or `S`) tokens, `D` width, `N` heads, `H = D / N` head size, `L`
cache length. A layer's cache is the pair `(keys, values)`, each `[B, L, N, H]`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import XAVIER, Dtype, attend, layer_norm

Cache = tuple[jax.Array, jax.Array]


class CausalLayer(nnx.Module):
    """Pre-norm transformer layer on `[B, T, D]`: causal attention, then a GELU MLP."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: int, *, dtype: Dtype, param_dtype: Dtype, rngs
    ):
        self.heads = heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=XAVIER, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, **kw)
        self.proj = nnx.Linear(width, width, **kw)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, **kw)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, **kw)

    def _qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, d = h.shape
        qkv = self.qkv(layer_norm(h)).reshape(b, t, 3, self.heads, d // self.heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _finish(self, h: jax.Array, attn: jax.Array) -> jax.Array:
        h = h + self.proj(attn.reshape(h.shape))
        return h + self.fc2(jax.nn.gelu(self.fc1(layer_norm(h)), approximate=False))

    def __call__(self, h: jax.Array) -> jax.Array:
        q, k, v = self._qkv(h)
        return self._finish(h, attend(q, k, v, is_causal=True))

    def decode(self, h: jax.Array, start: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Tokens `h [B, S, D]` at positions `start .. start + S - 1`; `cache` holds keys and
        values `[B, L, N, H]` of the positions before and gets these tokens' at theirs (a
        position may be written again: a later pass over the same segment overwrites it).
        Each token attends to the positions up to its own (causal within the segment)."""
        q, k, v = self._qkv(h)
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, 1)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, 1)
        query_pos = start + jnp.arange(h.shape[1])
        mask = jnp.arange(keys.shape[1])[None, :] <= query_pos[:, None]
        attn = jax.nn.dot_product_attention(q, keys, values, mask=mask[None, None])
        return self._finish(h, attn), (keys, values)


def empty_caches(layers, batch: int, length: int, width: int, dtype: Dtype) -> list[Cache]:
    """Zero keys and values `[batch, length, N, H]` for every layer of `layers`."""
    heads = layers[0].heads if len(layers) else 1
    shape = (batch, length, heads, width // heads)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in layers]


def decode_layers(layers, h: jax.Array, start: jax.Array, caches: list[Cache]):
    """`h [B, S, D]` at positions `start ..` through every layer with its cache ->
    `(h, caches)`."""
    new = []
    for layer, cache in zip(layers, caches):
        h, cache = layer.decode(h, start, cache)
        new.append(cache)
    return h, new
