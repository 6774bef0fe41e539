"""U-Net velocity net in the DDPM++/ADM style for NHWC images `[B, S, S, C]`.

Residual blocks: GroupNorm -> SiLU -> conv -> scale-shift GroupNorm from the embedding ->
SiLU -> zero-initialised conv, plus a (1x1 conv) skip. Self-attention at the side lengths in
`attn_resolutions` and in the middle; skip connections from every down block to the up path.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Attention, Dtype, Embedding, modulate


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= `max_groups` that divides `channels`."""
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def resample(x: jax.Array, kind: str) -> jax.Array:
    """`[B, H, W, C]` -> 2x nearest upsampling ("up") or 2x2 average pooling ("down")."""
    b, h, w, c = x.shape
    if kind == "up":
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nnx.Module):
    """`[B, H, W, cin]`, emb `[B, E]` -> `[B, H', W', cout]` (H' = H, 2H or H/2)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int,
        *,
        kind: str | None = None,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.kind = kind
        self.norm1 = nnx.GroupNorm(cin, num_groups(cin), epsilon=1e-5, **kw)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), **kw)
        self.emb = nnx.Linear(emb_dim, 2 * cout, **kw)
        self.norm2 = nnx.GroupNorm(cout, num_groups(cout), epsilon=1e-5, **kw)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), kernel_init=nnx.initializers.zeros_init(), **kw)
        self.skip = nnx.Conv(cin, cout, (1, 1), **kw) if cin != cout else None

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.norm1(x))
        if self.kind is not None:
            h, x = resample(h, self.kind), resample(x, self.kind)
        h = self.conv1(h)
        scale, shift = jnp.split(self.emb(emb), 2, axis=-1)
        h = self.conv2(jax.nn.silu(modulate(self.norm2(h), shift, scale)))
        return (x if self.skip is None else self.skip(x)) + h


class Resample(nnx.Module):
    """Strided 3x3 conv ("down") or nearest upsampling + 3x3 conv ("up"); keeps channels."""

    def __init__(
        self, channels: int, kind: str, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        self.kind = kind
        stride = 2 if kind == "down" else 1
        self.conv = nnx.Conv(
            channels,
            channels,
            (3, 3),
            strides=stride,
            padding=((1, 1), (1, 1)),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        del emb  # same signature as a ResBlock used for resampling
        return self.conv(resample(x, "up") if self.kind == "up" else x)


class AttnBlock(nnx.Module):
    """`x + Attention(GroupNorm(x))` over the `H * W` positions; the output starts at zero."""

    def __init__(
        self, channels: int, num_heads: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.GroupNorm(channels, num_groups(channels), epsilon=1e-5, **kw)
        self.attn = Attention(channels, num_heads, zero_init_out=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        return x + self.attn(self.norm(x).reshape(b, h * w, c)).reshape(x.shape)


class Level(nnx.Module):
    """One resolution: ResBlocks (each followed by attention when `heads`), then a resampler."""

    def __init__(
        self,
        pairs: list[tuple[int, int]],
        emb_dim: int,
        heads: int | None,
        kind: str | None,
        resblock_updown: bool,
        **kw,
    ):
        self.blocks = nnx.List([ResBlock(ci, co, emb_dim, **kw) for ci, co in pairs])
        self.attns = nnx.List([AttnBlock(co, heads, **kw) for _, co in pairs]) if heads else None
        c = pairs[-1][1]
        if kind is None:
            self.resampler = None
        elif resblock_updown:
            self.resampler = ResBlock(c, c, emb_dim, kind=kind, **kw)
        else:
            self.resampler = Resample(c, kind, **kw)

    def __call__(self, h: jax.Array, emb: jax.Array, skips: list[jax.Array], up: bool) -> jax.Array:
        """Down (`up=False`): push every output on `skips`; up: pop one skip per block."""
        for i, block in enumerate(self.blocks):
            h = block(jnp.concatenate([h, skips.pop()], axis=-1) if up else h, emb)
            h = h if self.attns is None else self.attns[i](h)
            if not up:
                skips.append(h)
        if self.resampler is not None:
            h = self.resampler(h, emb)
            if not up:
                skips.append(h)
        return h


class UNet(nnx.Module):
    """`net(x [B, S, S, C], t [B], *, cond=None, dt=None) -> v` float32, `S = image_size`.

    `attn_resolutions` are side lengths (of `image_size // 2**level`); `head_dim`, when given,
    overrides `num_heads` (heads = channels // head_dim)."""

    def __init__(
        self,
        in_channels: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        head_dim: int | None = None,
        image_size: int = 32,
        num_classes: int = 0,
        cond_dim: int = 0,
        use_dt: bool = False,
        resblock_updown: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        sides = _check_sizes(image_size, ch_mult, attn_resolutions)
        self.in_channels, self.image_size, self.dtype = in_channels, image_size, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        heads = lambda c: c // head_dim if head_dim else num_heads
        emb_dim = 4 * ch
        self.embed = Embedding(
            emb_dim, num_classes=num_classes, cond_dim=cond_dim, use_dt=use_dt, freq_dim=ch, **kw
        )
        self.conv_in = nnx.Conv(in_channels, ch, (3, 3), **kw)
        skip_ch, cur, down = [ch], ch, []
        for i, mult in enumerate(ch_mult):
            pairs = [(cur if j == 0 else ch * mult, ch * mult) for j in range(num_res_blocks)]
            cur = ch * mult
            skip_ch += [cur] * num_res_blocks
            kind = "down" if i < len(ch_mult) - 1 else None
            skip_ch += [cur] if kind else []
            attn = heads(cur) if sides[i] in attn_resolutions else None
            down.append(Level(pairs, emb_dim, attn, kind, resblock_updown, **kw))
        self.down = nnx.List(down)
        self.mid1 = ResBlock(cur, cur, emb_dim, **kw)
        self.mid_attn = AttnBlock(cur, heads(cur), **kw)
        self.mid2 = ResBlock(cur, cur, emb_dim, **kw)
        up = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            pairs = []
            for _ in range(num_res_blocks + 1):
                pairs.append((cur + skip_ch.pop(), ch * mult))
                cur = ch * mult
            attn = heads(cur) if sides[i] in attn_resolutions else None
            up.append(Level(pairs, emb_dim, attn, "up" if i else None, resblock_updown, **kw))
        self.up = nnx.List(up)
        self.norm_out = nnx.GroupNorm(cur, num_groups(cur), epsilon=1e-5, **kw)
        self.conv_out = nnx.Conv(
            cur, in_channels, (3, 3), kernel_init=nnx.initializers.zeros_init(), **kw
        )

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        cond: jax.Array | None = None,
        dt: jax.Array | None = None,
    ) -> jax.Array:
        want = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(
                f"this UNet was built for x of shape [B, {', '.join(map(str, want))}]"
                f" (image_size={self.image_size}), got {list(x.shape)}"
            )
        emb = jax.nn.silu(self.embed(x, t, cond, dt))
        h = self.conv_in(x.astype(self.dtype))
        skips = [h]
        for level in self.down:
            h = level(h, emb, skips, up=False)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level in self.up:
            h = level(h, emb, skips, up=True)
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)


def _check_sizes(
    image_size: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int]
) -> list[int]:
    """The side length at each level; a ValueError for sizes the U-Net cannot take."""
    if not ch_mult:
        raise ValueError("ch_mult must name at least one level")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2^(len(ch_mult)-1) = "
            f"{factor} (ch_mult={tuple(ch_mult)}); use fewer levels"
        )
    sides = [image_size // 2**i for i in range(len(ch_mult))]
    missing = sorted(set(attn_resolutions) - set(sides))
    if missing:
        raise ValueError(
            f"attn_resolutions {missing} match no level; the side lengths for "
            f"image_size={image_size}, ch_mult={tuple(ch_mult)} are {sides}"
        )
    return sides
