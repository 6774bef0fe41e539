"""TF32 arithmetic on any backend: what an NVIDIA GPU's default float32 matmuls compute.

On Ampere and later GPUs, JAX's default precision for a float32 matmul or convolution is
TF32: each operand is rounded to 10 mantissa bits (8 exponent bits, as float32), the products
are summed in float32. A CPU computes them in full float32, so a difference seen only on the
GPU (an inverse that disagrees with another, an FID that moves) can be reproduced on a CPU by
rounding the operands the same way: `round_tf32(x)` is that rounding
(`lax.reduce_precision`, round to nearest even), and `tf32_matmuls()` applies it to both
operands of every float32 `dot_general` and `conv_general_dilated` traced inside it that the
GPU would compute in TF32: those at no precision or at `Precision.DEFAULT` / `HIGH` (the GPU
takes the higher of the two operands' precisions; `jax.default_matmul_precision` is resolved
into the operation when it is traced, "tensorfloat32" to `HIGH`), and the `DEFAULT` and
`TF32_TF32_F32` dot algorithms. Products at `HIGHEST`, or with any other algorithm, are left
alone, as the GPU leaves them: code that asks for full float32 on purpose (the FID resize,
an exact reference inverse) keeps it inside the context. What is left of the GPU's numbers is
the order of the float32 sums.

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
_TF32_ALGORITHMS = ("DEFAULT", "TF32_TF32_F32")


def gpu_uses_tf32(precision) -> bool:
    """Whether an NVIDIA GPU computes a float32 product with this `precision` parameter of
    `dot_general` / `conv_general_dilated` (None, a `Precision`, a pair of them, or a
    `DotAlgorithmPreset`) in TF32."""
    if precision is None:
        return True
    if isinstance(precision, jax.lax.DotAlgorithmPreset):
        return precision.name in _TF32_ALGORITHMS
    pair = precision if isinstance(precision, tuple) else (precision,)
    if not all(p is None or isinstance(p, jax.lax.Precision) for p in pair):
        return False  # a custom DotAlgorithm: computed as it names, not emulated here
    return all(p != jax.lax.Precision.HIGHEST for p in pair)


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
    """Round both operands of every float32 matmul and convolution traced inside that the GPU
    computes in TF32 (`gpu_uses_tf32`; module docstring). Nested contexts are one."""
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
            if gpu_uses_tf32(params.get("precision")):
                lhs, rhs = round_tf32(lhs), round_tf32(rhs)
            return bind(lhs, rhs, **params)

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
