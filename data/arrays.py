"""A `Source` over arrays in an `.npz` file (ADM's sample format, or `x`/`y`).

Layouts read: `arr_0` data and optional `arr_1` labels (what ADM's and our samplers write),
or `x` and optional `y`. Data is `uint8` images `[N, H, W, C]` (scaled to [-1, 1] per
batch, kept as uint8 in memory), or float `[N, H, W, C]` / `[N, D]` kept as float32.
"""

import os
import zipfile

import numpy as np

from core.errors import UserError

LAYOUTS = (("arr_0", "arr_1"), ("x", "y"))


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1]; float data -> float32 unchanged."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    return x.astype(np.float32, copy=False)


def require_file(path: str) -> str:
    """`path`, or one error line when no such file exists."""
    if not os.path.isfile(path):
        raise UserError(f"npz file {path!r} not found")
    return path


def _read(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(data, labels or None) from the first layout the file holds."""
    require_file(path)
    try:
        with np.load(path) as f:
            for data_key, label_key in LAYOUTS:
                if data_key in f.files:
                    labels = f[label_key] if label_key in f.files else None
                    return f[data_key], labels
            found = ", ".join(f.files) or "none"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot read {path!r} as an .npz file: {e}") from e
    raise UserError(f"{path!r} holds neither arr_0 nor x (keys found: {found})")


def _check_data(x: np.ndarray, path: str) -> np.ndarray:
    if x.dtype == np.uint8 and x.ndim == 4:
        return x
    if np.issubdtype(x.dtype, np.floating) and x.ndim in (2, 4):
        if not np.isfinite(x).all():
            raise UserError(f"{path!r}: the data holds NaN or infinite values")
        return x.astype(np.float32, copy=False)
    raise UserError(
        f"{path!r}: expected uint8 images [N, H, W, C] or float data "
        f"[N, H, W, C] / [N, D], found {x.dtype} of shape {x.shape}"
    )


def _check_labels(y: np.ndarray | None, n: int, path: str) -> np.ndarray:
    if y is None:
        raise UserError(f"{path!r} has no labels (arr_1 or y) but use_labels=True")
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(
            f"{path!r}: labels must be integers of shape ({n},), found {y.dtype} of shape {y.shape}"
        )
    if n and y.min() < 0:
        raise UserError(f"{path!r}: labels must be >= 0, found {y.min()}")
    return y.astype(np.int32)


class ArraySource:
    """All of an `.npz` file in memory (`in_memory` is accepted, as tfds sources take it, and
    must be True); `use_labels` also returns `"cond"` (int32)."""

    def __init__(self, path: str, *, use_labels: bool = False, in_memory: bool = True):
        if not in_memory:
            raise UserError(f"npz data is always read into memory ({path}): in_memory=False")
        x, y = _read(path)
        self.path = path
        self.x = _check_data(x, path)
        self.y = _check_labels(y, len(x), path) if use_labels else None
        self.num_examples = len(self.x)
        self.example_shape = tuple(self.x.shape[1:])
        self.num_classes = int(self.y.max()) + 1 if self.y is not None and len(self.y) else 0

    def __len__(self) -> int:
        return self.num_examples

    def select(self, rows: slice) -> "ArraySource":
        """Keep only `rows` of the file (e.g. `slice(None, 64)`); the class count stays the
        file's, as a tfds split's does."""
        self.x = self.x[rows]
        self.y = None if self.y is None else self.y[rows]
        self.num_examples = len(self.x)
        return self

    def __getitems__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = {"x": to_float(self.x[indices])}
        if self.y is not None:
            batch["cond"] = self.y[indices]
        return batch
