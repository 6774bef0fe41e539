"""Geometric memorization: the effective dimension of generated samples from the spectrum of
the score Jacobian at small noise (Achilli et al. 2024, "Losing dimensions: geometric
memorization in generative diffusion", arXiv 2410.08727; Ventura et al. 2024, arXiv
2410.05898; Stanczuk et al. 2022 for the idea).

Near data on a d-dimensional manifold and at small noise sigma, the score pulls back onto
the manifold: its Jacobian `d score / d x` has D - d singular values of order 1 / sigma^2
(the normal directions) and d small ones (the tangent directions, along which the model
still varies). Sorted descending, the spectrum has its largest gap after the (D - d)-th
value, so `effective_dimension = D - argmax_i (s_i - s_{i+1})`. A sample whose tangent
directions "freeze out" (geometric memorization) loses them from d. The two ends are
decided by the noise scale: if every value is at least `1 / sigma` (the midpoint, on a log
scale, of the tangent scale O(1) for data of unit scale and the normal scale `1 / sigma^2`;
a trained network's normal values fall short of `1 / sigma^2`) the sample has d = 0
(collapsed on one training point: every direction pulled back); if none is, d = D
(full-dimensional data, no direction pulled back); otherwise the largest gap decides.

Time convention: `t = 1` is data, so noise sigma means `t = 1 - sigma`; the noisy marginal
is `x_t = (1 - t) x0 + t x1`. Velocity networks are viewed as scores with
`models.views.convert(net, "velocity", "score")`. Jacobians are one sample at a time
(`jax.jacfwd`, optionally in column chunks); singular values come from NumPy on the host,
one small SVD per sample (XLA:CPU can hang on batched LAPACK calls in one program).
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import UserError
from models.views import KINDS, convert

# score(x [B, ...], t [B], cond [B] or None) -> [B, ...]
ScoreFn = Callable[..., jax.Array]


def score_view(net, kind: str = "velocity") -> ScoreFn:
    """`score(x, t, cond=None)` of a network whose outputs are of `kind` (velocity, data,
    eps, score)."""
    if kind not in KINDS:
        raise UserError(f"unknown network output kind {kind!r}; known: {', '.join(KINDS)}")
    view = convert(net, kind, "score")
    return lambda x, t, cond=None: view(x, t, cond=cond)


def score_jacobian(
    score: ScoreFn,
    x: jax.Array,
    t: float | jax.Array,
    *,
    cond: jax.Array | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """`d score(x, t) / d x` of one sample `x [...]` (D entries; `cond` its label `[1]` or
    None) as a `[D, D]` matrix (rows: score components; with `chunk`, its transpose, which
    has the same singular values), by forward mode: `jax.jacfwd`, or `chunk` columns at a
    time (bounded memory)."""
    shape = x.shape
    t_b = jnp.reshape(jnp.asarray(t, x.dtype), (1,))
    flat = lambda v: score(v.reshape((1, *shape)), t_b, cond).reshape(-1)
    x_flat = x.reshape(-1)
    if chunk is None:
        return jax.jacfwd(flat)(x_flat)
    d = x_flat.shape[0]
    n = -(-d // chunk)
    basis = jnp.eye(n * chunk, d, dtype=x.dtype).reshape(n, chunk, d)
    push = jax.vmap(lambda v: jax.jvp(flat, (x_flat,), (v,))[1])
    return jax.lax.map(push, basis).reshape(n * chunk, d)[:d]


def effective_dimension(svals: np.ndarray, max_rank: int | None = None, *, sigma: float) -> int:
    """`D - i*`, where `i*` (1-based) is the index of the largest gap `s_i - s_{i+1}` of the
    descending singular values `svals [D]` of the score Jacobian at noise `sigma`. Normal
    directions have values of order `1 / sigma^2`, tangent ones of order 1: if all are at
    least `1 / sigma` (between the two), `i* = D` (dimension 0); if none is, `i* = 0`
    (dimension D). `max_rank` limits `i*` to the top values."""
    s = np.sort(np.asarray(svals, np.float64))[::-1]
    normal = 1.0 / sigma
    if s[-1] >= normal:
        return 0
    if s[0] < normal:
        return len(s)
    gaps = s[:-1] - s[1:]
    if max_rank is not None:
        gaps = gaps[:max_rank]
    return int(len(s) - (int(np.argmax(gaps)) + 1))


def spectra(
    score: ScoreFn,
    xs: np.ndarray,
    *,
    conds: np.ndarray | None = None,
    sigma: float = 1e-2,
    chunk: int | None = None,
) -> np.ndarray:
    """Descending singular values `[N, D]` of the score Jacobian at each sample of
    `xs [N, ...]` (labels `conds [N]` or None), at `t = 1 - sigma`. One compiled Jacobian
    program for all samples; one SVD per sample on the host."""
    return spectra_across(score, xs, conds=conds, sigmas=[sigma], chunk=chunk)[0]


def spectra_across(
    score: ScoreFn,
    xs: np.ndarray,
    *,
    conds: np.ndarray | None = None,
    sigmas,
    chunk: int | None = None,
) -> np.ndarray:
    """`spectra` at each noise level of `sigmas` -> `[S, N, D]`: the same samples, the
    Jacobian program compiled once (the time is an argument of it)."""
    sigmas = [float(s) for s in sigmas]
    bad = [s for s in sigmas if not 0.0 < s < 1.0]
    if bad or not sigmas:
        raise UserError(f"effective dimension needs noise 0 < sigma < 1, got {bad or sigmas}")
    jac = jax.jit(lambda x, c, t: score_jacobian(score, x, t, cond=c, chunk=chunk))
    xs = np.asarray(xs, np.float32)
    out = np.empty((len(sigmas), len(xs), int(np.prod(xs.shape[1:]))), np.float64)
    for k, sigma in enumerate(sigmas):
        t = jnp.float32(1.0 - sigma)
        for i, x in enumerate(xs):
            c = None if conds is None else jnp.asarray(conds[i : i + 1])
            j = np.asarray(jax.device_get(jac(jnp.asarray(x), c, t)), np.float64)
            out[k, i] = np.linalg.svd(j, compute_uv=False)
    return out


def effective_dimensions(
    svals: np.ndarray, max_rank: int | None = None, *, sigma: float
) -> np.ndarray:
    """Per-sample effective dimensions `[N]` from spectra `[N, D]` at noise `sigma`."""
    return np.array([effective_dimension(s, max_rank, sigma=sigma) for s in svals], np.int64)


def plot_spectra(
    svals: np.ndarray, path: str, *, dims: np.ndarray | None = None, title: str = ""
) -> None:
    """PNG of the spectra `[N, D]` (log scale, one line per sample) and, with `dims`, the
    histogram of effective dimensions; a dashed line marks each sample's gap."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    svals = np.atleast_2d(svals)
    d = svals.shape[1]
    panels = 2 if dims is not None else 1
    fig = Figure(figsize=(5.5 * panels, 4), dpi=100)
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0, 0]
    rank = np.arange(1, d + 1)
    for i, s in enumerate(svals):
        (line,) = ax.semilogy(rank, np.maximum(s, 1e-12), lw=1, alpha=0.7)
        if dims is not None:
            ax.axvline(d - dims[i] + 0.5, color=line.get_color(), ls="--", lw=0.8, alpha=0.7)
    ax.set(xlabel="rank i", ylabel="singular value $s_i$ of d score / dx", title=title)
    if dims is not None:
        h = axes[0, 1]
        h.hist(dims, bins=min(30, max(1, len(np.unique(dims)))))
        h.set(xlabel="effective dimension D - i*", ylabel="samples", title=f"D = {d}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def report(svals: np.ndarray, max_rank: int | None = None, *, sigma: float) -> dict:
    """Summary numbers of spectra `[N, D]` at noise `sigma`: effective dimension mean /
    median / min / max and the per-sample values."""
    dims = effective_dimensions(svals, max_rank, sigma=sigma)
    return {
        "effdim_mean": float(dims.mean()),
        "effdim_median": float(np.median(dims)),
        "effdim_min": int(dims.min()),
        "effdim_max": int(dims.max()),
        "effdim_ambient": int(svals.shape[1]),
        "effdim_per_sample": dims.tolist(),
    }


def _as_float(xs) -> np.ndarray:
    """Samples as float32; uint8 images mapped to [-1, 1]."""
    xs = np.asarray(xs)
    return xs.astype(np.float32) / 127.5 - 1.0 if xs.dtype == np.uint8 else xs.astype(np.float32)


def evaluate(
    score: ScoreFn,
    xs: np.ndarray,
    *,
    conds: np.ndarray | None = None,
    sigma: float = 1e-2,
    chunk: int | None = None,
    plot_path: str | None = None,
) -> dict:
    """`report` of the spectra at samples `xs [N, ...]` (uint8 images are mapped to
    [-1, 1]), with the spectrum plot at `plot_path` (its path under `effdim_plot`)."""
    conds = None if conds is None else np.asarray(conds, np.int32)
    svals = spectra(score, _as_float(xs), conds=conds, sigma=sigma, chunk=chunk)
    out = report(svals, sigma=sigma)
    if plot_path:
        dims = np.asarray(out["effdim_per_sample"])
        plot_spectra(svals, plot_path, dims=dims, title=f"score Jacobian, sigma = {sigma:g}")
        out["effdim_plot"] = plot_path
    return out


def evaluate_across(
    score: ScoreFn,
    xs: np.ndarray,
    *,
    conds: np.ndarray | None = None,
    sigmas,
    chunk: int | None = None,
    plot_path: str | None = None,
) -> dict:
    """The effective dimension of the same samples at each noise level of `sigmas`
    (ascending): `effdim_sigmas`, and per level (lists in that order) the mean, median, min
    and max and the per-sample values (`effdim_per_sample_by_sigma [S][N]`), and the median
    spectrum scaled by `sigma^2` (`effdim_median_spectrum_by_sigma [S][D]`: normal
    directions near 1 at every level, so the levels share one axis). With `plot_path`, the
    dimensions against sigma and those spectra (`plot_across`)."""
    sigmas = sorted(float(s) for s in sigmas)
    conds = None if conds is None else np.asarray(conds, np.int32)
    svals = spectra_across(score, _as_float(xs), conds=conds, sigmas=sigmas, chunk=chunk)
    dims = np.stack([effective_dimensions(s, sigma=sg) for s, sg in zip(svals, sigmas)])
    scaled = np.median(svals, axis=1) * np.square(sigmas)[:, None]
    out = {
        "effdim_sigmas": sigmas,
        "effdim_mean_by_sigma": dims.mean(axis=1).tolist(),
        "effdim_median_by_sigma": np.median(dims, axis=1).tolist(),
        "effdim_min_by_sigma": dims.min(axis=1).tolist(),
        "effdim_max_by_sigma": dims.max(axis=1).tolist(),
        "effdim_ambient": int(svals.shape[-1]),
        "effdim_per_sample_by_sigma": dims.tolist(),
        "effdim_median_spectrum_by_sigma": scaled.tolist(),
    }
    if plot_path:
        plot_across(sigmas, dims, scaled, plot_path)
        out["effdim_plot"] = plot_path
    return out


def plot_across(sigmas, dims: np.ndarray, scaled: np.ndarray, path: str) -> None:
    """PNG: per-sample effective dimension `dims [S, N]` against sigma (thin lines, the
    median bold), and the median spectra scaled by sigma^2 `scaled [S, D]`, one per level."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    left, right = fig.subplots(1, 2)
    left.semilogx(sigmas, dims, color="0.6", lw=0.6, alpha=0.6)
    left.semilogx(sigmas, np.median(dims, axis=1), "o-", color="C3", lw=2, label="median")
    left.set(xlabel="noise sigma (t = 1 - sigma)", ylabel="effective dimension",
             title=f"per sample (N = {dims.shape[1]}), D = {scaled.shape[1]}")  # fmt: skip
    left.legend()
    rank = np.arange(1, scaled.shape[1] + 1)
    for sigma, s in zip(sigmas, scaled):
        right.semilogy(rank, np.maximum(s, 1e-12), lw=1.2, label=f"sigma = {sigma:g}")
    right.set(xlabel="rank i", ylabel="median $s_i \\cdot \\sigma^2$",
              title="score Jacobian spectra (normal directions near 1)")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
