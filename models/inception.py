"""The FID Inception-v3 (TF "2015-12-05" graph, as pytorch-fid ports it) in flax.nnx.

`InceptionV3()(x)` maps `x [B, H, W, 3]` (NHWC, values in [-1, 1], 299x299 for FID) to the
2048-d pool features `[B, 2048]`; `net.logits(features)` gives the 1008-way logits when the
weights have them (pytorch-fid's .pth does; the shared npz does not).

Every conv is conv (no bias) -> BatchNorm (inference statistics `mean`/`var`, offset `beta`,
no scale, eps 1e-3) -> ReLU; the BatchNorm numbers are plain `nnx.Param`s. The FID-specific
details (pytorch-fid's "Patch" notes): branch average pools are 3x3/1 pad 1 and ignore the
padding (count_include_pad=False), and Mixed_7c (`mixed_10`) max-pools its pool branch.
Attribute names follow the npz (`net.layers.<path>.<weight|beta|mean|var>`), so loading is a
rename: `load_inception(path)`; see `models.inception_pth` for pytorch-fid's checkpoint.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import UserError
from core.files import content_tag
from core.precision import round_tf32
from models import inception_pth

BN_EPS = 1e-3
FEATURE_DIM = 2048
NUM_LOGITS = 1008
ENV_VAR = "DRIFTLAB_INCEPTION_WEIGHTS"
CACHE_NAME = "fid_inception_v3_2015-12-05.npz"
# "tf32": operands rounded to TF32, then full float32 (core.precision), on any backend: what
# the GPU's default precision computes, to measure its effect on FID on a CPU.
# "tf32x3": float32 accuracy from three products at the backend's default precision (TF32
# tensor cores on NVIDIA GPUs): each operand split into its TF32 rounding and the remainder,
# `a b ~ a_hi b_hi + (a_hi b_lo + a_lo b_hi)`. With TF32 products each term's rounding and the
# dropped `a_lo b_lo` are about 2^-22 of `|a| |b|`, float32's own level (tests/test_precision.py
# emulates the GPU's rounding); on a CPU the three products are full float32, 3x the work.
PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "default": jax.lax.Precision.DEFAULT,
    "tf32": jax.lax.Precision.HIGHEST,
    "tf32x3": jax.lax.Precision.DEFAULT,
}


def _product(op, precision: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`op(x, kernel, precision)` (a conv or matmul) at `precision` (see PRECISIONS)."""
    lax_precision = PRECISIONS[precision]
    if precision == "tf32":
        return op(round_tf32(x), round_tf32(kernel), lax_precision)
    if precision == "tf32x3":
        x_hi, k_hi = round_tf32(x), round_tf32(kernel)
        x_lo, k_lo = x - x_hi, kernel - k_hi
        small = op(x_hi, k_lo, lax_precision) + op(x_lo, k_hi, lax_precision)
        return op(x_hi, k_hi, lax_precision) + small
    return op(x, kernel, lax_precision)


def _channels(v: jax.Array) -> jax.Array:
    return v.reshape(1, 1, 1, -1)


