"""Geolocation metrics on the Earth and a world-map plot of samples on S².

- `geo_metrics(pred, true)`: great-circle error in km (R = 6371 km), accuracy within
  1 / 25 / 200 / 750 / 2500 km (street / city / region / country / continent), and GeoScore
  `5000 exp(-d / 1492.7 km)` (the GeoGuessr-style score used by OSV-5M and
  arXiv 2412.06781), averaged over examples.
- `plot_world_samples(path, samples)`: an equirectangular (longitude × latitude) scatter
  over Natural Earth's 1:110m coastlines (public domain; `metrics/data/land_110m.npz`, made
  by `scripts.make_coastlines`, 37 kB in the repository: nothing is downloaded) and a 30°
  graticule.
"""

import os

import jax.numpy as jnp
import numpy as np

from core.errors import UserError
from manifolds.sphere import EARTH_RADIUS_KM, check_unit_vectors, great_circle_km, xyz_to_latlon

COASTLINES = os.path.join(os.path.dirname(__file__), "data", "land_110m.npz")
ACCURACY_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7


def geoscore(distance_km: np.ndarray) -> np.ndarray:
    """`5000 exp(-d / 1492.7)` per example (5000 at d = 0)."""
    return GEOSCORE_MAX * np.exp(-np.asarray(distance_km) / GEOSCORE_SCALE_KM)


def geo_metrics(
    pred: np.ndarray, true: np.ndarray, radius_km: float = EARTH_RADIUS_KM
) -> dict[str, float]:
    """Metrics of predicted vs true unit vectors `[N, 3]`.

    Returns `error_km_mean`, `error_km_median`, `acc_{t}km` for t in `ACCURACY_KM` (fraction
    with error <= t), and `geoscore` (mean).
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[-1] != 3:
        raise UserError(f"geo_metrics needs pred and true [N, 3], got {pred.shape}, {true.shape}")
    check_unit_vectors(pred, "geo_metrics: predictions")
    check_unit_vectors(true, "geo_metrics: true locations")
    d = np.asarray(
        great_circle_km(jnp.asarray(pred, jnp.float32), jnp.asarray(true, jnp.float32), radius_km),
        np.float64,
    )
    out = {"error_km_mean": float(d.mean()), "error_km_median": float(np.median(d))}
    for t in ACCURACY_KM:
        out[f"acc_{t:g}km"] = float(np.mean(d <= t))
    out["geoscore"] = float(geoscore(d).mean())
    return out


def plot_world_samples(
    path: str,
    samples: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    title: str | None = None,
    max_points: int = 20_000,
) -> str:
    """Scatter unit vectors `[N, 3]` on an equirectangular world map; writes a PNG at `path`.

    Samples are small translucent red dots; `reference` (e.g. the test data) is drawn on
    top of them as black rings, so that both stay visible. Returns `path`.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(10, 5.2), dpi=120)
    ax = fig.subplots()
    with np.load(COASTLINES) as f:
        coast = f["lonlat"]
    ax.plot(coast[:, 0], coast[:, 1], color="0.45", lw=0.5, zorder=1)
    # samples: small translucent dots; the data on top: rings (sizes for many / few points)
    layers = [(samples, dict(c="tab:red", alpha=0.5, lw=0), (1.5, 4.0), "samples")]
    if reference is not None:
        rings = dict(facecolors="none", edgecolors="k", lw=0.5)
        layers.append((reference, rings, (6.0, 12.0), "data"))
    for z, (pts, style, sizes, label) in enumerate(layers, start=2):
        xyz = jnp.asarray(np.asarray(pts)[:max_points], jnp.float32)
        latlon = np.asarray(xyz_to_latlon(xyz))
        size = sizes[0] if latlon.shape[0] > 5000 else sizes[1]
        ax.scatter(latlon[:, 1], latlon[:, 0], s=size, label=label, rasterized=True, zorder=z,
                   **style)  # fmt: skip
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(-180, 181, 30))
    ax.set_yticks(np.arange(-90, 91, 30))
    ax.grid(True, color="0.85", lw=0.6)
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    if reference is not None:
        ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
