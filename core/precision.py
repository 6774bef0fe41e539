"""TF32 arithmetic on any backend: what an NVIDIA GPU's default float32 matmuls compute.

On Ampere and later GPUs, JAX's default precision for a float32 matmul or convolution is
TF32: each operand is rounded to 10 mantissa bits (8 exponent bits, as float32), the products
are summed in float32. A CPU computes them in full float32, so a difference seen only on the
GPU (an inverse that disagrees with another, an FID that moves) can be reproduced on a CPU by
rounding the operands the same way: `round_tf32(x)` is that rounding
(`lax.reduce_precision`, round to nearest even), and `tf32_matmuls()` applies it to both
operands of every float32 `dot_general` and `conv_general_dilated` traced inside it. What is
left of the GPU's numbers is the order of the float32 sums.

`tf32_matmuls()` wraps the two primitives' `bind` for the duration of the context and clears
JAX's trace and compile caches on entry and exit (jitted helpers such as `jnp.matmul` keep
their traces otherwise), so functions must be traced inside it. Operands of other dtypes
(bfloat16 compute) are left alone. It is a measuring tool: the rounding is done by extra ops,
not by tensor cores, so it is slower than float32.
"""

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.extend.core import primitives

TF32_MANTISSA_BITS = 10
_PRIMITIVES = (primitives.dot_general_p, primitives.conv_general_dilated_p)
_active: list[bool] = []


def round_tf32(x: jax.Array) -> jax.Array:
    """`x` rounded to TF32 (10 mantissa bits, 8 exponent bits), kept as float32; other dtypes
    unchanged."""
    if jnp.result_type(x) != jnp.float32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=TF32_MANTISSA_BITS)


def emulating_tf32() -> bool:
    """Whether a `tf32_matmuls()` context is open."""
    return bool(_active)


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """Round both operands of every float32 matmul and convolution traced inside to TF32
    (module docstring). Nested contexts are one."""
    if _active:
        _active.append(True)
        try:
            yield
        finally:
            _active.pop()
        return
    originals = {p: p.bind for p in _PRIMITIVES}
    own = {p: vars(p).get("bind") for p in _PRIMITIVES}  # a bind set on the instance before

    def wrap(bind):
        def rounded_bind(lhs, rhs, **params):
            return bind(round_tf32(lhs), round_tf32(rhs), **params)

        return rounded_bind

    for p in _PRIMITIVES:
        p.bind = wrap(originals[p])
    _active.append(True)
    jax.clear_caches()
    try:
        yield
    finally:
        _active.pop()
        for p in _PRIMITIVES:
            if own[p] is None:
                del p.bind  # back to the class's method
            else:
                p.bind = own[p]
        jax.clear_caches()
