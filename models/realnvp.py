"""RealNVP-style affine coupling flow (Dinh et al. 2017) on NHWC images, the classic baseline
beside TarFlow, on the same `Flow` protocol.

The image is squeezed to `[B, H/2, W/2, 4C]` (each 2×2 patch into channels, channel
`(2p + q) C + c` for patch row p, column q and image channel c); then `num_couplings`
affine couplings follow. Coupling k reorders the channels by a fixed permutation (identity,
reversed, even|odd, reversed even|odd, cycling), keeps the first half `x_a`, and maps the
second. Identity and reversed split each patch into its top and bottom row (all C
channels). Even|odd splits by the parity of `(2p + q) C + c`: for C = 1 that is the left
and right column (rows and columns in turn), for even C (e.g. 2) it is the parity of the
image channel c at every pixel (all four pixels on both sides), and for odd C > 1 (e.g. RGB)
a checkerboard over (column, channel), the parity of `q + c`. The second half is mapped by
`z_b = (x_b - t(x_a)) · exp(-s(x_a))` with `s = scale · tanh(raw)` (bounded, as in RealNVP)
from a small conv net whose last conv is zero-initialised, so a fresh flow is the
identity. `log|det ∂z/∂x| = -Σ s`. `z` has the shape of `x`.
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import CondEmbed, Dtype


def channel_permutation(channels: int, k: int) -> np.ndarray:
    """The fixed channel order of coupling `k` (cycle of 4)."""
    base = np.arange(channels)
    if k % 4 >= 2:
        base = np.concatenate([base[0::2], base[1::2]])
    return base[::-1].copy() if k % 2 else base


class Coupling(nnx.Module):
    """One affine coupling on `[B, h, w, C]` (C even) with a conv net `x_a -> (s, t)`."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        k: int,
        *,
        num_classes: int,
        cond_dim: int,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        half = channels // 2
        self.dtype = dtype
        self.perm = tuple(int(i) for i in channel_permutation(channels, k))
        self.inv_perm = tuple(int(i) for i in np.argsort(self.perm))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        self.conv_in = nnx.Conv(half, hidden, (3, 3), **kw)
        self.conv_mid = nnx.Conv(hidden, hidden, (1, 1), **kw)
        self.conv_out = nnx.Conv(hidden, 2 * half, (3, 3), kernel_init=zeros, **kw)
        self.scale = nnx.Param(jnp.ones((half,), param_dtype))
        has_cond = num_classes > 0 or cond_dim > 0
        self.cond_embed = (
            CondEmbed(hidden, num_classes=num_classes, cond_dim=cond_dim, **kw)
            if has_cond
            else None
        )

    def _params(self, x_a: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        h = self.conv_in(x_a.astype(self.dtype))
        if self.cond_embed is not None:
            h = h + self.cond_embed(cond, x_a.shape[0])[:, None, None, :].astype(h.dtype)
        elif cond is not None:
            raise ValueError("this flow is unconditional (num_classes=0, cond_dim=0)")
        h = jax.nn.relu(self.conv_mid(jax.nn.relu(h)))
        raw_s, t = jnp.split(self.conv_out(jax.nn.relu(h)).astype(jnp.float32), 2, axis=-1)
        scale = self.scale[...].astype(jnp.float32).reshape(1, 1, 1, -1)
        return scale * jnp.tanh(raw_s), t

    def forward(self, x: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        x_a, x_b = jnp.split(jnp.take(x, jnp.asarray(self.perm), axis=-1), 2, axis=-1)
        s, t = self._params(x_a, cond)
        z = jnp.concatenate([x_a, (x_b - t) * jnp.exp(-s)], axis=-1)
        return z[..., jnp.asarray(self.inv_perm)], -jnp.sum(s, axis=(1, 2, 3))

    def inverse(self, z: jax.Array, cond: jax.Array | None) -> jax.Array:
        z_a, z_b = jnp.split(jnp.take(z, jnp.asarray(self.perm), axis=-1), 2, axis=-1)
        s, t = self._params(z_a, cond)
        return jnp.concatenate([z_a, z_b * jnp.exp(s) + t], axis=-1)[
            ..., jnp.asarray(self.inv_perm)
        ]


class RealNVP(nnx.Module):
    """`forward(x [B, H, W, C], *, cond=None) -> (z, logdet [B])`, `inverse(z, *, cond) -> x`
    (H and W even). `cond`: int labels `[B]` (`num_classes` is the null label) or
    embeddings `[B, cond_dim]`, added to every coupling net's hidden features."""

    def __init__(
        self,
        in_channels: int,
        hidden: int = 64,
        num_couplings: int = 8,
        num_classes: int = 0,
        cond_dim: int = 0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_channels = in_channels
        kw = dict(num_classes=num_classes, cond_dim=cond_dim, dtype=dtype, param_dtype=param_dtype)
        self.couplings = nnx.List(
            [Coupling(4 * in_channels, hidden, k, **kw, rngs=rngs) for k in range(num_couplings)]
        )

    def _squeeze(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(
                f"RealNVP expects x of shape [B, H, W, {self.in_channels}] with H and W even, "
                f"got {list(x.shape)}"
            )
        return einops.rearrange(x.astype(jnp.float32), "b (h p) (w q) c -> b h w (p q c)", p=2, q=2)

    def _unsqueeze(self, x: jax.Array) -> jax.Array:
        return einops.rearrange(x, "b h w (p q c) -> b (h p) (w q) c", p=2, q=2)

    def forward(
        self, x: jax.Array, *, cond: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        h = self._squeeze(x)
        logdet = jnp.zeros((x.shape[0],), jnp.float32)
        for coupling in self.couplings:
            h, step_logdet = coupling.forward(h, cond)
            logdet = logdet + step_logdet
        return self._unsqueeze(h), logdet

    def inverse(self, z: jax.Array, *, cond: jax.Array | None = None) -> jax.Array:
        h = self._squeeze(z)
        for coupling in reversed(self.couplings):
            h = coupling.inverse(h, cond)
        return self._unsqueeze(h)