class ConvBN(nnx.Module):
    """`[B, H, W, cin] -> [B, H', W', cout]`: conv (no bias), BatchNorm (no scale), ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int] = 1,
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        precision: str = "highest",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin, cout), dtype))
        self.beta = nnx.Param(jnp.zeros((cout,), dtype))
        self.mean = nnx.Param(jnp.zeros((cout,), dtype))
        self.var = nnx.Param(jnp.ones((cout,), dtype))
        self.stride, self.padding, self.precision = stride, ((ph, ph), (pw, pw)), precision

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]

        def conv(x, kernel, precision):
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                (self.stride, self.stride),
                self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=precision,
            )

        y = _product(conv, self.precision, x.astype(kernel.dtype), kernel)
        scale = jax.lax.rsqrt(self.var[...] + BN_EPS)
        return jax.nn.relu(
            (y - _channels(self.mean[...])) * _channels(scale) + _channels(self.beta[...])
        )


class Tower(nnx.Module):
    """A chain of ConvBN layers named `conv, conv_1, conv_2, ...` (as in the npz)."""

    def __init__(self, specs: list[tuple], **kw):
        self.names = tuple("conv" if i == 0 else f"conv_{i}" for i in range(len(specs)))
        for name, (cin, cout, kernel, opts) in zip(self.names, specs):
            setattr(self, name, ConvBN(cin, cout, kernel, **opts, **kw))

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def max_pool(x: jax.Array, k: int = 3, stride: int = 2, pad: int = 0) -> jax.Array:
    """Max pool `[B, H, W, C]`; padding counts as -inf (as torch's max_pool2d)."""
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    init = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1), pads)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3/1 pad 1 average pool that averages only real pixels (count_include_pad=False)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    zero = jnp.array(0, x.dtype)
    total = jax.lax.reduce_window(x, zero, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, zero, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


class InceptionA(nnx.Module):
    """Mixed_5b-5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int, **kw):
        self.conv = ConvBN(cin, 64, 1, **kw)
        self.tower = Tower([(cin, 48, 1, {}), (48, 64, 5, {"padding": 2})], **kw)
        self.tower_1 = Tower(
            [(cin, 64, 1, {}), (64, 96, 3, {"padding": 1}), (96, 96, 3, {"padding": 1})], **kw
        )
        self.tower_2 = Tower([(cin, pool_features, 1, {})], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(
            [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(avg_pool_3x3(x))], axis=-1
        )


class InceptionB(nnx.Module):
    """Mixed_6a (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int, **kw):
        self.conv = ConvBN(cin, 384, 3, stride=2, **kw)
        self.tower = Tower(
            [(cin, 64, 1, {}), (64, 96, 3, {"padding": 1}), (96, 96, 3, {"stride": 2})], **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x)], axis=-1)


def _seven(cin: int, c7: int, cout: int, order: str) -> list[tuple]:
    """1x1 then factorized 7x7 convs in `order` ("wh": 1x7 then 7x1)."""
    kernels = {"w": ((1, 7), (0, 3)), "h": ((7, 1), (3, 0))}
    specs = [(cin, c7, 1, {})]
    for i, axis in enumerate(order):
        kernel, pad = kernels[axis]
        specs.append((c7, cout if i == len(order) - 1 else c7, kernel, {"padding": pad}))
    return specs


