"""Lost dimensions: which directions of a linear manifold with variance blocks a score keeps,
across noise levels sigma and training-set sizes N (Achilli et al. 2024, "Losing
dimensions: geometric memorization in generative diffusion", arXiv 2410.08727).

Everything here is in the variance-exploding form of the noisy data, `x = y + sigma eps`
(the flows' `x_t = t y + (1 - t) eps` is that scaled by `t = 1 / (1 + sigma)`, see
`network_jacobian`).

**Empirical score.** The score of the training set's noisy mixture
`p(x) = (1/N) sum_i N(x; y_i, sigma^2 I)` — what a network that fits its training set
exactly learns — is `s(x) = (sum_i w_i y_i - x) / sigma^2` with softmax weights
`w_i ∝ exp(-|x - y_i|^2 / (2 sigma^2))`, and its Jacobian is

    J = -I / sigma^2 + Cov_w(y) / sigma^4,

`Cov_w` the covariance of the training points under the weights. No training needed.

**Retained dimensions per block.** Along a direction `u`, `-u^T J u = (1 - c) / sigma^2`
where `c = u^T Cov_w u / sigma^2`: `c = 0` is a normal direction (the score pulls straight
back, as off the manifold or onto a single memorized point), and the population score of
a Gaussian direction of variance `v` has `c = v / (v + sigma^2)`. A direction is *retained*
when `c > 1/2` (the denoiser's posterior spread along it is more than half the noise's;
for the population: `v > sigma^2`). Per block `b` with basis `U_b`, the retained count is
the number of eigenvalues of `U_b^T (-J) U_b` below `1 / (2 sigma^2)`. Summed over blocks
it is the effective dimension of the manifold at that point; off-manifold directions have
`c = 0` exactly for the empirical score (the training points lie in the subspace).
Evaluated at fresh test points `y + sigma eps` (not training points), averaged.

**Variance kept per block.** The count depends on where the population sits against the
threshold (a block with `v` near `sigma^2` is lost at the slightest shrinkage), so blocks
of different variance are compared by a threshold-free number too: the block's mean
`c` over its directions divided by the population's `v_b / (v_b + sigma^2)` (1: the score
varies along the block as the data distribution does; 0: the block is frozen, as on one
memorized point).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from data.linear_blocks import LinearBlocks


def empirical_log_density(x: jax.Array, train: jax.Array, sigma: float) -> jax.Array:
    """`log p(x)` of `(1/N) sum_i N(x; y_i, sigma^2 I)` at `x [..., D]`, `train [N, D]`."""
    d = train.shape[-1]
    sq = jnp.sum((x[..., None, :] - train) ** 2, axis=-1)
    log_norm = jnp.log(train.shape[0]) + 0.5 * d * jnp.log(2 * jnp.pi * sigma**2)
    return jax.nn.logsumexp(-sq / (2 * sigma**2), axis=-1) - log_norm


def _weights(x, train, sigma):
    sq = jnp.sum((x[..., None, :] - train) ** 2, axis=-1)
    return jax.nn.softmax(-sq / (2 * sigma**2), axis=-1)


def empirical_score(x: jax.Array, train: jax.Array, sigma: float) -> jax.Array:
    """`grad log p(x)` of the training set's noisy mixture, `[..., D]`."""
    w = _weights(x, train, sigma)
    return (w @ train - x) / sigma**2


def empirical_jacobian(x: jax.Array, train: jax.Array, sigma: float) -> jax.Array:
    """`d score / dx` at one point `x [D]`: `-I / sigma^2 + Cov_w(y) / sigma^4`, `[D, D]`."""
    w = _weights(x, train, sigma)
    mean = w @ train
    centred = train - mean[None, :]
    cov = (centred * w[:, None]).T @ centred
    return -jnp.eye(x.shape[-1], dtype=x.dtype) / sigma**2 + cov / sigma**4


def network_jacobian(score, x: jax.Array, sigma: float, cond=None) -> jax.Array:
    """The variance-exploding score Jacobian at `x [D]` and noise `sigma` of a flow's score
    `score(x_t [1, D], t [1], cond)` (`metrics.effective_dimension.score_view`): at
    `t = 1 / (1 + sigma)`, `x_t = t x` and `J_VE(x) = t^2 J_t(t x)`."""
    t = 1.0 / (1.0 + sigma)
    tb = jnp.full((1,), t, x.dtype)
    flat = lambda v: score(v[None], tb, cond)[0]
    return t**2 * jax.jacfwd(flat)(t * x)


