"""Distances between two sets of vectors (generated samples vs data) for low-dimensional
data, where FID's Inception features mean nothing: the sliced Wasserstein distance.

`SW_p(X, Y)^p = E_θ W_p(θ·X, θ·Y)^p` over directions θ uniform on the unit sphere; each
1-D distance compares quantile functions. For two sets of equal size the 1-D optimal
coupling matches sorted values, so with the same directions the estimate is exact up to the
Monte Carlo average over θ; for sets of different sizes both quantile functions are
evaluated at the midpoints of `min(n, m)` equal-mass bins. Deterministic given `seed`.
"""

import numpy as np

from core.errors import UserError


def directions(dim: int, num: int, seed: int = 0) -> np.ndarray:
    """`num` unit vectors `[num, dim]`, uniform on the sphere, from `seed`."""
    v = np.random.default_rng(seed).standard_normal((num, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _quantiles(proj: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Empirical quantile functions of the columns of `proj [n, P]` at `levels [L]`."""
    s = np.sort(proj, axis=0)
    idx = np.minimum((levels * len(s)).astype(np.int64), len(s) - 1)  # inverse CDF
    return s[idx]


def sliced_wasserstein(
    x: np.ndarray, y: np.ndarray, *, num_projections: int = 256, p: int = 2, seed: int = 0
) -> float:
    """Sliced `p`-Wasserstein distance between samples `x [n, ...]` and `y [m, ...]`
    (flattened to vectors), averaged over `num_projections` random directions."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise UserError(f"sliced Wasserstein needs [n, D] and [m, D], got {x.shape}, {y.shape}")
    theta = directions(x.shape[1], num_projections, seed)
    px, py = x @ theta.T, y @ theta.T
    if len(x) == len(y):
        qx, qy = np.sort(px, axis=0), np.sort(py, axis=0)
    else:
        n = min(len(x), len(y))
        levels = (np.arange(n) + 0.5) / n
        qx, qy = _quantiles(px, levels), _quantiles(py, levels)
    per_direction = np.mean(np.abs(qx - qy) ** p, axis=0)
    return float(np.mean(per_direction) ** (1.0 / p))
