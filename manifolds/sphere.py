"""The unit sphere Sⁿ ⊂ Rⁿ⁺¹ in ambient coordinates.

Shapes: points `x` are `[..., D]` with `D = n + 1` and `|x| = 1`; a tangent vector `v` at `x`
is `[..., D]` with `<x, v> = 0`; times `t` are `[...]` (the leading shape). All functions are
pure `jax.numpy`, jit/vmap/grad friendly, and finite (with finite gradients) at the special
points `v = 0`, `y = x` and `y = -x`.

Numerics:
- `exp_map` uses `cos|v|` and `sin|v| / |v|` with a Taylor branch for tiny `|v|`, then
  renormalises, so that long chains of steps stay on the sphere to float precision.
- `log_map` and `distance` never call `arccos`: the angle is `atan2(|u|, <x, y>)` where
  `u` (the tangent part of `y` at `x`) is computed from whichever of `y - x` or `y + x` is the
  smaller vector, which keeps full relative precision both near `y = x` and near `y = -x`.
  At an exactly antipodal pair every great circle is a geodesic; a fixed one is chosen.
"""

import math

import jax
import jax.numpy as jnp

EARTH_RADIUS_KM = 6371.0
_TINY2 = 1e-12  # |v|² below which Taylor expansions replace cos, sin / r


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """`<a, b>` over the last axis, keepdims: `[..., D] x [..., D] -> [..., 1]`."""
    return jnp.sum(a * b, axis=-1, keepdims=True)


