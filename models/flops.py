"""Analytic FLOP counts: traced from a jaxpr (`count_flops`) or in closed form for DiT.

A FLOP here is one multiply or one add: a matmul `[M, K] @ [K, N]` is `2 M N K`. Only
matrix work is counted (`dot_general`, `conv_general_dilated`); elementwise ops, reductions,
norms, softmax and gathers are not (they are a few percent of a transformer and are not
what model-FLOPs utilisation measures). Training costs `TRAIN_FACTOR = 3` forwards
(the backward pass is two matmuls per forward matmul: input and weight gradients).
"""

import math

import jax
from jax.extend import core as jex_core

from models.dit import FREQ_DIM, MLP_RATIO, decode_variant
from models.layers import attention_implementation

TRAIN_FACTOR = 3


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)`, traced with `jax.make_jaxpr` (attention on the XLA
    path so that it appears as `dot_general`s).

    Counted: `dot_general` (2 * batch * M * N * K) and `conv_general_dilated`
    (2 * output elements * kernel spatial size * in-channels / feature_group_count, padding
    included). Recursed into: pjit/closed_call, custom_jvp_call, custom_vjp_call, remat and
    any other primitive holding jaxprs (summed); `scan` (times its length); `cond` (the
    most expensive branch). A `while` loop has no static trip count: a ValueError.
    Elementwise ops are not counted."""
    with attention_implementation("xla"):
        closed = jax.make_jaxpr(lambda a, kw: fn(*a, **kw))(args, kwargs)  # kwargs traced too
    return _jaxpr_flops(closed.jaxpr)


def _jaxpr_flops(jaxpr: jex_core.Jaxpr) -> int:
    return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def _eqn_flops(eqn: jex_core.JaxprEqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
        return 2 * math.prod(lhs) * math.prod(rhs_free)
    if name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        rhs = eqn.invars[1].aval.shape
        kernel = math.prod(rhs[i] for i in rhs_spec[2:]) * rhs[rhs_spec[1]]
        return 2 * math.prod(eqn.outvars[0].aval.shape) * kernel
    if name == "while":
        raise ValueError(
            "count_flops cannot count a while_loop (no static trip count); use "
            "lax.scan or fori_loop with static bounds"
        )
    if name == "scan":
        return eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    if name == "cond":
        return max(_jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
    return sum(_jaxpr_flops(sub) for sub in jex_core.jaxprs_in_params(eqn.params))


def dit_forward_flops(
    variant: str,
    image_size: int | tuple[int, int],
    channels: int,
    batch: int = 1,
    *,
    use_dt: bool = False,
    cond_dim: int = 0,
    hidden: int | None = None,
    depth: int | None = None,
    patch: int | None = None,
) -> int:
    """Forward FLOPs of `DiT(channels, variant, ...)` on `batch` images (matrix work only).

    With `T = (H / p) (W / p)` tokens, width `D`, patch vector `P = p^2 C`, `F = 256`:

        per block      24 T D^2 + 4 T^2 D + 12 D^2
                       (qkv 6 T D^2, logits + values 4 T^2 D, out-proj 2 T D^2,
                        MLP 2 * 2 T D (4D) = 16 T D^2, adaLN modulation 2 D (6D))
        patch embed    2 T P D
        final layer    4 D^2 (adaLN 2 D (2D)) + 2 T D P
        embeddings     2 F D + 2 D^2 for t, again for dt when `use_dt`,
                       2 cond_dim D for a float condition (a label lookup is free)

    total = batch * (depth * block + patch embed + final + embeddings). `hidden`, `depth`,
    `patch` override the variant like the DiT constructor's arguments."""
    base_hidden, base_depth, _, base_patch = decode_variant(variant)
    d = hidden or base_hidden
    n_blocks = depth or base_depth
    p = patch or base_patch
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch {p}")
    t, pv = (h // p) * (w // p), p * p * channels
    block = 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * MLP_RATIO * d
    block += 2 * d * 6 * d
    scalar_embed = 2 * FREQ_DIM * d + 2 * d * d
    embeds = scalar_embed * (2 if use_dt else 1) + 2 * cond_dim * d
    total = n_blocks * block + 2 * t * pv * d + 2 * d * 2 * d + 2 * t * d * pv + embeds
    return batch * total


def train_flops(forward_flops: int) -> int:
    """FLOPs of one training step from its forward count: `TRAIN_FACTOR * forward`."""
    return TRAIN_FACTOR * forward_flops
