"""TarFlow (Zhai et al. 2024, arXiv 2412.06329): a normalizing flow of autoregressive blocks,
each a causal transformer over image patches.

Shapes: `B` batch, `T` tokens (patches), `P = patch² · C` token size, `D` width.

Block k reads tokens `x [B, T, P]` (in reversed order for odd k) and maps them to
`z_i = (x_i - b_i) · exp(-a_i)`, where `(a_i, b_i) = f(x_<i)` is the transformer's output at
position `i - 1` (outputs shifted right by one, `a_0 = b_0 = 0`), so
`log|det ∂z/∂x| = -Σ_i a_i`. `forward(x) -> (z, logdet)` composes the blocks (data -> noise);
`inverse(z) -> x` undoes them in reverse, either token by token on `lax.scan` with a KV cache
("sequential") or by Jacobi fixed-point iteration ("jacobi"): all unknown tokens of a
segment updated at once, exact after as many passes as the segment has tokens. One segment
is plain Jacobi over the whole sequence; shorter segments, solved one after another with
the finished ones' keys and values cached, are the Gauss–Seidel–Jacobi of arXiv 2505.12849
(which cuts only the blocks that converge slowly: `segment` per block). The sequential
inverse costs `T - 1` passes of one token per block, Jacobi `n` passes of the segment's
tokens: it pays where a pass of many tokens costs about as much as one of a single token
(a GPU at small batch) and the passes converge well before the segment's length. The
output projection is zero-initialised, so a fresh flow is the identity.

Guidance (`cfg_scale = w`): the affine parameters of the conditional and the null condition
are mixed, `p = p_null + w (p_cond - p_null)` for p in (a, b) (the paper's `1 + g` form with
`g = w - 1`); `anneal=True` raises the weight linearly over the tokens of each block,
`w_j = 1 + (w - 1) j / (T - 1)` for the token at position `j` of the block's order (as
ml-tarflow's `annealed_guidance`: `g_j = g j / (T - 1)`). The transformer computes in
`dtype`; the affine maths and log-determinants are float32.

Jacobi and the compute dtype: the iterates, the update `z · exp(a) + b` and the stopping
criterion `max |Δx|` are float32 whatever `dtype`, but in bfloat16 the network's input and
the affine parameters `(a, b)` are rounded to 8 significant bits. A change of the iterate far
below that rounding still flips the rounding of some of the B · T · P inputs, so tokens keep
moving by about one bfloat16 step pass after pass, and a `tol` below the bfloat16
resolution (the default 1e-5) stops only when that chatter dies out, often near `T` passes
(a small random flow with T = 64 takes 20–24 passes per block in bfloat16, 4 in
float32; with tol 1e-3, 3–4 in both). It buys nothing: in bfloat16 the Jacobi and the
sequential inverse round differently and agree only to ~1e-3 on [-1, 1] at any `tol`.
Invert in float32 (`scripts.flow_inverse --dtype float32`, the same weights) for the early
stop at a small `tol`, or take a `tol` of the order of the bfloat16 step.
"""

from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import UserError
from models.causal import CausalLayer, decode_layers, empty_caches
from models.layers import XAVIER, CondEmbed, Dtype

METHODS = ("sequential", "jacobi")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inverse_args(
    method: str,
    tol: float,
    max_iters: int | None,
    segment: int | Sequence[int] | None = None,
    *,
    names: tuple[str, ...] = ("method", "tol", "max_iters", "segment"),
    zero_tol: bool = True,
) -> None:
    """One UserError naming the argument (`names`: how the caller spells the four) for an
    unknown inverse method, a tolerance that is not a number >= 0 (> 0 unless `zero_tol`:
    0 runs every pass), a pass cap that is not an integer >= 1, or a segment size that is
    not an integer >= 0 (or a sequence of them; 0 or None: the whole sequence). Used by
    `TarFlow.inverse`, the sampler (`samplers.tarflow`) and `scripts.flow_inverse`."""
    if method not in METHODS:
        known = ", ".join(METHODS)
        raise UserError(f"{names[0]}={method!r} is not an inverse method; known: {known}")
    number = isinstance(tol, int | float) and not isinstance(tol, bool)
    if not (number and (tol >= 0 if zero_tol else tol > 0)):
        bound = ">= 0" if zero_tol else "> 0"
        raise UserError(f"{names[1]}={tol!r} must be a number {bound} (max |Δx| per pass)")
    if max_iters is not None and not (_is_int(max_iters) and max_iters >= 1):
        raise UserError(
            f"{names[2]}={max_iters!r} must be an integer >= 1 (Jacobi passes per segment; "
            "unset: the segment's size)"
        )
    sizes = segment if isinstance(segment, list | tuple) else [segment]
    if not sizes or not all(s is None or (_is_int(s) and s >= 0) for s in sizes):
        raise UserError(
            f"{names[3]}={segment!r} must be an integer >= 0 (Jacobi segment size; 0: the "
            "whole sequence) or a list of them, one per block"
        )