def retained_per_block(jac: np.ndarray, bases: list[np.ndarray], sigma: float) -> np.ndarray:
    """`[B]` retained directions of each block (see the module doc) from one Jacobian."""
    return np.array([int(np.sum(c > 0.5)) for c in _spreads(jac, bases, sigma)], np.int64)


def kept_per_block(
    jac: np.ndarray, bases: list[np.ndarray], sigma: float, variances
) -> np.ndarray:
    """`[B]` variance kept by each block (see the module doc) from one Jacobian."""
    return np.array(
        [np.mean(c) / (v / (v + sigma**2)) for c, v in zip(_spreads(jac, bases, sigma),
                                                          variances, strict=True)]
    )  # fmt: skip


def _spreads(jac: np.ndarray, bases: list[np.ndarray], sigma: float) -> list[np.ndarray]:
    """Per block, `c = 1 - sigma^2 mu` for the eigenvalues `mu` of `U_b^T (-J) U_b`."""
    jac = np.asarray(jac, np.float64)
    sym = -0.5 * (jac + jac.T)  # a trained network's Jacobian is symmetric only nearly
    return [1.0 - sigma**2 * np.linalg.eigvalsh(u.T @ sym @ u) for u in bases]


def _block_means(spec: LinearBlocks, jacs: np.ndarray, sigma: float) -> np.ndarray:
    """`[2, B]`: mean retained directions and mean variance kept per block."""
    bases = spec.block_bases()
    retained = np.mean([retained_per_block(j, bases, sigma) for j in jacs], axis=0)
    kept = np.mean([kept_per_block(j, bases, sigma, spec.block_vars) for j in jacs], axis=0)
    return np.stack([retained, kept])


def noisy_points(spec: LinearBlocks, n: int, sigma: float, seed: int) -> np.ndarray:
    """`n` fresh points of the distribution with noise `sigma`, `[n, D]`."""
    rng = np.random.default_rng((seed, 7))
    y = spec.sample(n, rng)
    return (y + sigma * rng.standard_normal(y.shape)).astype(np.float32)


def empirical_retained(
    spec: LinearBlocks, train: np.ndarray, sigma: float, points: np.ndarray
) -> np.ndarray:
    """`[2, B]`: mean retained directions and variance kept per block of the empirical
    score of `train` at `points`."""
    jac = jax.jit(jax.vmap(lambda x: empirical_jacobian(x, jnp.asarray(train), sigma)))
    return _block_means(spec, np.asarray(jax.device_get(jac(jnp.asarray(points)))), sigma)


def network_retained(
    spec: LinearBlocks, score, sigma: float, points: np.ndarray
) -> np.ndarray:
    """`[2, B]`: mean retained directions and variance kept per block of a network's score
    (see `network_jacobian`) at `points`."""
    jac = jax.jit(jax.vmap(lambda x: network_jacobian(score, x, sigma)))
    return _block_means(spec, np.asarray(jax.device_get(jac(jnp.asarray(points)))), sigma)


@dataclasses.dataclass
class Study:
    """Retained directions and variance kept per block on a grid of training-set sizes and
    noise levels: `retained[source][i_N][i_sigma] = [per block]` (and `kept[...]`) at the
    sizes `sizes[source]`, for each source (`empirical`, and trained networks)."""

    spec: LinearBlocks
    sizes: dict[str, list[int]]
    sigmas: list[float]
    retained: dict[str, list[list[list[float]]]]
    kept: dict[str, list[list[list[float]]]]

    def add(self, source: str, sizes: list[int], table: list[list[np.ndarray]]) -> None:
        """Add `table[i_N][i_sigma] = [2, B]` (retained, kept) of `source`."""
        self.sizes[source] = list(sizes)
        self.retained[source] = [[cell[0].tolist() for cell in row] for row in table]
        self.kept[source] = [[cell[1].tolist() for cell in row] for row in table]

    def to_json(self) -> dict:
        return {
            "spec": dataclasses.asdict(self.spec),
            "sizes": self.sizes,
            "sigmas": self.sigmas,
            "retained": self.retained,
            "kept": self.kept,
            "rule": "retained: eigenvalues of U_b^T (-J) U_b below 1 / (2 sigma^2); kept: "
            "mean of 1 - sigma^2 mu over the block / (v_b / (v_b + sigma^2))",
        }


