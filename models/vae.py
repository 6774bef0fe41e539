"""A convolutional β-VAE (the first stage of GIVT, arXiv 2312.02116): images to a grid of
real-valued latent tokens and back.

Shapes: images `[B, S, S, C]` in [-1, 1]; the latent grid is `G × G` with `G = S / 2^(L-1)`
for `L = len(ch_mult)` levels (MNIST 28 with three levels: 7 × 7), read in raster order as
`T = G²` tokens of `latent_dim` channels: `[B, T, d]`.

`encode(x) -> (mean, logvar)` of the diagonal Gaussian posterior `q(z | x)`, `decode(z) -> x`;
`decoder_log_std()` is the log standard deviation σ of the Gaussian decoder `p(x | z) =
N(decode(z), σ² I)` that the ELBO of a likelihood bound needs (`losses/vae.py` fits it; it
never changes the reconstructions). It is stored divided by `LOG_STD_RATE`, so that an
optimizer's steps of ~lr in the parameter move log σ `LOG_STD_RATE` times faster: from 0 to
log 0.2 in ~160 steps at lr 1e-3, not ~1600. Residual blocks of GroupNorm -> SiLU -> 3x3 conv, stride-2 convolutions
down, nearest-neighbour upsampling and a convolution up; no attention, no BatchNorm.
"""

from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dtype
from models.unet import num_groups, resample

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance, clipped: exp stays finite
LOG_STD_RATE = 10.0  # decoder log σ = LOG_STD_RATE * its parameter


class _Block(nnx.Module):
    """Residual block `[B, H, W, cin] -> [B, H, W, cout]`."""

    def __init__(self, cin: int, cout: int, *, dtype: Dtype, param_dtype: Dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.GroupNorm(cin, num_groups(cin, 8), epsilon=1e-5, **kw)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), **kw)
        self.norm2 = nnx.GroupNorm(cout, num_groups(cout, 8), epsilon=1e-5, **kw)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), **kw)
        self.skip = nnx.Conv(cin, cout, (1, 1), **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class VAE(nnx.Module):
    """`encode(x [B, S, S, C]) -> (mean, logvar) [B, T, d]`, `decode(z [B, T, d]) -> x`."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: int = 4,
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by the VAE's downsampling {factor} "
                f"(ch_mult={tuple(ch_mult)})"
            )
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        self.grid, self.dtype = image_size // factor, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [ch * m for m in ch_mult]
        self.enc_in = nnx.Conv(in_channels, widths[0], (3, 3), **kw)
        enc, down, cin = [], [], widths[0]
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(_Block(cin, w, **kw))
                cin = w
            if level < len(widths) - 1:
                down.append(nnx.Conv(w, w, (3, 3), strides=(2, 2), **kw))
        self.enc_blocks, self.downs = nnx.List(enc), nnx.List(down)
        self.enc_norm = nnx.GroupNorm(cin, num_groups(cin, 8), epsilon=1e-5, **kw)
        self.enc_out = nnx.Conv(cin, 2 * latent_dim, (3, 3), **kw)
        self.dec_in = nnx.Conv(latent_dim, widths[-1], (3, 3), **kw)
        dec, up, cin = [], [], widths[-1]
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                dec.append(_Block(cin, w, **kw))
                cin = w
            if level > 0:
                up.append(nnx.Conv(w, w, (3, 3), **kw))
        self.dec_blocks, self.ups = nnx.List(dec), nnx.List(up)
        self.dec_norm = nnx.GroupNorm(cin, num_groups(cin, 8), epsilon=1e-5, **kw)
        self.dec_out = nnx.Conv(cin, in_channels, (3, 3), **kw)
        self.log_std = nnx.Param(jnp.zeros((), param_dtype))  # decoder log σ / LOG_STD_RATE
        self.blocks_per_level = num_res_blocks

    def decoder_log_std(self) -> jax.Array:
        """log σ of the Gaussian decoder (float32 scalar)."""
        return LOG_STD_RATE * self.log_std[...].astype(jnp.float32)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """`(T, d)`: the token sequence of one image."""
        return (self.grid * self.grid, self.latent_dim)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        s, c = self.image_size, self.in_channels
        if x.ndim != 4 or x.shape[1:] != (s, s, c):
            raise ValueError(f"the VAE expects images [B, {s}, {s}, {c}], got {list(x.shape)}")
        h = self.enc_in(x.astype(self.dtype))
        n = self.blocks_per_level
        for level in range(len(self.downs) + 1):
            for block in self.enc_blocks[level * n : (level + 1) * n]:
                h = block(h)
            if level < len(self.downs):
                h = self.downs[level](h)
        h = self.enc_out(jax.nn.silu(self.enc_norm(h))).astype(jnp.float32)
        mean, logvar = jnp.split(einops.rearrange(h, "b h w c -> b (h w) c"), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        if z.ndim != 3 or z.shape[1:] != self.latent_shape:
            raise ValueError(
                f"the VAE decodes latents [B, {self.latent_shape[0]}, {self.latent_shape[1]}], "
                f"got {list(z.shape)}"
            )
        h = einops.rearrange(z.astype(self.dtype), "b (h w) c -> b h w c", h=self.grid)
        h = self.dec_in(h)
        n = self.blocks_per_level
        for level in range(len(self.ups) + 1):
            for block in self.dec_blocks[level * n : (level + 1) * n]:
                h = block(h)
            if level < len(self.ups):
                h = self.ups[level](resample(h, "up"))
        return self.dec_out(jax.nn.silu(self.dec_norm(h))).astype(jnp.float32)
