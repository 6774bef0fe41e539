"""GIVT (Tschannen et al. 2023, arXiv 2312.02116): a decoder-only causal transformer over
sequences of real-valued tokens whose output at each position is a k-component Gaussian
mixture with diagonal covariances, the density of the next token.

Shapes: `B` batch, `T` tokens, `d` token size (the VAE's latent channels), `k` mixture
components, `D` width. Token `i` of the input `seq [B, T, d]` is predicted from the
condition token (a class label's embedding, the null label's for classifier-free guidance,
or a learned start token for an unconditional model) and the tokens before it: the
transformer's input is `[c, proj(x_0), ..., proj(x_{T-2})]` and its output at position `i`
gives the mixture of `x_i` (raster order of the VAE's latent grid).

The head: mixture logits, means and scales `sqrt-plus(s) = (s + sqrt(s² + 4)) / 2` (smooth,
positive, ~s for large s; big_vision's `fix_square_plus`) floored at `min_scale`. Its kernel
is small-normal, not zero, initialised: a zero head starts every component identical, and
identical components get identical gradients forever (the mixture would stay one Gaussian).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.causal import CausalLayer, decode_layers, empty_caches
from models.layers import XAVIER, CondEmbed, Dtype, layer_norm

LOG_2PI = math.log(2.0 * math.pi)


def gmm_log_prob(
    mix_logits: jax.Array, means: jax.Array, scales: jax.Array, x: jax.Array
) -> jax.Array:
    """Log density of `x (..., d)` under the mixture with (unnormalised) weights
    `mix_logits (..., k)` of diagonal Gaussians `N(means, diag(scales²))`, each `(..., k, d)`
    -> `(...)`. In float32 by log-sum-exp over the components: tiny scales and far-away
    points give large negative but finite values (the largest component's term is exact)."""
    mix_logits, means, scales, x = (a.astype(jnp.float32) for a in (mix_logits, means, scales, x))
    z = (x[..., None, :] - means) / scales
    component = -0.5 * jnp.sum(z * z, axis=-1) - jnp.sum(jnp.log(scales), axis=-1)
    component = component - 0.5 * x.shape[-1] * LOG_2PI
    return jax.nn.logsumexp(jax.nn.log_softmax(mix_logits, axis=-1) + component, axis=-1)


def square_plus(s: jax.Array) -> jax.Array:
    return 0.5 * (s + jnp.sqrt(s * s + 4.0))


class GIVT(nnx.Module):
    """`net(seq [B, T, d], *, cond=None) -> (mix_logits [B, T, k], means [B, T, k, d],
    scales [B, T, k, d])` (float32), the mixture of token `i` from the tokens before it;
    `decode(prev, i, c, caches)` is one step of the same computation with a key/value cache
    (`models/causal.py`), for sampling. `cond`: int labels `[B]`, `num_classes` (or None) the
    null label; an unconditional model (`num_classes=0`) takes no cond.
    """

    def __init__(
        self,
        tokens: int,
        token_dim: int,
        num_mixtures: int = 16,
        width: int = 512,
        depth: int = 8,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        num_classes: int = 0,
        min_scale: float = 1e-6,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if width % head_dim:
            raise ValueError(f"width={width} is not divisible by head_dim={head_dim}")
        if tokens < 1 or token_dim < 1 or num_mixtures < 1:
            raise ValueError(
                f"tokens, token_dim and num_mixtures must be >= 1, got {tokens}, {token_dim}, "
                f"{num_mixtures}"
            )
        self.tokens, self.token_dim, self.num_mixtures = tokens, token_dim, num_mixtures
        self.num_classes, self.min_scale, self.dtype = num_classes, min_scale, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = nnx.Linear(token_dim, width, kernel_init=XAVIER, **kw)
        self.pos = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (tokens, width)))
        if num_classes > 0:
            self.cond_embed = CondEmbed(width, num_classes=num_classes, **kw)
            self.start = None
        else:
            self.cond_embed = None
            self.start = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (width,)))
        heads = width // head_dim
        self.layers = nnx.List([CausalLayer(width, heads, mlp_ratio, **kw) for _ in range(depth)])
        outputs = num_mixtures * (1 + 2 * token_dim)
        init = nnx.initializers.normal(0.02)
        self.head = nnx.Linear(width, outputs, kernel_init=init, **kw)

    @property
    def width(self) -> int:
        return self.pos.shape[-1]

    def embed_cond(self, cond: jax.Array | None, batch: int) -> jax.Array:
        """The condition token `[batch, D]`."""
        if self.cond_embed is None:
            if cond is not None:
                raise ValueError("this GIVT is unconditional (num_classes=0) but got a cond")
            return jnp.broadcast_to(self.start[...].astype(self.dtype), (batch, self.width))
        return self.cond_embed(cond, batch).astype(self.dtype)

    def mixture(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Transformer outputs `[..., D]` -> (logits `[..., k]`, means, scales `[..., k, d]`)."""
        out = self.head(layer_norm(h)).astype(jnp.float32)
        k, d = self.num_mixtures, self.token_dim
        logits = out[..., :k]
        rest = out[..., k:].reshape(*out.shape[:-1], k, 2, d)
        scales = jnp.maximum(square_plus(rest[..., 1, :]), self.min_scale)
        return logits, rest[..., 0, :], scales

    def __call__(self, seq: jax.Array, *, cond: jax.Array | None = None):
        b, t, d = seq.shape
        if (t, d) != (self.tokens, self.token_dim):
            raise ValueError(
                f"GIVT expects token sequences [B, {self.tokens}, {self.token_dim}], got "
                f"{list(seq.shape)}"
            )
        c = self.embed_cond(cond, b)[:, None]
        h = jnp.concatenate([c, self.proj_in(seq[:, :-1].astype(self.dtype))], axis=1)
        h = h + self.pos[...][None].astype(self.dtype)
        for layer in self.layers:
            h = layer(h)
        return self.mixture(h)

    def init_caches(self, batch: int) -> list:
        return empty_caches(self.layers, batch, self.tokens, self.width, self.dtype)

    def decode(self, prev: jax.Array, i: jax.Array, c: jax.Array, caches: list):
        """One step: the mixture of token `i` (`[B, k]`, `[B, k, d]`, `[B, k, d]`) from the
        previous token `prev [B, d]` (ignored at `i = 0`, where the input is the condition
        token `c [B, D]`) and the cache of the positions before `i`; returns
        `(mixture, caches)`."""
        x = self.proj_in(prev.astype(self.dtype))
        h = jnp.where(i == 0, c.astype(self.dtype), x)
        pos = jax.lax.dynamic_index_in_dim(self.pos[...], i, keepdims=False).astype(self.dtype)
        h, caches = decode_layers(self.layers, (h + pos[None])[:, None], i, caches)
        return self.mixture(h[:, 0]), caches
