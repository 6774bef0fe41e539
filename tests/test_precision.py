"""TF32 rounding on any backend (core.precision) and the FID Inception's "tf32" precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.precision import emulating_tf32, gpu_uses_tf32, round_tf32, tf32_matmuls

X = jax.random.normal(jax.random.key(0), (16, 64))
W = jax.random.normal(jax.random.key(1), (64, 32))


def _highest_matmul(x, w):
    return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


def test_round_tf32_keeps_ten_mantissa_bits():
    r = np.asarray(round_tf32(X))
    mantissa = r.view(np.uint32) & 0x7FFFFF
    assert np.all(mantissa & 0x1FFF == 0)  # the low 13 of float32's 23 bits are zero
    assert 0 < np.abs(r - X).max() <= np.abs(X).max() * 2.0**-11  # half a TF32 step
    assert round_tf32(X.astype(jnp.bfloat16)).dtype == jnp.bfloat16  # other dtypes untouched
    assert np.array_equal(round_tf32(X.astype(jnp.bfloat16)), X.astype(jnp.bfloat16))


def test_matmuls_inside_the_context_use_rounded_operands_and_only_there():
    f = jax.jit(lambda x, w: jnp.tanh(x @ w))
    exact = f(X, W)
    with tf32_matmuls():
        assert emulating_tf32()
        with tf32_matmuls():  # nested: still one
            inside = jax.jit(lambda x, w: jnp.tanh(x @ w))(X, W)
        rounded = jax.jit(lambda x, w: jnp.tanh(x @ w))(X, W)
    assert not emulating_tf32()
    expected = jnp.tanh(_highest_matmul(round_tf32(X), round_tf32(W)))
    assert np.array_equal(inside, expected) and np.array_equal(rounded, expected)
    assert 1e-5 < np.abs(rounded - exact).max() < 1e-2
    assert np.array_equal(f(X, W), exact)  # the patch is gone, the caches too


def test_convolutions_inside_the_context_use_rounded_operands_unless_highest():
    # as on the GPU: a convolution at the default precision runs on TF32 tensor cores, one
    # at HIGHEST in float32
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 3))
    k = jax.random.normal(jax.random.key(3), (3, 3, 3, 4))

    def conv(x, k, precision=jax.lax.Precision.HIGHEST):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )  # fmt: skip

    with tf32_matmuls():
        rounded = jax.jit(lambda x, k: conv(x, k, None))(x, k)
        highest = jax.jit(conv)(x, k)
    assert np.array_equal(rounded, conv(round_tf32(x), round_tf32(k)))
    assert np.abs(rounded - conv(x, k)).max() > 1e-5
    assert np.array_equal(highest, conv(x, k))


def test_which_products_the_gpu_computes_in_tf32():
    P = jax.lax.Precision
    assert gpu_uses_tf32(None) and gpu_uses_tf32((P.DEFAULT, P.DEFAULT))
    # HIGH: what jax.default_matmul_precision("tensorfloat32") gives
    assert gpu_uses_tf32((P.HIGH, P.HIGH))
    assert not gpu_uses_tf32((P.HIGHEST, P.HIGHEST)) and not gpu_uses_tf32((P.HIGH, P.HIGHEST))
    assert gpu_uses_tf32(jax.lax.DotAlgorithmPreset.TF32_TF32_F32)
    assert not gpu_uses_tf32(jax.lax.DotAlgorithmPreset.F32_F32_F32)
    with jax.default_matmul_precision("highest"), tf32_matmuls():  # resolved when traced
        out = jax.jit(lambda x, w: x @ w)(X, W)
    assert np.array_equal(out, _highest_matmul(X, W))


@pytest.mark.parametrize("precision", ["highest", "tf32"])
def test_inception_conv_at_tf32_rounds_its_operands(precision):
    from models.inception import ConvBN

    conv = ConvBN(3, 4, 3, padding=1, precision=precision, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 9, 9, 3))
    operands = {"highest": (x, conv.kernel[...])}
    operands["tf32"] = tuple(round_tf32(a) for a in operands["highest"])
    expected = {}
    for name, (xs, kernel) in operands.items():
        y = jax.lax.conv_general_dilated(
            xs, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip
        expected[name] = jax.nn.relu(y / np.sqrt(1 + 1e-3))  # a fresh BatchNorm: 0, 1, 0
    out = conv(x)
    assert np.allclose(out, expected[precision], rtol=0, atol=1e-6)
    other = "highest" if precision == "tf32" else "tf32"
    assert np.abs(out - expected[other]).max() > 1e-5


def test_three_tf32_products_recover_float32_accuracy():
    # "tf32x3" on the GPU: three convolutions whose operands the tensor cores round to TF32.
    # tf32_matmuls() rounds them the same way here; the result stays at float32's accuracy
    # while one TF32 convolution ("tf32") is about 2^-11 off
    from models.inception import ConvBN

    x = jax.random.normal(jax.random.key(5), (2, 9, 9, 8))
    nets = {
        p: ConvBN(8, 16, 3, padding=1, precision=p, rngs=nnx.Rngs(1))
        for p in ("highest", "tf32", "tf32x3")
    }
    exact = np.asarray(nets["highest"](x), np.float64)
    with tf32_matmuls():
        out = {p: np.asarray(jax.jit(lambda x, net=nets[p]: net(x))(x)) for p in ("tf32", "tf32x3")}
    scale = np.abs(exact).max()
    tf32_error = np.abs(out["tf32"] - exact).max() / scale
    x3_error = np.abs(out["tf32x3"] - exact).max() / scale
    assert 1e-5 < tf32_error < 1e-2
    assert x3_error < 2e-6 and x3_error < tf32_error / 100
    # without the rounding (a CPU's default precision is float32), the three products sum to
    # the float32 result to rounding
    np.testing.assert_allclose(nets["tf32x3"](x), exact, rtol=0, atol=2e-6 * scale)


def test_fid_precision_emulates_tf32_on_the_network_only(shared_data, capsys):
    # scripts.fid_precision: the default-precision network with the GPU's rounding emulated
    # is the network's "tf32" precision (the resize before it untouched in both), the
    # HIGHEST one is left in float32, and a bad file is one line that names it
    import os

    from metrics import fid as fm
    from models.inception import load_inception
    from scripts import fid_precision

    weights = os.path.join(shared_data, "inception/fid_inception_v3_2015-12-05_fp32.npz")
    images = np.asarray(jax.random.randint(jax.random.key(6), (3, 28, 28, 1), 0, 256), np.uint8)
    default = load_inception(weights, precision="default")
    emulated = fid_precision.features(images, default, 2, emulate=True)
    want = fm.inception_features(images, load_inception(weights, precision="tf32"), batch_size=2)
    np.testing.assert_allclose(emulated, want, rtol=0, atol=1e-5)
    plain = fid_precision.features(images, default, 2, emulate=False)
    assert np.abs(plain - want).max() > 1e-4  # the rounding did something
    highest = load_inception(weights)  # the GPU computes HIGHEST in float32: nothing to round
    np.testing.assert_allclose(
        fid_precision.features(images, highest, 2, emulate=True), plain, rtol=0, atol=1e-5
    )
    with pytest.raises(SystemExit) as info:
        fid_precision.run(lambda argv: fid_precision.main(["x", "--a", "nope.npz", "--b", "b"]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not read images from nope.npz") and err.count("\n") == 1
