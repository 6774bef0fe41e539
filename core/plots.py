"""PNG pictures of samples: image grids, and 2-D scatter plots beside the data."""

import math
import os

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images_uint8: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] uint8 grid."""
    n, h, w, c = images_uint8.shape
    if c == 1:
        images_uint8 = np.repeat(images_uint8, 3, axis=-1)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images_uint8):
        r, q = divmod(i, ncols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = img
    return grid


def save_image_grid(images: np.ndarray, path: str, ncols: int | None = None) -> np.ndarray:
    """Save images in [-1, 1] (float) or uint8 as a PNG grid; returns the grid."""
    images = images if images.dtype == np.uint8 else to_uint8(images)
    grid = image_grid(images, ncols)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def save_scatter(
    samples: np.ndarray, data: np.ndarray | None, path: str, title: str = ""
) -> np.ndarray:
    """Two panels, data and samples, on the same axes; returns the PNG as an array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    panels = [("data", data), ("samples", samples)] if data is not None else [("samples", samples)]
    fig = Figure(figsize=(4 * len(panels), 4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    both = np.concatenate([p for _, p in panels if p is not None])[:, :2]
    lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    margin = 0.1 * (hi - lo)
    for ax, (name, pts) in zip(axes[0], panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set(
            title=f"{name} {title}".strip(),
            xlim=(lo[0] - margin[0], hi[0] + margin[0]),
            ylim=(lo[1] - margin[1], hi[1] + margin[1]),
            aspect="equal",
        )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _grid(x: np.ndarray, reference, path: str, title: str = "") -> np.ndarray:
    return save_image_grid(x, path)


def _world_map(x: np.ndarray, reference, path: str, title: str = "") -> np.ndarray:
    from metrics.geo import plot_world_samples

    plot_world_samples(path, x, reference=reference, title=title or None)
    return np.asarray(Image.open(path).convert("RGB"))


# name -> fn(samples, reference_data_or_None, path, title) -> picture (HWC uint8)
PLOTS = {"grid": _grid, "scatter": save_scatter, "world_map": _world_map}