class InceptionC(nnx.Module):
    """Mixed_6b-6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin: int, c7: int, **kw):
        self.conv = ConvBN(cin, 192, 1, **kw)
        self.tower = Tower(_seven(cin, c7, 192, "wh"), **kw)
        self.tower_1 = Tower(_seven(cin, c7, 192, "hwhw"), **kw)
        self.tower_2 = Tower([(cin, 192, 1, {})], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(
            [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(avg_pool_3x3(x))], axis=-1
        )


class InceptionD(nnx.Module):
    """Mixed_7a (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cin: int, **kw):
        self.tower = Tower([(cin, 192, 1, {}), (192, 320, 3, {"stride": 2})], **kw)
        self.tower_1 = Tower(_seven(cin, 192, 192, "wh") + [(192, 192, 3, {"stride": 2})], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1, with an average
    pool (7b) or, in the FID graph's 7c, a max pool."""

    def __init__(self, cin: int, pool: str, **kw):
        self.pool = pool
        self.conv = ConvBN(cin, 320, 1, **kw)
        self.tower_conv = ConvBN(cin, 384, 1, **kw)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1), **kw)
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0), **kw)
        self.tower_1_conv = ConvBN(cin, 448, 1, **kw)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1, **kw)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1), **kw)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0), **kw)
        self.tower_2_conv = ConvBN(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        t = self.tower_conv(x)
        t1 = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = max_pool(x, 3, 1, 1) if self.pool == "max" else avg_pool_3x3(x)
        return jnp.concatenate(
            [
                self.conv(x),
                self.tower_mixed_conv(t),
                self.tower_mixed_conv_1(t),
                self.tower_1_mixed_conv(t1),
                self.tower_1_mixed_conv_1(t1),
                self.tower_2_conv(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nnx.Module):
    """`[B, H, W, 3]` in [-1, 1] (299x299 for FID) -> pool features `[B, 2048]`."""

    def __init__(
        self,
        *,
        with_logits: bool = False,
        precision: str = "highest",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; known: {sorted(PRECISIONS)}")
        kw = {"precision": precision, "dtype": dtype, "rngs": rngs}
        self.precision = precision
        self.conv = ConvBN(3, 32, 3, stride=2, **kw)
        self.conv_1 = ConvBN(32, 32, 3, **kw)
        self.conv_2 = ConvBN(32, 64, 3, padding=1, **kw)
        self.conv_3 = ConvBN(64, 80, 1, **kw)
        self.conv_4 = ConvBN(80, 192, 3, **kw)
        self.mixed = InceptionA(192, 32, **kw)
        self.mixed_1 = InceptionA(256, 64, **kw)
        self.mixed_2 = InceptionA(288, 64, **kw)
        self.mixed_3 = InceptionB(288, **kw)
        for i, c7 in enumerate((128, 160, 160, 192)):
            setattr(self, f"mixed_{4 + i}", InceptionC(768, c7, **kw))
        self.mixed_8 = InceptionD(768, **kw)
        self.mixed_9 = InceptionE(1280, "avg", **kw)
        self.mixed_10 = InceptionE(2048, "max", **kw)
        self.fc = (
            nnx.Linear(
                FEATURE_DIM,
                NUM_LOGITS,
                dtype=dtype,
                param_dtype=dtype,
                precision=PRECISIONS[precision],
                rngs=rngs,
            )
            if with_logits
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UserError(f"InceptionV3 expects [B, H, W, 3] images, got shape {x.shape}")
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = self.conv_4(self.conv_3(max_pool(x)))
        x = max_pool(x)
        for i in ["", *(f"_{k}" for k in range(1, 11))]:
            x = getattr(self, f"mixed{i}")(x)
        return jnp.mean(x, axis=(1, 2))

    def logits(self, features: jax.Array, *, bias: bool = True) -> jax.Array:
        """`[B, 2048] -> [B, 1008]`; `bias=False` is the original Inception Score's logits."""
        if self.fc is None:
            raise UserError(
                "these Inception weights have no 1008-way logits layer (the shared "
                "npz has none); load pytorch-fid's weights for Inception Score"
            )
        out = _product(
            lambda a, b, p: jnp.matmul(a, b, precision=p),
            self.precision,
            features,
            self.fc.kernel[...],
        )
        return out + self.fc.bias[...][None, :] if bias else out


# --- weights ---------------------------------------------------------------------------


def _npz_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """npz name of a parameter path and whether it is a kernel (stored OIHW / [out, in])."""
    *modules, leaf = path
    if modules == ["fc"]:
        return f"net.fc.{'weight' if leaf == 'kernel' else 'bias'}", leaf == "kernel"
    name = "weight" if leaf == "kernel" else leaf
    return "net.layers." + ".".join(modules) + "." + name, leaf == "kernel"


def inception_from_arrays(
    arrays, *, dtype=jnp.float32, precision: str = "highest", source: str = "weights"
) -> InceptionV3:
    """Build the network from npz-layout arrays (any float dtype, cast to `dtype`); it has
    logits iff `net.fc.weight` is present. Missing, extra or misshapen arrays are errors."""
    with_logits = "net.fc.weight" in arrays
    abstract = nnx.eval_shape(
        lambda: InceptionV3(
            with_logits=with_logits, precision=precision, dtype=dtype, rngs=nnx.Rngs(0)
        )
    )
    graphdef, state = nnx.split(abstract)
    used = set()

    def fill(key_path, leaf):
        path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        name, is_kernel = _npz_key(path)
        if name not in arrays:
            raise UserError(f"{source} has no array {name}; not FID Inception weights")
        value = np.asarray(arrays[name], np.float32)
        if is_kernel:
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        if value.shape != leaf.shape:
            raise UserError(f"{source}: {name} has shape {value.shape}, expected {leaf.shape}")
        used.add(name)
        return jnp.asarray(value, dtype)

    state = jax.tree_util.tree_map_with_path(fill, state)
    extra = sorted(set(arrays) - used)
    if extra:
        raise UserError(f"{source} has unexpected arrays: {', '.join(extra[:5])}")
    return nnx.merge(graphdef, state)


def cache_path() -> str:
    """Where a converted download is kept: `$XDG_CACHE_HOME` or `~/.cache`, `/driftlab/`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "driftlab", CACHE_NAME)


def fetch_pytorch_fid_weights(
    dest: str, *, url: str | None = None, sha256: str | None = None
) -> None:
    """Download pytorch-fid's .pth (`inception_pth.PTH_URL`), check its sha256, convert it
    (restricted reader, no torch) and save the npz layout, with the logits layer, to `dest`."""
    url, sha256 = url or inception_pth.PTH_URL, sha256 or inception_pth.PTH_SHA256
    pth = os.path.join(os.path.dirname(dest), os.path.basename(url))
    inception_pth.download_verified(url, pth, sha256=sha256)
    try:
        arrays = inception_pth.convert_pytorch_fid(inception_pth.read_torch_checkpoint(pth))
        inception_from_arrays(arrays, source=url)  # refuse to cache what does not load
        tmp = dest + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, dest)
    finally:
        os.remove(pth)


# The weights that travel with this project's data (../shared/data beside the checkout).
SHARED_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.pardir, "shared", "data", "inception", "fid_inception_v3_2015-12-05_fp32.npz",
)  # fmt: skip


def resolve_weights(path: str | None = None) -> str:
    """The weights file: `path`, else `$DRIFTLAB_INCEPTION_WEIGHTS`, else the cache, else
    `../shared/data/inception` beside the checkout, else a verified download into the
    cache. Missing files are a one-line UserError."""
    path = path or os.environ.get(ENV_VAR)
    if path:
        if not os.path.isfile(path):
            raise UserError(
                f"Inception weights not found at {path} (pass a path or set "
                f"{ENV_VAR} to the FID Inception .npz or pytorch-fid .pth)"
            )
        return path
    cached = cache_path()
    if not os.path.isfile(cached) and os.path.isfile(SHARED_WEIGHTS):
        return os.path.normpath(SHARED_WEIGHTS)
    if not os.path.isfile(cached):
        try:
            fetch_pytorch_fid_weights(cached)
        except UserError as e:
            raise UserError(
                f"Inception weights not found at {cached} and not downloadable "
                f"({e}); set {ENV_VAR} to the FID Inception .npz"
            ) from None
    return cached


def weights_tag(path: str | None = None) -> str:
    """8 hex digits naming the weights file `resolve_weights(path)` by its contents
    (`core.files.content_tag`): caches of Inception features carry it, so other weights (an
    fp16 copy, say) never read features another file made, while the same weights found
    anew (a data folder re-provisioned, a copy elsewhere) still read theirs."""
    return content_tag(resolve_weights(path), digits=8)


def has_logits(path: str | None = None) -> bool:
    """Whether the weights file has the 1008-way logits layer (Inception Score needs it),
    read without building the network (a .pth download always has it)."""
    path = resolve_weights(path)
    if path.endswith((".pth", ".pt")):
        return True
    try:
        with np.load(path) as f:
            return "net.fc.weight" in f.files
    except (OSError, ValueError) as e:
        raise UserError(f"could not read Inception weights {path}: {e}") from None


def load_inception(
    path: str | None = None, dtype=jnp.float32, *, precision: str = "highest"
) -> InceptionV3:
    """The FID Inception with weights from an npz (fp32 or fp16, cast to `dtype`) or a
    pytorch-fid .pth; where it looks is `resolve_weights`."""
    path = resolve_weights(path)
    if path.endswith((".pth", ".pt")):
        arrays = inception_pth.convert_pytorch_fid(inception_pth.read_torch_checkpoint(path))
    else:
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise UserError(f"could not read Inception weights {path}: {e}") from None
    return inception_from_arrays(arrays, dtype=dtype, precision=precision, source=path)
