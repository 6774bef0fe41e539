"""Pieces shared by the velocity networks: scalar and condition embeddings, attention, norms.

Shapes: `B` batch, `T` tokens, `D` width, `N` heads, `H` head size. Every module computes in
its `dtype` (e.g. bfloat16) and keeps its parameters in `param_dtype` (float32 by default).
"""

import contextlib
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type

TIME_SCALE = 1000.0  # t in [0, 1] is scaled like DiT/ADM's integer timesteps
_ATTN_IMPL: list[str | None] = [None]  # the override set by `attention_implementation`
XAVIER = nnx.initializers.xavier_uniform()


def sinusoidal_embedding(s: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """`[B]` scalars in [0, 1] -> `[B, dim]` float32 (cos | sin) of `TIME_SCALE * s`."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (TIME_SCALE * s.astype(jnp.float32))[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without affine parameters; statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def expand_like(a: jax.Array, x: jax.Array) -> jax.Array:
    """`[B, C]` -> `[B, 1, ..., 1, C]` with the rank of `x` (for explicit broadcasting)."""
    return a.reshape(a.shape[:1] + (1,) * (x.ndim - 2) + a.shape[1:])


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift`; `x` is `[B, ..., C]`, `shift`/`scale` are `[B, C]`."""
    return x * (1 + expand_like(scale, x)) + expand_like(shift, x)


def check_batch(x: jax.Array, t: jax.Array, name: str = "t") -> None:
    """Raise a ValueError unless `t` is `[B]` with the batch size of `x`."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape [B] = [{x.shape[0]}], got {t.shape}")


class ScalarEmbed(nnx.Module):
    """`[B]` scalar (t or dt) -> `[B, dim]`: sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(
        self,
        dim: int,
        *,
        freq_dim: int = 256,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.freq_dim = freq_dim
        init = nnx.initializers.normal(0.02)
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        self.fc1 = nnx.Linear(freq_dim, dim, **kw)
        self.fc2 = nnx.Linear(dim, dim, **kw)

    def __call__(self, s: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(s, self.freq_dim))))


class CondEmbed(nnx.Module):
    """Condition -> `[B, dim]`: int labels through a `num_classes + 1` table (last row = null
    label), or float embeddings `[B, cond_dim]` through a Linear. `None` is the null label
    (labels) or the zero vector (embeddings)."""

    def __init__(
        self,
        dim: int,
        *,
        num_classes: int = 0,
        cond_dim: int = 0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_classes > 0 and cond_dim > 0:
            raise ValueError("give num_classes (labels) or cond_dim (embeddings), not both")
        if num_classes < 0 or cond_dim < 0:
            raise ValueError(
                f"num_classes and cond_dim must be >= 0, got {num_classes} and {cond_dim}"
            )
        self.num_classes, self.cond_dim = num_classes, cond_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if num_classes:
            init = nnx.initializers.normal(0.02)
            self.table = nnx.Embed(num_classes + 1, dim, embedding_init=init, **kw)
        else:
            self.proj = nnx.Linear(cond_dim, dim, **kw)

    def __call__(self, cond: jax.Array | None, batch: int) -> jax.Array:
        if self.num_classes:
            if cond is None:
                cond = jnp.full((batch,), self.num_classes, jnp.int32)
            if not jnp.issubdtype(cond.dtype, jnp.integer) or cond.shape != (batch,):
                raise ValueError(
                    f"cond must be int labels of shape [{batch}], got "
                    f"{cond.dtype}{list(cond.shape)}"
                )
            return self.table(cond)
        if cond is None:
            cond = jnp.zeros((batch, self.cond_dim), jnp.float32)
        if cond.shape != (batch, self.cond_dim):
            raise ValueError(
                f"cond must be an embedding of shape [{batch}, {self.cond_dim}], "
                f"got {list(cond.shape)}"
            )
        return self.proj(cond)


class Embedding(nnx.Module):
    """The summed conditioning vector `emb(t) [+ emb(dt)] [+ emb(cond)]` -> `[B, dim]`."""

    def __init__(
        self,
        dim: int,
        *,
        num_classes: int = 0,
        cond_dim: int = 0,
        use_dt: bool = False,
        freq_dim: int = 256,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.t_embed = ScalarEmbed(dim, freq_dim=freq_dim, **kw)
        self.dt_embed = ScalarEmbed(dim, freq_dim=freq_dim, **kw) if use_dt else None
        has_cond = num_classes > 0 or cond_dim > 0
        self.cond_embed = (
            CondEmbed(dim, num_classes=num_classes, cond_dim=cond_dim, **kw) if has_cond else None
        )

    def __call__(
        self, x: jax.Array, t: jax.Array, cond: jax.Array | None, dt: jax.Array | None
    ) -> jax.Array:
        batch = x.shape[0]
        check_batch(x, t)
        emb = self.t_embed(t)
        if self.dt_embed is not None:
            if dt is None:
                dt = jnp.zeros((batch,), jnp.float32)
            check_batch(x, dt, "dt")
            emb = emb + self.dt_embed(dt)
        elif dt is not None:
            raise ValueError(
                "this network was built with use_dt=False; build it with "
                "use_dt=True to pass a shortcut step size dt"
            )
        if self.cond_embed is not None:
            emb = emb + self.cond_embed(cond, batch)
        elif cond is not None:
            raise ValueError(
                "this network is unconditional (num_classes=0, cond_dim=0) but got a cond"
            )
        return emb


@contextlib.contextmanager
def attention_implementation(impl: str | None) -> Iterator[None]:
    """Force `jax.nn.dot_product_attention`'s implementation ("xla", "cudnn") while tracing."""
    _ATTN_IMPL.append(impl)
    try:
        yield
    finally:
        _ATTN_IMPL.pop()


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """Softmax attention on `[B, T, N, H]` (`is_causal`: token i sees tokens <= i). cuDNN
    flash attention on GPU in bf16/f16 (jax's `implementation=None` still means XLA), XLA
    otherwise or where cuDNN refuses."""
    impl = _ATTN_IMPL[-1]
    use_cudnn = (
        impl is None
        and jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )
    if use_cudnn:
        try:
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=is_causal, implementation="cudnn"
            )
        except (RuntimeError, NotImplementedError, ValueError):
            pass  # an old cuDNN or GPU: the XLA path below computes the same thing
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)


class Attention(nnx.Module):
    """Multi-head self-attention on `[B, T, D]` with one fused qkv Linear."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        zero_init_out: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        kernel_init=XAVIER,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=kernel_init, **kw)
        out_init = nnx.initializers.zeros_init() if zero_init_out else kernel_init
        self.out = nnx.Linear(dim, dim, kernel_init=out_init, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        h = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.out(h.reshape(b, n, d))


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding `[h * w, dim]` (first half rows, second cols)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def one_axis(pos: np.ndarray) -> np.ndarray:  # [P] -> [P, dim / 2]
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    emb = np.concatenate([one_axis(rows.ravel()), one_axis(cols.ravel())], axis=1)
    return emb.astype(np.float32)
