"""Data on the sphere S²: the Earth event datasets and von Mises-Fisher mixtures.

Earth events (volcano 827, earthquake 6,120, flood 4,875, fire 12,809 points; see
`../shared/data/README.md`) are read from `data_dir`, else `$DRIFTLAB_EARTH_DIR`, else
`<repo>/../shared/data/earth`, and converted from latitude/longitude to unit xyz.

Splits follow the Riemannian flow-matching code (facebookresearch/riemannian-fm,
`manifm/datasets.py`): one seeded random permutation, `N // 10` validation and `N // 10` test
points, the remaining ~80% train. The permutation is NumPy's (`default_rng(seed)`), so the
exact members differ from the PyTorch generator's; sizes and fractions agree.

A source has `num_examples`, `example_shape`, `num_classes = 0` and
`__getitems__(indices) -> {"x": float32 [n, 3]}`.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import UserError, lookup
from manifolds.sphere import EARTH_RADIUS_KM, latlon_to_xyz, normalize, to_tangent

EARTH_FILES = {
    "volcano": "volerup.csv",
    "earthquake": "quakes_all.csv",
    "flood": "flood.csv",
    "fire": "fire.csv",
}
SPLITS = ("train", "val", "test")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def earth_dir(data_dir: str | None = None) -> str:
    """The folder holding the Earth CSVs (argument, `$DRIFTLAB_EARTH_DIR`, or shared/)."""
    if data_dir is not None:
        return data_dir
    default = os.path.join(os.path.dirname(_REPO), "shared", "data", "earth")
    return os.environ.get("DRIFTLAB_EARTH_DIR", default)


def load_earth_latlon(name: str, data_dir: str | None = None) -> np.ndarray:
    """The events of dataset `name` as float64 `[N, 2]` (latitude, longitude in degrees)."""
    path = os.path.join(earth_dir(data_dir), lookup(EARTH_FILES, name, "Earth dataset"))
    if not os.path.isfile(path):
        raise UserError(
            f"Earth dataset {name!r}: {path} not found (set DRIFTLAB_EARTH_DIR or pass data_dir)"
        )
    rows, header = [], None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(",")
            try:
                rows.append([float(fields[0]), float(fields[1])])
            except (ValueError, IndexError):
                if rows or header is not None:
                    raise UserError(
                        f"Earth dataset {name!r}: {path} line {number} is not "
                        f"'latitude,longitude': {line[:60]!r}"
                    ) from None
                header = line  # one column-name line is allowed before the data
    latlon = np.asarray(rows, np.float64).reshape(-1, 2)
    ok = (
        np.isfinite(latlon).all()
        and (np.abs(latlon[:, 0]) <= 90).all()
        and (np.abs(latlon[:, 1]) <= 360).all()
    )
    if latlon.shape[0] == 0 or not ok:
        raise UserError(
            f"Earth dataset {name!r}: {path} has no rows, or a non-finite or "
            "out-of-range latitude/longitude"
        )
    return latlon


def split_indices(num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random split: `N // 10` val, `N // 10` test, the rest train (sorted indices)."""
    perm = np.random.default_rng(seed).permutation(num)
    n_held = num // 10
    parts = {"train": perm[2 * n_held :], "val": perm[:n_held], "test": perm[n_held : 2 * n_held]}
    return {k: np.sort(v) for k, v in parts.items()}


def nearest_train_km(
    latlon: np.ndarray, seed: int = 0, split: str = "test", chunk: int = 1024
) -> np.ndarray:
    """Great-circle distance (km) from each point of `split` to its nearest train point.

    In float64 throughout (an arccos of float32 dot products cannot resolve a distance
    below about 2 km; of float64 ones, about 0.1 m), chunked over the held-out points. How
    close held-out events sit to training events says what a test NLL rewards: an exact
    repeat of a training event is scored higher the sharper the density there, however
    sharp.
    """
    if split not in SPLITS or split == "train":
        raise UserError(f"nearest_train_km: split must be 'val' or 'test', got {split!r}")
    lat, lon = np.deg2rad(latlon[:, 0]), np.deg2rad(latlon[:, 1])
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)
    parts = split_indices(latlon.shape[0], seed)
    train, held = xyz[parts["train"]], xyz[parts[split]]
    out = []
    for s in range(0, held.shape[0], chunk):
        out.append(np.arccos(np.clip((held[s : s + chunk] @ train.T).max(1), -1.0, 1.0)))
    return np.concatenate(out) * EARTH_RADIUS_KM