def segment_sizes(segment: int | Sequence[int] | None, num_blocks: int) -> list[int | None]:
    """Per block (in the order the blocks are inverted) the Jacobi segment size, None for the
    whole sequence; a sequence of another length than `num_blocks` is a UserError."""
    if not isinstance(segment, list | tuple):
        segment = [segment] * num_blocks
    if len(segment) != num_blocks:
        raise UserError(
            f"segment={list(segment)!r} gives {len(segment)} sizes for {num_blocks} blocks"
        )
    return [s or None for s in segment]


JACOBI_BOUND = 1e6  # |x| bound on Jacobi iterates (data lies in about [-1, 1])


def _log_scale_and_shift(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The output projection `[..., 2P]` -> `(a, b)` float32 `[..., P]`."""
    a, b = jnp.split(out.astype(jnp.float32), 2, axis=-1)
    return a, b


def _guided(params: jax.Array, weight: jax.Array | None) -> jax.Array:
    """`[2B, ...]` (cond | null) -> `[B, ...]` mixed with `weight` (broadcast to the rest);
    no guidance when `weight` is None."""
    if weight is None:
        return params
    cond, null = jnp.split(params, 2)
    return null + weight * (cond - null)


class FlowBlock(nnx.Module):
    """One autoregressive affine flow block on tokens `[B, T, P]`."""

    def __init__(
        self,
        tokens: int,
        token_dim: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        *,
        reverse: bool,
        num_classes: int,
        cond_dim: int,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.reverse, self.dtype = reverse, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = nnx.Linear(token_dim, width, kernel_init=XAVIER, **kw)
        init = nnx.initializers.normal(0.01)
        self.pos = nnx.Param(init(rngs.params(), (tokens, width), param_dtype))
        has_cond = num_classes > 0 or cond_dim > 0
        self.cond_embed = (
            CondEmbed(width, num_classes=num_classes, cond_dim=cond_dim, **kw) if has_cond else None
        )
        self.layers = nnx.List([CausalLayer(width, heads, mlp_ratio, **kw) for _ in range(depth)])
        zeros = nnx.initializers.zeros_init()
        self.proj_out = nnx.Linear(width, 2 * token_dim, kernel_init=zeros, bias_init=zeros, **kw)

    def order(self, x: jax.Array) -> jax.Array:
        """Tokens `[B, T, ...]` into (or back from) this block's order."""
        return x[:, ::-1] if self.reverse else x

    def embed_cond(self, cond: jax.Array | None, batch: int) -> jax.Array:
        """`[batch, 1, D]` condition embedding (zeros for an unconditional block)."""
        if self.cond_embed is None:
            if cond is not None:
                raise ValueError("this flow is unconditional (num_classes=0, cond_dim=0)")
            return jnp.zeros((batch, 1, self.pos.shape[-1]), self.dtype)
        return self.cond_embed(cond, batch)[:, None, :].astype(self.dtype)

    def affine(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`x [B, T, P]` (block order), `c [B, 1, D]` -> `(a, b)` float32 `[B, T, P]`."""
        h = self.proj_in(x.astype(self.dtype)) + self.pos[None].astype(self.dtype) + c
        for layer in self.layers:
            h = layer(h)
        out = self.proj_out(h)
        out = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
        return _log_scale_and_shift(out)

    def forward(self, x: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """`x [B, T, P]` float32 -> `(z [B, T, P], logdet [B])`."""
        x = self.order(x)
        a, b = self.affine(x, self.embed_cond(cond, x.shape[0]))
        z = (x - b) * jnp.exp(-a)
        return self.order(z), -jnp.sum(a, axis=(1, 2))

    def _doubled(
        self, x: jax.Array, cond: jax.Array | None, weight: jax.Array | None, null_cond: int
    ) -> tuple[jax.Array, jax.Array]:
        """`(x, c)` for one pass, or for the conditional and null passes stacked (`[2B, ...]`)
        when guided (`weight` not None)."""
        if weight is None:
            return x, self.embed_cond(cond, x.shape[0])
        if cond is None:
            raise ValueError("guidance (cfg_scale != 1) needs a cond")
        labels = jnp.issubdtype(cond.dtype, jnp.integer)
        null = jnp.full_like(cond, null_cond) if labels else jnp.zeros_like(cond)
        both = jnp.concatenate([cond, null])
        return jnp.concatenate([x, x]), self.embed_cond(both, 2 * x.shape[0])

    def _empty_caches(self, batch: int, length: int) -> list[tuple[jax.Array, jax.Array]]:
        """Zero keys and values `[batch, length, N, H]` for every layer."""
        return empty_caches(self.layers, batch, length, self.pos.shape[-1], self.dtype)

    def _decode(
        self, inp: jax.Array, start: jax.Array, pos: jax.Array, c: jax.Array, caches: list
    ) -> tuple[jax.Array, jax.Array, list]:
        """Inputs `inp [B, S, P]` at positions `start ..` (their embeddings from `pos [L, D]`)
        through the transformer with the KV `caches` -> `(a, b, caches)`: the affine
        parameters `[B, S, P]` of the tokens one position later."""
        pos = jax.lax.dynamic_slice_in_dim(pos, start, inp.shape[1])[None].astype(self.dtype)
        h = self.proj_in(inp.astype(self.dtype)) + pos + c
        h, new_caches = decode_layers(self.layers, h, start, caches)
        a, b = _log_scale_and_shift(self.proj_out(h))
        return a, b, new_caches

    def inverse_sequential(
        self, z: jax.Array, cond: jax.Array | None, weights: jax.Array | None, null_cond: int
    ) -> jax.Array:
        """Token by token with a KV cache: `z [B, T, P]` -> `x`; `weights [T]` or None."""
        z = self.order(z)
        tokens = z.shape[1]
        z0, c = self._doubled(z[:, 0], cond, weights, null_cond)
        caches = self._empty_caches(z0.shape[0], tokens)

        def step(carry, inputs):
            x_i, caches = carry  # x_i: the finished token i (twice under guidance)
            i, z_next = inputs
            a, b, new_caches = self._decode(x_i[:, None], i, self.pos[...], c, caches)
            a, b = a[:, 0], b[:, 0]
            w = None if weights is None else weights[i + 1]
            x_next = z_next * jnp.exp(_guided(a, w)) + _guided(b, w)
            x_in = x_next if weights is None else jnp.concatenate([x_next, x_next])
            return (x_in, new_caches), x_next

        xs = (jnp.arange(tokens - 1), jnp.swapaxes(z[:, 1:], 0, 1))
        _, rest = jax.lax.scan(step, (z0, caches), xs)
        x = jnp.concatenate([z[:, :1], jnp.swapaxes(rest, 0, 1)], axis=1)
        return self.order(x)

    def inverse_jacobi(
        self,
        z: jax.Array,
        cond: jax.Array | None,
        weights: jax.Array | None,
        null_cond: int,
        *,
        tol: float,
        max_iters: int,
        segment: int | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Jacobi iteration `x <- z · exp(a(x)) + b(x)` from `x = z`, all unknown tokens of a
        segment at once, until `max |Δx| <= tol` or `max_iters` passes, the segments one
        after another (Gauss–Seidel over segments, GS-Jacobi). `segment` tokens per segment
        (None: one segment, plain Jacobi over the whole sequence; 1: one token a pass, the
        sequential inverse). Tokens `1 .. T-1` are unknown (token 0 is `z_0`); a segment of
        `S` of them is exact after `S` passes, so the passes per segment are capped at
        `min(max_iters, S)`. Finished segments' keys and values are cached, so a pass runs
        only its segment's `S` positions through the transformer. Returns `(x, passes)`,
        `passes` summed over the segments (the sequential passes of this block)."""
        z = self.order(z)
        tokens = z.shape[1]
        unknown = tokens - 1
        if unknown == 0:  # one token: x_0 = z_0
            return self.order(z), jnp.asarray(0, jnp.int32)
        size = unknown if segment is None else min(segment, unknown)
        segments = -(-unknown // size)
        length = segments * size  # network input positions 0 .. T-2, padded at the end
        cap = min(max_iters, size)
        x0, c = self._doubled(z[:, 0], cond, weights, null_cond)
        doubled = weights is not None
        pos = jnp.pad(self.pos[...][:unknown], ((0, length - unknown), (0, 0)))
        # segment j: the inputs at positions j·S .. j·S + S - 1 give the affine parameters of
        # tokens j·S + 1 .. j·S + S (padding past T - 1 is never read by a real token)
        z_segs = jnp.pad(z[:, 1:], ((0, 0), (0, length - unknown), (0, 0)))
        z_segs = einops.rearrange(z_segs, "b (n s) p -> n b s p", s=size)
        if doubled:
            w = jnp.pad(weights[1:], (0, length - unknown), constant_values=1.0)
            w_segs = w.reshape(segments, 1, size, 1)
        else:
            w_segs = jnp.zeros((segments,))
        caches = self._empty_caches(x0.shape[0], length)

        def run_segment(carry, inputs):
            first, caches = carry  # first: the finished token j·S (twice under guidance)
            j, z_seg, w_seg = inputs
            start = j * size
            w = w_seg if doubled else None
            real = (start + 1 + jnp.arange(size) <= unknown)[None, :, None]  # not padding

            def update(x, caches):
                x_in = x if not doubled else jnp.concatenate([x, x])
                inp = jnp.concatenate([first[:, None], x_in[:, :-1]], axis=1)
                a, b, new_caches = self._decode(inp, start, pos, c, caches)
                new = z_seg * jnp.exp(_guided(a, w)) + _guided(b, w)
                # Tokens past the converged prefix may overflow; a NaN there would reach the
                # prefix through attention (0 · NaN), so they are kept finite.
                return jnp.clip(jnp.nan_to_num(new), -JACOBI_BOUND, JACOBI_BOUND), new_caches

            def keep_going(state):
                _, _, delta, k = state
                return (k < cap) & (delta > tol)

            def body(state):
                x, caches, _, k = state
                new, caches = update(x, caches)
                return new, caches, jnp.max(jnp.abs(jnp.where(real, new - x, 0.0))), k + 1

            init = (z_seg, caches, jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0, jnp.int32))
            x, caches, _, k = jax.lax.while_loop(keep_going, body, init)
            last = x[:, -1] if not doubled else jnp.concatenate([x[:, -1], x[:, -1]])
            return (last, caches), (x, k)

        xs = (jnp.arange(segments), z_segs, w_segs)
        _, (x_segs, passes) = jax.lax.scan(run_segment, (x0, caches), xs)
        rest = einops.rearrange(x_segs, "n b s p -> b (n s) p")[:, :unknown]
        x = jnp.concatenate([z[:, :1], rest], axis=1)
        return self.order(x), jnp.sum(passes)


class TarFlow(nnx.Module):
    """`forward(x [B, H, W, C], *, cond=None) -> (z, logdet [B])`, `inverse(z, ...) -> x`.

    `image_size` (square) fixes the number of tokens `(image_size / patch)²` (learned
    position embeddings). The paper's ImageNet-64 model: `patch=2, width=768, num_blocks=8,
    layers_per_block=8` (head size 64). `cond`: int labels `[B]` (`num_classes` is the null
    label, as `None` is) or embeddings `[B, cond_dim]`.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch: int = 2,
        width: int = 768,
        num_blocks: int = 8,
        layers_per_block: int = 8,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        num_classes: int = 0,
        cond_dim: int = 0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not divisible by the patch {patch}")
        if width % head_dim:
            raise ValueError(f"width={width} is not divisible by head_dim={head_dim}")
        self.in_channels, self.image_size, self.patch = in_channels, image_size, patch
        self.num_classes = num_classes
        tokens, token_dim = (image_size // patch) ** 2, patch * patch * in_channels
        kw = dict(num_classes=num_classes, cond_dim=cond_dim, dtype=dtype, param_dtype=param_dtype)
        sizes = (tokens, token_dim, width, layers_per_block, width // head_dim, mlp_ratio)
        self.blocks = nnx.List(
            [FlowBlock(*sizes, reverse=k % 2 == 1, **kw, rngs=rngs) for k in range(num_blocks)]
        )

    def patchify(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> tokens `[B, T, P]` float32 (row-major patches)."""
        s, c, p = self.image_size, self.in_channels, self.patch
        if x.ndim != 4 or x.shape[1:] != (s, s, c):
            raise ValueError(f"TarFlow expects x of shape [B, {s}, {s}, {c}], got {list(x.shape)}")
        return einops.rearrange(
            x.astype(jnp.float32), "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p
        )

    def unpatchify(self, tokens: jax.Array) -> jax.Array:
        p = self.patch
        h = self.image_size // p
        return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=h, p=p, q=p)

    def forward(
        self, x: jax.Array, *, cond: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        tokens = self.patchify(x)
        logdet = jnp.zeros((x.shape[0],), jnp.float32)
        for block in self.blocks:
            tokens, block_logdet = block.forward(tokens, cond)
            logdet = logdet + block_logdet
        return self.unpatchify(tokens), logdet

    def inverse(
        self,
        z: jax.Array,
        *,
        cond: jax.Array | None = None,
        method: str = "sequential",
        cfg_scale: float = 1.0,
        null_cond: int | None = None,
        anneal: bool = False,
        tol: float = 1e-5,
        max_iters: int | None = None,
        segment: int | Sequence[int] | None = None,
        return_iters: bool = False,
    ):
        """`z [B, H, W, C]` -> `x`. `method` "sequential" (KV-cache scan) or "jacobi" (stops
        at `max |Δx| <= tol` or after `max_iters` passes per segment, default and at most
        the segment's size: exact; `tol = 0` runs every pass). `segment`: tokens per
        Jacobi segment, the segments solved one after another (GS-Jacobi); None or 0 is one
        segment (plain Jacobi); a sequence gives one size per block in the order the blocks
        are inverted (`passes` below), e.g. segments only for the slow blocks. With
        `return_iters`, also the passes per block `[num_blocks]` (in inverse order, summed
        over segments; `T - 1` decode steps each for "sequential"). A bad `method`, `tol`,
        `max_iters` or `segment` is a UserError."""
        check_inverse_args(method, tol, max_iters, segment)
        sizes = segment_sizes(segment, len(self.blocks))
        tokens = self.patchify(z)
        num_tokens = tokens.shape[1]
        weights = None
        if cfg_scale != 1.0:
            j = jnp.arange(num_tokens, dtype=jnp.float32) / max(num_tokens - 1, 1)
            weights = 1.0 + (cfg_scale - 1.0) * (j if anneal else jnp.ones_like(j))
        null = self.num_classes if null_cond is None else null_cond
        iters = []
        for block, size in zip(reversed(self.blocks), sizes):
            if method == "sequential":
                tokens = block.inverse_sequential(tokens, cond, weights, null)
                iters.append(jnp.asarray(num_tokens - 1, jnp.int32))
            else:
                limit = num_tokens if max_iters is None else max_iters
                tokens, n = block.inverse_jacobi(
                    tokens, cond, weights, null, tol=tol, max_iters=limit, segment=size
                )
                iters.append(n)
        x = self.unpatchify(tokens)
        return (x, jnp.stack(iters)) if return_iters else x
