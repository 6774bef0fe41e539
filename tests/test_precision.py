"""TF32 rounding on any backend (core.precision) and the FID Inception's "tf32" precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.precision import emulating_tf32, round_tf32, tf32_matmuls

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


def test_convolutions_inside_the_context_use_rounded_operands():
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 3))
    k = jax.random.normal(jax.random.key(3), (3, 3, 3, 4))

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )  # fmt: skip

    with tf32_matmuls():
        rounded = jax.jit(conv)(x, k)
    assert np.array_equal(rounded, conv(round_tf32(x), round_tf32(k)))
    assert np.abs(rounded - conv(x, k)).max() > 1e-5


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
