"""A `Source` over arrays in an `.npz` file (ADM's sample format, or `x`/`y`).

Layouts read: `arr_0` data and optional `arr_1` labels (what ADM's and our samplers write),
or `x` and optional `y`; labels, when present, are one per example. Data is `uint8` images
`[N, H, W, C]` (scaled to [-1, 1] per batch, kept as uint8 in memory), float images
`[N, H, W, C]` with C = 1 or 3 in [-1, 1] (the codebase's convention, kept) or in [0, 1]
(scaled to [-1, 1] once, with a note on stderr; other ranges are refused), or other float
arrays `[N, H, W, C]` / `[N, D]` kept as float32.
"""

import os
import sys
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


def _read(path: str) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """(data, labels or None, data key, label key) from the first layout the file holds."""
    require_file(path)
    if not zipfile.is_zipfile(path):  # np.load would try a pickle and say so
        with open(path, "rb") as f:
            head = f.read(6)
        what = "an .npy file (np.save)" if head == b"\x93NUMPY" else "not a zip archive"
        raise UserError(
            f"{path!r} is not an .npz file (numpy's zip of arrays, np.savez): it is {what}"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            for data_key, label_key in LAYOUTS:
                if data_key in f.files:
                    labels = f[label_key] if label_key in f.files else None
                    return f[data_key], labels, data_key, label_key
            found = ", ".join(f.files) or "none"
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{path!r} holds Python objects (pickled), not numeric arrays") from e
        raise UserError(f"cannot read {path!r} as an .npz file: {e}") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"cannot read {path!r} as an .npz file: {e}") from e
    raise UserError(f"{path!r} holds neither arr_0 nor x (keys found: {found})")


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(data, labels or None) of an `.npz` file as stored (dtypes unchanged); labels, when
    the file has them, must be one per example."""
    x, y, data_key, label_key = _read(path)
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise UserError(
            f"{path!r}: {label_key} must hold one label per example of {data_key} "
            f"({len(x) if x.ndim else 0}), found shape {y.shape}"
        )
    return x, y


_NOTED: set[str] = set()  # files whose [0, 1] float images were scaled (said once each)


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """`[N, H, W, C]` with 1 or 3 channels: what the codebase takes as images."""
    return len(shape) == 4 and shape[-1] in (1, 3)


def _check_data(x: np.ndarray, path: str) -> np.ndarray:
    if x.dtype == np.uint8 and x.ndim == 4:
        return x
    if np.issubdtype(x.dtype, np.floating) and x.ndim in (2, 4):
        if not np.isfinite(x).all():
            raise UserError(f"{path!r}: the data holds NaN or infinite values")
        if is_image_shape(x.shape) and len(x):
            return _float_images(x, path)
        return x.astype(np.float32, copy=False)
    raise UserError(
        f"{path!r}: expected uint8 images [N, H, W, C] or float data "
        f"[N, H, W, C] / [N, D], found {x.dtype} of shape {x.shape}"
    )


def _float_images(x: np.ndarray, path: str) -> np.ndarray:
    """Float images as float32 in [-1, 1]: kept when in [-1, 1], scaled when in [0, 1] (any
    set of real images has pixels below mid-grey, so [0, 1] is not [-1, 1] data)."""
    low, high = float(x.min()), float(x.max())
    if low >= 0.0 and high <= 1.0:
        if path not in _NOTED:
            _NOTED.add(path)
            print(
                f"note: {path}: float images in [0, 1], scaled to [-1, 1] (2x - 1), the "
                f"codebase's image convention",
                file=sys.stderr,
            )
        return x.astype(np.float32) * 2.0 - 1.0
    if low >= -1.0 and high <= 1.0:
        return x.astype(np.float32, copy=False)
    raise UserError(
        f"{path!r}: float images {x.shape} must be in [0, 1] or [-1, 1], found values in "
        f"[{low:.4g}, {high:.4g}]; rescale them or store uint8 images"
    )


def _check_labels(y: np.ndarray | None, n: int, path: str) -> np.ndarray:
    if y is None:
        raise UserError(f"{path!r} has no labels (arr_1 or y) but use_labels=True")
    if not np.issubdtype(y.dtype, np.integer):
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
        x, y = read_npz(path)
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
        if not len(self.x[rows]):
            raise UserError(
                f"rows {rows.start}:{rows.stop} of {self.path!r} ({len(self.x)} examples) "
                f"select no examples"
            )
        self.x = self.x[rows]
        self.y = None if self.y is None else self.y[rows]
        self.num_examples = len(self.x)
        return self

    def __getitems__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = {"x": to_float(self.x[indices])}
        if self.y is not None:
            batch["cond"] = self.y[indices]
        return batch
