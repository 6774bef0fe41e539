"""DiT velocity net (Peebles & Xie, 2023) for NHWC images: patchify -> adaLN-Zero
transformer blocks -> unpatchify. The 2-D sin-cos position embedding is computed from the
input size at call time, so one net takes any image whose sides divide by the patch.

Everything computes in `dtype` (LayerNorm statistics and the t sinusoid in float32); only the
output is cast to float32.
"""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (
    XAVIER,
    Attention,
    Dtype,
    Embedding,
    layer_norm,
    modulate,
    sincos_pos_embed_2d,
)

SIZES = {  # name: (hidden, depth, heads)
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCHES = (2, 4, 8)
MLP_RATIO = 4
FREQ_DIM = 256  # sinusoid size of the t / dt embeddings


def decode_variant(variant: str) -> tuple[int, int, int, int]:
    """ "B/2" -> (hidden, depth, heads, patch); a ValueError lists the choices."""
    size, _, patch = variant.partition("/")
    if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
        choices = ", ".join(f"{s}/{p}" for s in SIZES for p in PATCHES)
        raise ValueError(f"unknown DiT variant {variant!r}; choices: {choices}")
    return (*SIZES[size], int(patch))


class DiTBlock(nnx.Module):
    """adaLN-Zero block on `[B, T, D]` conditioned on `c = silu(emb)` `[B, D]`."""

    def __init__(
        self, hidden: int, heads: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(hidden, heads, kernel_init=XAVIER, **kw)
        self.fc1 = nnx.Linear(hidden, MLP_RATIO * hidden, kernel_init=XAVIER, **kw)
        self.fc2 = nnx.Linear(MLP_RATIO * hidden, hidden, kernel_init=XAVIER, **kw)
        self.ada = nnx.Linear(hidden, 6 * hidden, kernel_init=nnx.initializers.zeros_init(), **kw)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mods = jnp.split(self.ada(c)[:, None, :], 6, axis=-1)  # 6 x [B, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1 * self.attn(layer_norm(x) * (1 + scale1) + shift1)
        h = layer_norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))


class DiT(nnx.Module):
    """`net(x [B, H, W, C], t [B], *, cond=None, dt=None) -> v` float32.

    Sizes come from `variant` ("S|B|L|XL" "/" "2|4|8"); `hidden`, `depth`, `heads`, `patch`
    override them (for tiny test nets)."""

    def __init__(
        self,
        in_channels: int,
        variant: str = "B/2",
        num_classes: int = 0,
        cond_dim: int = 0,
        use_dt: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        hidden: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        patch: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        base = decode_variant(variant)
        hidden, depth, heads, patch = (
            o if o is not None else b for o, b in zip((hidden, depth, heads, patch), base)
        )
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden={hidden} must divide by heads={heads} and by 4")
        self.in_channels, self.patch, self.hidden, self.dtype = in_channels, patch, hidden, dtype
        zeros = nnx.initializers.zeros_init()
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Embedding(
            hidden,
            num_classes=num_classes,
            cond_dim=cond_dim,
            use_dt=use_dt,
            freq_dim=FREQ_DIM,
            **kw,
        )
        self.patch_embed = nnx.Linear(patch * patch * in_channels, hidden, kernel_init=XAVIER, **kw)
        self.blocks = nnx.List([DiTBlock(hidden, heads, **kw) for _ in range(depth)])
        self.ada_out = nnx.Linear(hidden, 2 * hidden, kernel_init=zeros, **kw)
        self.out = nnx.Linear(hidden, patch * patch * in_channels, kernel_init=zeros, **kw)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        cond: jax.Array | None = None,
        dt: jax.Array | None = None,
    ) -> jax.Array:
        p = self.patch
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"DiT expects x of shape [B, H, W, {self.in_channels}] with H and W "
                f"divisible by the patch {p}, got {list(x.shape)}"
            )
        h, w = x.shape[1:3]
        c = jax.nn.silu(self.embed(x, t, cond, dt))
        tokens = einops.rearrange(
            x.astype(self.dtype), "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p
        )
        pos = jnp.asarray(sincos_pos_embed_2d(self.hidden, h // p, w // p), self.dtype)
        z = self.patch_embed(tokens) + pos[None]
        for block in self.blocks:
            z = block(z, c)
        shift, scale = jnp.split(self.ada_out(c), 2, axis=-1)
        z = self.out(modulate(layer_norm(z), shift, scale))
        v = einops.rearrange(z, "b (h w) (p q c) -> b (h p) (w q) c", h=h // p, p=p, q=p)
        return v.astype(jnp.float32)