class EarthSource:
    """One split of an Earth dataset as unit vectors; random access for the data pipeline."""

    num_classes = 0
    example_shape = (3,)

    def __init__(
        self, name: str, split: str = "train", *, seed: int = 0, data_dir: str | None = None
    ):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        latlon = load_earth_latlon(name, data_dir)
        self.name, self.split = name, split
        self.latlon = latlon[split_indices(latlon.shape[0], seed)[split]]
        self.xyz = np.asarray(latlon_to_xyz(self.latlon), np.float32)
        self.num_examples = self.xyz.shape[0]

    def __len__(self) -> int:
        return self.num_examples

    def __getitems__(self, indices) -> dict[str, np.ndarray]:
        return {"x": self.xyz[np.asarray(indices, np.int64)]}


def sample_vmf(
    key: jax.Array, mu: jax.Array, kappa: jax.Array | float, shape: tuple[int, ...] = ()
) -> jax.Array:
    """Exact von Mises-Fisher samples on S², `[*shape, 3]`, around unit `mu` `[..., 3]`.

    Inverse CDF of `w = <mu, x>` (density ∝ exp(κ w) on [-1, 1]):
    `w = 1 + log(u + (1 - u) e^{-2κ}) / κ`, then a uniform direction orthogonal to `mu`.
    `mu` and `kappa > 0` broadcast against `shape`.
    """
    if mu.shape[-1] != 3:
        raise ValueError(f"sample_vmf is exact on S² only (mu [..., 3]), got {mu.shape}")
    key_w, key_dir = jax.random.split(key)
    mu = jnp.broadcast_to(mu, (*shape, 3))
    kappa = jnp.broadcast_to(jnp.asarray(kappa, mu.dtype), shape)
    u = jax.random.uniform(key_w, shape, mu.dtype, minval=1e-12, maxval=1.0)
    w = 1.0 + jnp.logaddexp(jnp.log(u), jnp.log1p(-u) - 2.0 * kappa) / kappa
    w = jnp.clip(w, -1.0, 1.0)[..., None]
    d = to_tangent(mu, jax.random.normal(key_dir, (*shape, 3), mu.dtype))
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    return normalize(w * mu + jnp.sqrt(1.0 - w * w) * d)  # fixes f32 drift of <mu, d>


def vmf_log_prob(x: jax.Array, mu: jax.Array, kappa: jax.Array | float) -> jax.Array:
    """vMF log-density on S² w.r.t. area: `log(κ / (2π (1 - e^{-2κ}))) + κ(<mu, x> - 1)`.

    `x`, `mu` `[..., 3]` and `kappa` `[...]` (or scalars) of matching ranks; `-> [...]`.
    """
    kappa = jnp.asarray(kappa, x.dtype)
    log_c = jnp.log(kappa) - jnp.log(2 * jnp.pi) - jnp.log(-jnp.expm1(-2.0 * kappa))
    return log_c + kappa * (jnp.sum(x * mu, axis=-1) - 1.0)