def empirical_study(
    spec: LinearBlocks,
    sizes: list[int],
    sigmas: list[float],
    *,
    num_points: int = 64,
    seed: int = 0,
) -> Study:
    """The empirical score's retained directions on the grid `sizes x sigmas` (training
    sets: the first N points of one draw, so they are nested)."""
    pool = spec.sample(max(sizes), np.random.default_rng((seed, 0)))
    table = [
        [empirical_retained(spec, pool[:n], s, noisy_points(spec, num_points, s, seed))
         for s in sigmas]
        for n in sizes
    ]  # fmt: skip
    study = Study(spec, {}, list(sigmas), {}, {})
    study.add("empirical", sizes, table)
    return study


def plot_study(study: Study, path: str) -> None:
    """Per source, two panels (retained directions, variance kept) of each block against
    N, a line per sigma (solid: the highest-variance block; dashed, dotted: the next)."""
    from matplotlib.figure import Figure

    panels = [(source, what) for source in study.retained for what in ("retained", "kept")]
    fig = Figure(figsize=(5.5 * len(panels), 4.2), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    order = np.argsort(study.spec.block_vars)[::-1]
    styles = ["-", "--", ":", "-."]
    for ax, (source, what) in zip(axes, panels, strict=True):
        table = np.asarray(getattr(study, what)[source])  # [N, sigma, block]
        for j, sigma in enumerate(study.sigmas):
            color = f"C{j}"
            for rank, b in enumerate(order):
                label = f"sigma={sigma:g}" if rank == 0 else None
                ax.semilogx(
                    study.sizes[source], table[:, j, b], styles[rank % 4], color=color, label=label,
                    marker="o", ms=3,
                )  # fmt: skip
        blocks = ", ".join(
            f"{styles[r % 4]} var {study.spec.block_vars[b]:g} ({study.spec.block_dims[b]}d)"
            for r, b in enumerate(order)
        )
        ylabel = "retained directions" if what == "retained" else "variance kept (1: population)"
        ax.set(xlabel="training-set size N", ylabel=ylabel, title=f"{source}: {blocks}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def write_study(study: Study, json_path: str, png_path: str | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(study.to_json(), f, indent=1)
    if png_path:
        plot_study(study, png_path)


def network_study(workdirs: dict[int, str], sigmas: list[float], *, num_points: int = 64,
                  seed: int = 0) -> tuple[LinearBlocks, list]:  # fmt: skip
    """(the runs' distribution, `[i_N][i_sigma] -> [2, B]` retained and kept) of the
    networks of flow-matching runs trained on `linear_blocks`, one per training-set size
    N (`workdirs`: N -> run directory, all of one distribution), at the same test points
    as `empirical_study`."""
    from core import runs, sharding
    from core.errors import UserError
    from core.evaluation.evaluator import RunNetwork

    mesh = sharding.make_mesh()
    spec, table = None, []  # [i_N][i_sigma] -> [2, B]
    for n, workdir in sorted(workdirs.items()):
        run = runs.restore_run(workdir, mesh)
        data = run.experiment.data
        if data.name != "linear_blocks":
            raise UserError(f"{workdir} was trained on {data.name!r}, not linear_blocks")
        source = data.source()
        if source.num_examples != n or (spec is not None and source.spec != spec):
            raise UserError(
                f"{workdir}: {source.num_examples} points of {source.spec}; expected {n} "
                f"points of {spec or source.spec}"
            )
        spec = source.spec
        net = RunNetwork(run.graphdef, run.params, run.experiment).module()
        score = run.experiment.method.score_view(net)
        row = []
        for sigma in sigmas:
            pts = noisy_points(spec, num_points, sigma, seed)
            row.append(network_retained(spec, score, sigma, pts))
        table.append(row)
    return spec, table
