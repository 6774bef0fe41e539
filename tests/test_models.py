"""Contract tests for every network in `models.NETWORKS`, plus the FLOP counter.

Kept CPU-cheap: each network is built once (module fixture) and perturbed with numpy noise;
shape-only checks trace with `eval_shape`; jitted code compiles at XLA's optimisation level 0,
which halves CPU compile time here (random initialisers compile slowly eagerly).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from core.errors import UserError
from models import NETWORKS, layers
from models.dit import DiT, decode_variant
from models.flops import count_flops, dit_forward_flops, train_flops
from models.unet import UNet

B, NUM_CLASSES = 2, 3
TINY = {  # name: (constructor kwargs, input shape)
    "mlp": (dict(dim=2, hidden=32, depth=2), (B, 2)),
    "unet": (
        dict(
            in_channels=3,
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(4,),
            num_heads=2,
            image_size=8,
        ),
        (B, 8, 8, 3),
    ),
    "dit": (dict(in_channels=3, variant="S/2", hidden=32, depth=2, heads=2), (B, 8, 8, 3)),
}
# Networks with their own contract tests (no dt input, tangent outputs): where they are.
TESTED_ELSEWHERE = {
    "sphere_mlp": "tests/test_sphere.py",
    "tarflow": "tests/test_tarflow.py",
    "realnvp": "tests/test_tarflow.py",
    "classifier": "tests/test_classifier.py",
    "vae": "tests/test_givt.py",
    "givt": "tests/test_givt.py",
}
T = jnp.array([0.3, 0.7])
DT = jnp.array([0.25, 0.5])
LABELS = jnp.array([0, 1])
jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@dataclasses.dataclass
class Case:
    name: str
    kwargs: dict
    x: jax.Array
    fresh: nnx.Module  # as constructed
    net: nnx.Module  # parameters perturbed away from the zero inits


def perturb(net: nnx.Module, seed: int = 0, scale: float = 0.1) -> nnx.Module:
    graphdef, state = nnx.split(net)
    rng = np.random.default_rng(seed)
    noise = lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype)
    return nnx.merge(graphdef, jax.tree.map(noise, state))


def abstract(name: str, **kwargs) -> nnx.Module:
    return nnx.eval_shape(lambda: NETWORKS[name](**kwargs, rngs=nnx.Rngs(0)))


def trace(net: nnx.Module, *args, **kwargs) -> jax.ShapeDtypeStruct:
    """Output shape of `net(*args, **kwargs)` without computing (works on abstract nets)."""
    graphdef, state = nnx.split(net)
    return jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args, **kwargs), state)


def test_tiny_covers_registry():
    assert set(TINY) | set(TESTED_ELSEWHERE) == set(NETWORKS)


@pytest.fixture(scope="module", params=sorted(TINY))
def case(request) -> Case:
    kwargs, shape = TINY[request.param]
    kwargs = dict(kwargs, num_classes=NUM_CLASSES, use_dt=True)
    cls = NETWORKS[request.param]
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0))))[0]
    state = jit0(lambda: nnx.split(cls(**kwargs, rngs=nnx.Rngs(0)))[1])()
    fresh = nnx.merge(graphdef, state)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    return Case(request.param, kwargs, x, fresh, perturb(fresh))


def test_fresh_net_contract(case: Case):
    out = case.fresh(case.x, T, cond=LABELS, dt=DT)
    assert out.shape == case.x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    if case.name in ("dit", "unet"):  # adaLN-Zero / zero-initialised output conv
        np.testing.assert_array_equal(out, 0.0)
    params, rest = nnx.split(case.fresh, nnx.Param, ...)[1:]
    assert not jax.tree.leaves(rest), "only nnx.Param state is allowed"
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_jit_matches_eager_and_grads_finite(case: Case):
    graphdef, state = nnx.split(case.net)

    @jit0
    def out_and_grads(state, x):
        def loss(s):
            v = nnx.merge(graphdef, s)(x, T, cond=LABELS, dt=DT)
            return jnp.sum(v**2), v

        (_, v), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return v, grads

    v_jit, grads = out_and_grads(state, case.x)
    v_eager = case.net(case.x, T, cond=LABELS, dt=DT)
    assert v_jit.dtype == jnp.float32
    np.testing.assert_allclose(v_jit, v_eager, rtol=1e-4, atol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_cond(case: Case):
    null = jnp.full((B,), NUM_CLASSES)
    np.testing.assert_allclose(
        case.net(case.x, T, cond=None, dt=DT),
        case.net(case.x, T, cond=null, dt=DT),
        rtol=1e-6,
        atol=1e-6,
    )
    other = case.net(case.x, T, cond=LABELS + 1, dt=DT)
    assert float(jnp.abs(case.net(case.x, T, cond=LABELS, dt=DT) - other).max()) > 1e-4
    with pytest.raises(ValueError, match="int labels"):
        trace(case.net, case.x, T, cond=jnp.ones((B, 4)))


def test_dt(case: Case):
    v0 = case.net(case.x, T, cond=LABELS, dt=jnp.zeros((B,)))
    np.testing.assert_allclose(case.net(case.x, T, cond=LABELS), v0, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(case.net(case.x, T, cond=LABELS, dt=DT) - v0).max()) > 1e-4
    no_dt = abstract(case.name, **dict(case.kwargs, use_dt=False))
    assert trace(no_dt, case.x, T).shape == case.x.shape
    with pytest.raises(ValueError, match="use_dt"):
        trace(no_dt, case.x, T, dt=DT)


def test_bf16_close_to_f32(case: Case):
    graphdef = nnx.split(abstract(case.name, **dict(case.kwargs, dtype=jnp.bfloat16)))[0]
    state = nnx.split(case.net)[1]
    apply = jit0(lambda s, x: nnx.merge(graphdef, s)(x, T, cond=LABELS, dt=DT))
    v16 = apply(state, case.x)
    v32 = case.net(case.x, T, cond=LABELS, dt=DT)
    assert v16.dtype == jnp.float32
    err = float(jnp.abs(v16 - v32).max())
    assert err <= 0.05 * float(jnp.abs(v32).max()) + 1e-2, err


@pytest.mark.parametrize("name", sorted(TINY))
def test_float_embedding_cond(name: str):
    kwargs, shape = TINY[name]
    net = abstract(name, **kwargs, cond_dim=5)
    x = jnp.zeros(shape)
    assert trace(net, x, T, cond=jnp.ones((B, 5))).shape == shape
    assert trace(net, x, T).shape == shape
    with pytest.raises(ValueError, match="embedding"):
        trace(net, x, T, cond=LABELS)
    with pytest.raises(ValueError, match="unconditional"):
        trace(abstract(name, **kwargs), x, T, cond=LABELS)


def test_build_errors():
    with pytest.raises(UserError, match="nope"):
        models.build("nope", rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="bogus"):
        models.build("mlp", rngs=nnx.Rngs(0), dim=2, bogus=1)


def test_build_passes_options():
    net = nnx.eval_shape(lambda: models.build("mlp", rngs=nnx.Rngs(0), dim=3, hidden=8, depth=1))
    assert isinstance(net, models.MLP) and net.dim == 3
    # the constructors' own checks come back as one UserError naming the network
    with pytest.raises(UserError, match="network 'dit': unknown DiT variant 'Q/2'"):
        models.build("dit", in_channels=1, variant="Q/2", rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="network 'mlp': dim, hidden and depth must be >= 1"):
        models.build("mlp", dim=2, hidden=0, depth=1, rngs=nnx.Rngs(0))


def test_mnist_shapes():
    x, t = jnp.zeros((B, 28, 28, 1)), T
    dit = nnx.eval_shape(lambda: DiT(1, "S/2", num_classes=10, depth=2, rngs=nnx.Rngs(0)))
    assert trace(dit, x, t, cond=LABELS).shape == x.shape
    unet = nnx.eval_shape(
        lambda: UNet(
            1,
            ch=32,
            ch_mult=(1, 2, 2),
            num_res_blocks=1,
            attn_resolutions=(14,),
            image_size=28,
            num_classes=10,
            rngs=nnx.Rngs(0),
        )
    )
    out = trace(unet, x, t, cond=LABELS)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_size_errors():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(1, ch_mult=(1, 2, 2), attn_resolutions=(), image_size=30, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="match no level"):
        UNet(1, ch_mult=(1, 2, 2), attn_resolutions=(16,), image_size=28, rngs=nnx.Rngs(0))
    unet = abstract("unet", **TINY["unet"][0])
    with pytest.raises(ValueError, match="image_size=8"):
        trace(unet, jnp.zeros((B, 16, 16, 3)), T)
    dit = abstract("dit", **TINY["dit"][0])
    with pytest.raises(ValueError, match="patch 2"):
        trace(dit, jnp.zeros((B, 7, 7, 3)), T)
    with pytest.raises(ValueError, match="B/2"):
        decode_variant("Q/3")
    assert decode_variant("XL/4") == (1152, 28, 16, 4)


def test_count_flops_matmul_conv_and_control_flow():
    a, b = jnp.zeros((5, 7)), jnp.zeros((7, 3))
    assert count_flops(jnp.matmul, a, b) == 2 * 5 * 3 * 7
    assert count_flops(lambda a, b: jax.jit(jnp.matmul)(a, b), a, b) == 2 * 5 * 3 * 7
    scan = lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, length=4)[1]
    assert count_flops(scan, a, b) == 4 * 2 * 5 * 3 * 7
    batched = jnp.zeros((4, 5, 7))
    assert count_flops(lambda x, y: jnp.einsum("bmk,kn->bmn", x, y), batched, b) == 4 * 210
    conv = nnx.eval_shape(lambda: nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(conv)
    x = jnp.zeros((2, 5, 5, 4))
    flops = count_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert flops == 2 * (2 * 5 * 5 * 6) * 9 * (4 // 2)
    mm = 2 * 5 * 3 * 7
    custom_jvp = jax.custom_jvp(jnp.matmul)
    custom_jvp.defjvp(lambda p, tg: (p[0] @ p[1], tg[0] @ p[1] + p[0] @ tg[1]))
    custom_vjp = jax.custom_vjp(jnp.matmul)
    custom_vjp.defvjp(lambda a, b: (a @ b, (a, b)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    for fn in (custom_jvp, custom_vjp, jax.checkpoint(jnp.matmul)):
        assert count_flops(fn, a, b) == mm
    branches = lambda a, b: jax.lax.cond(a.sum() > 0, lambda: a @ b @ b.T @ b, lambda: a @ b)
    assert count_flops(branches, a, b) == mm + 2 * 5 * 7 * 3 + mm
    loop = lambda a: jax.lax.while_loop(lambda c: c.sum() < 1, lambda c: c @ c.T @ c, a)
    with pytest.raises(ValueError, match="while"):
        count_flops(loop, a)


@pytest.mark.parametrize(
    "variant,size,kw", [("S/2", 8, dict(hidden=32, depth=2, heads=2)), ("B/2", 32, {})]
)
def test_count_flops_matches_dit_formula(variant: str, size: int, kw: dict):
    net = nnx.eval_shape(lambda: DiT(3, variant, cond_dim=5, use_dt=True, **kw, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(net)
    x, c = jnp.zeros((B, size, size, 3)), jnp.zeros((B, 5))
    fn = lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, cond=c, dt=t)
    sizes = {k: v for k, v in kw.items() if k != "heads"}
    want = dit_forward_flops(variant, size, 3, B, use_dt=True, cond_dim=5, **sizes)
    assert count_flops(fn, state, x, T, c) == want
    assert train_flops(want) == 3 * want


def test_attention_falls_back_to_xla_where_cudnn_is_missing(monkeypatch):
    q = jnp.asarray(np.random.default_rng(0).standard_normal((B, 4, 2, 8)), jnp.bfloat16)
    want = jax.nn.dot_product_attention(q, q, q, implementation="xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # asks for cuDNN on a CPU
    np.testing.assert_array_equal(layers.attend(q, q, q), want)