def _safe_norm(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(|v|, |v|², small)`, each `[..., 1]`; `|v|` has a finite gradient at `v = 0`."""
    r2 = _dot(v, v)
    small = r2 < _TINY2
    r = jnp.sqrt(jnp.where(small, 1.0, r2))
    return jnp.where(small, 0.0, r), r2, small


def normalize(x: jax.Array) -> jax.Array:
    """Radial projection `x / |x|` onto the sphere, `[..., D] -> [..., D]`."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def to_tangent(x: jax.Array, v: jax.Array) -> jax.Array:
    """Orthogonal projection of `v` onto the tangent space at `x`: `v - <x, v> x`."""
    return v - _dot(x, v) * x


def exp_map(x: jax.Array, v: jax.Array) -> jax.Array:
    """`exp_x(v) = cos|v| x + sin|v| v / |v|` for tangent `v` at `x`; `[..., D]`."""
    r, r2, small = _safe_norm(v)
    r_safe = jnp.where(small, 1.0, r)
    cos_r = jnp.where(small, 1.0 - r2 / 2, jnp.cos(r_safe))
    sinc_r = jnp.where(small, 1.0 - r2 / 6, jnp.sin(r_safe) / r_safe)
    return normalize(cos_r * x + sinc_r * v)


def _any_tangent(x: jax.Array) -> jax.Array:
    """A unit tangent vector at `x` (deterministic): the projected least-aligned axis."""
    axis = jnp.argmin(jnp.abs(x), axis=-1)
    e = jax.nn.one_hot(axis, x.shape[-1], dtype=x.dtype)
    return normalize(to_tangent(x, e))


def log_map(x: jax.Array, y: jax.Array) -> jax.Array:
    """`log_x(y)`: the tangent vector at `x` of length `d(x, y)` pointing towards `y`."""
    c = _dot(x, y)
    w = jnp.where(c >= 0, y - x, y + x)  # same tangent part as y, smaller magnitude
    u = to_tangent(x, w)
    r, r2, small = _safe_norm(u)
    theta = jnp.arctan2(r, c)
    factor = jnp.where(small, 1.0 + r2 / 6, theta / jnp.where(small, 1.0, r))
    antipodal = small & (c < 0)
    return jnp.where(antipodal, jnp.pi * _any_tangent(x), factor * u)


def distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """Geodesic (angular) distance in radians, `[..., D] x [..., D] -> [...]`."""
    a = jnp.linalg.norm(x - y, axis=-1)
    b = jnp.linalg.norm(x + y, axis=-1)
    return 2.0 * jnp.arctan2(a, b)


def geodesic(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """The point at time `t` on the minimising geodesic from `x0` (t=0) to `x1` (t=1).

    `x0, x1` are `[..., D]`, `t` is `[...]` (or a scalar); returns `[..., D]`.
    """
    t = jnp.asarray(t, x0.dtype)[..., None]
    return exp_map(x0, t * log_map(x0, x1))


def geodesic_velocity(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """`d/dt geodesic(x0, x1, t)`, a tangent vector at `x_t`, in closed form.

    Equals `log_{x_t}(x1) / (1 - t)` (the flow-matching target) for `t < 1`, but needs no
    division by `1 - t`: with `u = log_{x0}(x1)`, `r = |u|`, it is `-r sin(tr) x0 + cos(tr) u`.
    """
    t = jnp.asarray(t, x0.dtype)[..., None]
    u = log_map(x0, x1)
    r, _, _ = _safe_norm(u)
    return -r * jnp.sin(t * r) * x0 + jnp.cos(t * r) * u


def check_unit_vectors(x, what: str, tol: float = 1e-3) -> None:
    """Host-side input check (not for jitted code): `x` `[..., D]` (D >= 2) must be finite
    points of norm 1 within `tol`; else one UserError naming `what`, how many points fail
    and the first (latitude/longitude in degrees or unnormalised vectors land here)."""
    import numpy as np

    from core.errors import UserError

    a = np.asarray(x, np.float64)
    if a.ndim < 1 or a.shape[-1] < 2:
        raise UserError(
            f"{what}: points on a sphere need shape [..., D] with D >= 2, got {a.shape}"
        )
    norms = np.linalg.norm(a, axis=-1)
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > tol)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = first[0] if len(first) == 1 else first
        raise UserError(
            f"{what}: {int(bad.sum())} of {bad.size} points are not finite unit vectors "
            f"(|x| = 1 within {tol:g}); the first, at index {where}, has |x| = "
            f"{norms[first]:.6g} (latitude/longitude must go through latlon_to_xyz)"
        )


def log_area(dim: int) -> float:
    """`log` of the area of the unit sphere S^{dim-1} ⊂ R^dim: `log(2 π^{d/2} / Γ(d/2))`."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def uniform_log_prob(x: jax.Array) -> jax.Array:
    """Log-density of the uniform distribution on the sphere, `[..., D] -> [...]`."""
    return jnp.full(x.shape[:-1], -log_area(x.shape[-1]), x.dtype)


def uniform(
    key: jax.Array, shape: tuple[int, ...], dim: int = 3, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Uniform samples on S^{dim-1}, `[*shape, dim]` (normalised Gaussians)."""
    z = jax.random.normal(key, (*shape, dim), dtype)
    z = jnp.where(jnp.linalg.norm(z, axis=-1, keepdims=True) > 1e-20, z, 1.0)  # p = 0 anyway
    return normalize(z)


def latlon_to_xyz(latlon: jax.Array) -> jax.Array:
    """Latitude/longitude in degrees `[..., 2]` to unit vectors `[..., 3]`.

    `x = cos(lat) cos(lon)`, `y = cos(lat) sin(lon)`, `z = sin(lat)` (north pole `+z`,
    lon = 0 on `+x`), the convention of the Riemannian flow-matching code.
    """
    lat, lon = jnp.deg2rad(latlon[..., 0]), jnp.deg2rad(latlon[..., 1])
    return jnp.stack(
        [jnp.cos(lat) * jnp.cos(lon), jnp.cos(lat) * jnp.sin(lon), jnp.sin(lat)], axis=-1
    )


def xyz_to_latlon(x: jax.Array) -> jax.Array:
    """Points `[..., 3]` (need not be unit) to latitude/longitude in degrees `[..., 2]`.

    Latitude in [-90, 90], longitude in (-180, 180].
    """
    lat = jnp.arctan2(x[..., 2], jnp.hypot(x[..., 0], x[..., 1]))
    lon = jnp.arctan2(x[..., 1], x[..., 0])
    return jnp.rad2deg(jnp.stack([lat, lon], axis=-1))


def great_circle_km(x: jax.Array, y: jax.Array, radius_km: float = EARTH_RADIUS_KM) -> jax.Array:
    """Great-circle distance in km between unit vectors `[..., 3]`, `-> [...]`."""
    return radius_km * distance(x, y)
