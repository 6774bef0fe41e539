"""Exact log-likelihood of a flow-matching model through its probability-flow ODE.

`log p_1(x) = log p_0(x_0) - ∫_0^1 div v(x_t, t) dt` (instantaneous change of variables),
where `x_t` solves `dx/dt = v(x, t)` backwards from `x_1 = x` (data, t = 1) to `x_0` (noise,
t = 0). Both are integrated jointly, either with fixed-step classical RK4 on `lax.scan`
(`solver="rk4"`, `num_steps`) or with an adaptive embedded Runge-Kutta pair from diffrax
(`solver="dopri5"` or `"tsit5"`, tolerances `rtol` / `atol`), each example with its own step
sizes (torchdiffeq's dopri5 at rtol = atol = 1e-5 is what the Riemannian FM papers report
their likelihoods with). Everything is differentiable (w.r.t. the samples and, through
`nnx.merge`, the parameters).

Geometry (`manifold`):
- `"euclidean"`: `div v = tr J`, `J = ∂v/∂x` (per example, over the flattened example).
  Default base: standard normal.
- `"sphere"`: the Riemannian divergence of the tangent field `V` on S^{D-1}. Take any smooth
  extension `F` of `V` to a neighbourhood in R^D (here `F(u) = P_u v(u)`, the network output at
  `u` projected with `P_u = I - u uᵀ`); at a point `x` of the sphere,
  `div_S V = Σ_i <∇_{e_i} V, e_i>` over an orthonormal basis `e_i` of `T_x`, and since
  `∇_{e_i} V = P_x (J e_i)` and `e_i` is tangent, `div_S V = tr(P_x J P_x) = tr J - xᵀ J x`
  (computed as `Σ_j (P e_j)ᵀ J (P e_j)` over the ambient basis `e_j`). The plain ambient
  trace `tr J` would add the radial term `xᵀ J x`, which depends on the extension (e.g.
  `-2kz` vs `-4kz` for `F(x) = k(e_z - z x)`), so it is removed. The state
  is renormalised after every RK4 step and the stages are evaluated at normalised points (the
  exact flow stays on the sphere, so the scheme keeps order 4). Default base: uniform,
  `-log area(S^{D-1})` (`-log 4π` on S²).

`divergence="exact"` costs D Jacobian-vector products per evaluation (cheap for S²);
`"hutchinson"` uses `num_probes` Gaussian probes `ε`, fixed along the trajectory (FFJORD),
projected to the tangent space on the sphere: `E[(Pε)ᵀ J (Pε)] = tr(P J P)`.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from core.errors import UserError
from manifolds.sphere import check_unit_vectors, normalize, to_tangent, uniform_log_prob

MANIFOLDS = ("euclidean", "sphere")


def standard_normal_log_prob(x: jax.Array) -> jax.Array:
    """Log-density of N(0, I) over all but the batch axis, `[B, ...] -> [B]`."""
    z = x.reshape(x.shape[0], -1)
    return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * jnp.log(2 * jnp.pi)


def _value_and_divergence(
    f: Callable, y: jax.Array, sphere: bool, probes: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """`(f(y) [B, D], div f(y) [B])` for the batched field `f: [B, D] -> [B, D]`.

    Exact: `Σ_j (P e_j)ᵀ J (P e_j) = tr(P J P)` from D Jacobian-vector products along the
    (projected, on the sphere) basis vectors, sharing one linearisation of `f`.
    """
    out, jvp = jax.linearize(f, y)
    if probes is None:
        eye = jnp.broadcast_to(
            jnp.eye(y.shape[-1], dtype=y.dtype)[:, None, :], (y.shape[-1], *y.shape)
        )
        directions = jax.vmap(lambda e: to_tangent(y, e))(eye) if sphere else eye
    else:
        directions = jax.vmap(lambda e: to_tangent(y, e))(probes) if sphere else probes
    quad = jnp.sum(directions * jax.vmap(jvp)(directions), axis=-1)  # [D or P, B]
    return out, (jnp.sum(quad, axis=0) if probes is None else jnp.mean(quad, axis=0))


def _dynamics(net, shape: tuple[int, ...], cond, sphere: bool, probes):
    """`(z [B, D], t) -> (dz/dt [B, D], div [B])` of the flattened ODE."""

    def dynamics(z, t):
        t_b = jnp.full(shape[:1], t, jnp.float32)

        def f(u):
            v = net(u.reshape(shape), t_b, cond=cond).astype(u.dtype).reshape(u.shape)
            return to_tangent(u, v) if sphere else v

        return _value_and_divergence(f, normalize(z) if sphere else z, sphere, probes)

    return dynamics


SOLVERS = ("rk4", "dopri5", "tsit5")
_ADAPTIVE = {"dopri5": "Dopri5", "tsit5": "Tsit5"}  # diffrax's classes


def solver_options(solver: str, *, num_steps: int | None = None, tol: float = 1e-5) -> dict:
    """The keywords of one ODE solve for `log_likelihood`: RK4 with `num_steps`, or an
    adaptive solver with `rtol = atol = tol`."""
    if solver not in SOLVERS:
        raise UserError(f"unknown ODE solver {solver!r}; known: {', '.join(SOLVERS)}")
    if solver == "rk4":
        return {"solver": "rk4", "num_steps": num_steps}
    return {"solver": solver, "rtol": tol, "atol": tol}


def finer(options: dict) -> dict:
    """The same solve made finer (twice the RK4 steps, a tenth of the tolerances): the
    change it makes estimates the error of the first. `options` from `solver_options`."""
    if options["solver"] == "rk4":
        return {**options, "num_steps": 2 * options["num_steps"]}
    return {**options, "rtol": options["rtol"] / 10, "atol": options["atol"] / 10}


def describe(options: dict) -> str:
    """`"400 RK4 steps"` or `"dopri5, rtol = 1e-05, atol = 1e-05"`, for tables."""
    if options["solver"] == "rk4":
        return f"{options['num_steps']} RK4 steps"
    return f"{options['solver']}, rtol = {options['rtol']:g}, atol = {options['atol']:g}"


def _rk4(dyn, z: jax.Array, num_steps: int, sphere: bool) -> tuple[jax.Array, jax.Array]:
    """Fixed-step RK4 from t = 1 to t = 0: `(z_0, ∫_1^0 div dt)`."""
    h = -1.0 / num_steps

    def step(carry, i):
        z, acc = carry
        t = 1.0 + i * h
        k1, a1 = dyn(z, t)
        k2, a2 = dyn(z + 0.5 * h * k1, t + 0.5 * h)
        k3, a3 = dyn(z + 0.5 * h * k2, t + 0.5 * h)
        k4, a4 = dyn(z + h * k3, t + h)
        z = z + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        acc = acc + h / 6.0 * (a1 + 2.0 * a2 + 2.0 * a3 + a4)
        return ((normalize(z) if sphere else z), acc), None

    acc0 = jnp.zeros(z.shape[:1], z.dtype)
    (z0, acc), _ = jax.lax.scan(step, (z, acc0), jnp.arange(num_steps, dtype=jnp.float32))
    return z0, acc


def _adaptive(net, shape, z, cond, sphere, probes, solver, rtol, atol, max_steps):
    """Adaptive solve from t = 1 to t = 0, one example at a time under `vmap` (each with
    its own step sizes): `(z_0, ∫_1^0 div dt, accepted steps, succeeded)`, each `[B]`-led.

    The state stays in ambient coordinates; on the sphere the field is evaluated at the
    normalised point and is tangent there, so `|z|` drifts only by the local error, and
    `z_0` is normalised at the end."""
    import diffrax

    one = (1, *shape[1:])

    def solve(zi, ci, pi):
        dyn = _dynamics(
            net, one, None if ci is None else ci[None], sphere, None if pi is None else pi[:, None]
        )

        def field(t, y, args):
            v, div = dyn(y[0][None], t)
            return v[0], div[0]

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), getattr(diffrax, _ADAPTIVE[solver])(), t0=1.0, t1=0.0,
            dt0=None, y0=(zi, jnp.zeros((), zi.dtype)), max_steps=max_steps, throw=False,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        )  # fmt: skip
        ok = sol.result == diffrax.RESULTS.successful
        return sol.ys[0][-1], sol.ys[1][-1], sol.stats["num_accepted_steps"], ok

    axes = (0, None if cond is None else 0, None if probes is None else 1)
    z0, acc, steps, ok = jax.vmap(solve, in_axes=axes)(z, cond, probes)
    return (normalize(z0) if sphere else z0), acc, steps, ok


def log_likelihood(
    net,
    x: jax.Array,
    *,
    num_steps: int | None = None,
    cond: jax.Array | None = None,
    manifold: str = "sphere",
    base_log_prob: Callable | None = None,
    divergence: str = "exact",
    key: jax.Array | None = None,
    num_probes: int = 1,
    solver: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    return_stats: bool = False,
):
    """`log p(x)` in nats per example, `[B, ...] -> [B]`, under the flow of `net`.

    Args:
      net: `net(x [B, ...], t [B], *, cond) -> v` (t = 0 noise, t = 1 data).
      x: data points (on the sphere for `manifold="sphere"`).
      num_steps: RK4 steps from t = 1 to t = 0 (4 network evaluations each); `solver="rk4"`.
      cond: passed to every network call.
      manifold: "sphere" or "euclidean" (see the module docstring).
      base_log_prob: `[B, ...] -> [B]`, the density at t = 0; default uniform on the sphere
        or standard normal.
      divergence: "exact" or "hutchinson" (needs `key`, uses `num_probes`).
      solver: "rk4" (fixed steps) or "dopri5" / "tsit5" (adaptive, `rtol`, `atol`, at most
        `max_steps` accepted and rejected steps per example); default "rk4" when
        `num_steps` is given, else "dopri5".
      return_stats: also return `{"steps": [B] int, "ok": [B] bool}`: the steps taken per
        example and whether the adaptive solve finished within `max_steps` (a failed
        example's value is meaningless; `log_likelihood_batched` raises on it).
    """
    if manifold not in MANIFOLDS:
        raise UserError(f"unknown manifold {manifold!r}; known: {', '.join(MANIFOLDS)}")
    if solver is None:
        solver = "dopri5" if num_steps is None else "rk4"
    if solver not in SOLVERS:
        raise UserError(f"unknown ODE solver {solver!r}; known: {', '.join(SOLVERS)}")
    if solver == "rk4" and (num_steps is None or num_steps < 1):
        raise UserError(f"the rk4 likelihood needs num_steps >= 1, got {num_steps}")
    if solver != "rk4" and num_steps is not None:
        raise UserError(f"num_steps={num_steps} is for solver='rk4'; {solver} takes rtol, atol")
    sphere = manifold == "sphere"
    if base_log_prob is None:
        base_log_prob = uniform_log_prob if sphere else standard_normal_log_prob
    z = x.reshape(x.shape[0], -1).astype(jnp.float32)
    probes = None
    if divergence == "hutchinson":
        if key is None:
            raise UserError("divergence='hutchinson' needs a key")
        probes = jax.random.normal(key, (num_probes, *z.shape), z.dtype)
    elif divergence != "exact":
        raise UserError(f"unknown divergence {divergence!r}; known: exact, hutchinson")
    if solver == "rk4":
        z0, acc = _rk4(_dynamics(net, x.shape, cond, sphere, probes), z, num_steps, sphere)
        stats = {"steps": jnp.full(z.shape[:1], num_steps), "ok": jnp.ones(z.shape[:1], bool)}
    else:
        z0, acc, steps, ok = _adaptive(
            net, x.shape, z, cond, sphere, probes, solver, rtol, atol, max_steps
        )
        stats = {"steps": steps, "ok": ok}
    # acc = ∫_1^0 div dt = -∫_0^1 div dt
    lp = base_log_prob(z0.reshape(x.shape)) + acc
    return (lp, stats) if return_stats else lp


def _pad_rows(a: jax.Array, n: int) -> jax.Array:
    """`a` `[m, ...]` with its first row repeated up to `n` rows (valid points, no NaNs)."""
    if a.shape[0] >= n:
        return a
    return jnp.concatenate([a, jnp.repeat(a[:1], n - a.shape[0], axis=0)])


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, kwargs: tuple):
    """One jitted likelihood per network structure and settings: evaluating several
    checkpoints of a run (same graphdef) compiles once."""
    options = dict(kwargs)
    return jax.jit(
        lambda s, xb, cb, k: log_likelihood(
            nnx.merge(graphdef, s), xb, cond=cb, key=k, return_stats=True, **options
        )
    )


def log_likelihood_batched(
    net,
    x: jax.Array,
    *,
    batch_size: int = 1024,
    cond: jax.Array | None = None,
    with_stats: bool = False,
    progress: str | None = None,
    **kwargs,
):
    """`log_likelihood` over `x` `[N, ...]` in jitted batches, `-> float32 [N]` on the host
    (with `with_stats`, also `{"steps": int [N]}`, the ODE steps each point took).
    `progress`: the label of a progress bar (points done, with an estimate) on stderr.

    The last batch is padded (with copies of its first row) to `batch_size`, so one
    compilation serves any N. `kwargs` go to `log_likelihood` (`num_steps` for RK4; a `key`
    is folded with the batch index). An adaptive solve that runs out of `max_steps` on any
    point is an error naming how many points.
    """
    key = kwargs.pop("key", None)
    if kwargs.get("manifold", "sphere") == "sphere":
        check_unit_vectors(x, "log-likelihood on the sphere")
    if isinstance(net, nnx.Module):  # params as an argument, not baked-in constants
        graphdef, state = nnx.split(net)
        fn = _compiled(graphdef, tuple(sorted(kwargs.items())))
    else:
        state = None
        fn = jax.jit(
            lambda s, xb, cb, k: log_likelihood(
                net, xb, cond=cb, key=k, return_stats=True, **kwargs
            )
        )
    pad = lambda a: _pad_rows(a, batch_size)
    out, steps, failed = [], [], 0
    bar = tqdm(total=x.shape[0], desc=progress, unit="pt", disable=progress is None)
    with bar:
        for i, start in enumerate(range(0, x.shape[0], batch_size)):
            xb = x[start : start + batch_size]
            cb = None if cond is None else pad(cond[start : start + batch_size])
            kb = None if key is None else jax.random.fold_in(key, i)
            lp, stats = jax.device_get(fn(state, pad(xb), cb, kb))
            out.append(np.asarray(lp)[: xb.shape[0]])
            steps.append(np.asarray(stats["steps"])[: xb.shape[0]])
            failed += int(np.sum(~np.asarray(stats["ok"])[: xb.shape[0]]))
            bar.update(xb.shape[0])
    if failed:
        raise UserError(
            f"the adaptive ODE solver ({kwargs.get('solver') or 'dopri5'}) ran out of max_steps="
            f"{kwargs.get('max_steps', 4096)} on {failed} of {x.shape[0]} points: raise "
            "max_steps or loosen rtol/atol"
        )
    lp = np.concatenate(out)
    return (lp, {"steps": np.concatenate(steps)}) if with_stats else lp


def mean_nll(
    net, x: jax.Array, *, batch_size: int = 1024, cond: jax.Array | None = None, **kwargs
) -> float:
    """Mean negative log-likelihood in nats over `x` `[N, ...]` (see `log_likelihood_batched`)."""
    lp = log_likelihood_batched(net, x, batch_size=batch_size, cond=cond, **kwargs)
    return -float(np.mean(lp, dtype=np.float64))