@dataclasses.dataclass(frozen=True)
class VMFMixture:
    """A mixture of vMF components on S²: means `[K, 3]` (unit), kappas `[K]`, weights `[K]`."""

    means: jax.Array
    kappas: jax.Array
    weights: jax.Array

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """`[n, 3]` exact samples."""
        key_k, key_x = jax.random.split(key)
        k = jax.random.choice(key_k, self.weights.shape[0], (n,), p=self.weights)
        return sample_vmf(key_x, self.means[k], self.kappas[k], (n,))

    def log_prob(self, x: jax.Array) -> jax.Array:
        """Exact log-density `[..., 3] -> [...]` w.r.t. the area measure."""
        lead = (1,) * (x.ndim - 1)
        means = self.means.reshape(*lead, *self.means.shape)  # [1.., K, 3]
        kappas = self.kappas.reshape(*lead, -1)
        comps = vmf_log_prob(x[..., None, :], means, kappas)  # [..., K]
        return jax.nn.logsumexp(comps + jnp.log(self.weights).reshape(*lead, -1), axis=-1)


def random_vmf_mixture(key: jax.Array, num_components: int = 4, kappa: float = 20.0) -> VMFMixture:
    """Uniformly placed means, one `kappa` for all, equal weights."""
    means = jax.random.normal(key, (num_components, 3))
    means = means / jnp.linalg.norm(means, axis=-1, keepdims=True)
    k = jnp.full((num_components,), kappa)
    return VMFMixture(means, k, jnp.full((num_components,), 1.0 / num_components))


class VMFMixtureSource:
    """`num_examples` fixed samples of a seeded random vMF mixture, as a data source.

    The mixture is fixed by `seed`; each split (`train`, `val`, `test`) is its own i.i.d.
    draw of `num_examples` points from it (so held-out NLL is against fresh points, and
    `mixture.log_prob` gives the exact NLL a perfect model would reach)."""

    num_classes = 0
    example_shape = (3,)

    def __init__(
        self,
        split: str = "train",
        *,
        num_examples: int = 10_000,
        num_components: int = 4,
        kappa: float = 20.0,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        key_mix, key_x = jax.random.split(jax.random.key(seed))
        self.mixture = random_vmf_mixture(key_mix, num_components, kappa)
        key_split = jax.random.fold_in(key_x, SPLITS.index(split))
        self.xyz = np.asarray(self.mixture.sample(key_split, num_examples), np.float32)
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitems__(self, indices) -> dict[str, np.ndarray]:
        return {"x": self.xyz[np.asarray(indices, np.int64)]}


class GeolocSource(EarthSource):
    """A synthetic geolocation task on an Earth dataset: predict where from an embedding.

    The condition of each event is a noisy location embedding standing in for an image
    embedding (the setting of "Around the World in 80 Timesteps", arXiv 2412.06781, whose
    embeddings come from images): random Fourier features of the true point,
    `[cos(B x), sin(B x)] / sqrt(E/2)` with `B ~ N(0, bandwidth²)` fixed by `feature_seed`,
    plus Gaussian noise of std `noise` drawn once per event (so the task is ambiguous and a
    model must represent a posterior over places). Splits as `EarthSource`; every split
    shares the same features `B`. Batches: `{"x": [n, 3], "cond": float32 [n, embed_dim]}`.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        dataset: str = "earthquake",
        embed_dim: int = 64,
        bandwidth: float = 4.0,
        noise: float = 0.3,
        feature_seed: int = 0,
        seed: int = 0,
        data_dir: str | None = None,
    ):
        super().__init__(dataset, split, seed=seed, data_dir=data_dir)
        if embed_dim < 2 or embed_dim % 2:
            raise UserError(f"embed_dim must be an even number >= 2, got {embed_dim}")
        rng = np.random.default_rng(feature_seed)
        freqs = rng.normal(0.0, bandwidth, (embed_dim // 2, 3))
        phase = self.xyz.astype(np.float64) @ freqs.T
        features = np.concatenate([np.cos(phase), np.sin(phase)], 1) / np.sqrt(embed_dim / 2)
        split_rng = np.random.default_rng((feature_seed, SPLITS.index(split) + 1))
        noisy = features + noise / np.sqrt(embed_dim) * split_rng.standard_normal(features.shape)
        self.cond = noisy.astype(np.float32)
        self.cond_dim = embed_dim

    def __getitems__(self, indices) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        return {"x": self.xyz[idx], "cond": self.cond[idx]}
