"""2-D toy distributions: exact samplers and a materialised `Source` over them.

All three live at roughly unit scale around the origin:

- `8gaussians`: 8 isotropic Gaussians (std 0.15) centred on the circle of radius 2.
- `moons`: scikit-learn's two interleaving half circles (noise 0.05), centred, times 1.5.
- `checkerboard`: uniform on the 8 black cells of a 4x4 board of unit squares on
  [-2, 2]^2; a point (x, y) is black when floor(x) + floor(y) is even.
"""

from collections.abc import Callable

import numpy as np

from core.errors import lookup

GAUSSIANS_RADIUS = 2.0
GAUSSIANS_STD = 0.15
MOONS_NOISE = 0.05
MOONS_SCALE = 1.5


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = 2 * np.pi * rng.integers(0, 8, size=n) / 8
    centers = GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centers + GAUSSIANS_STD * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = np.pi * rng.random(n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x - 0.5, y - 0.25], axis=1)
    return MOONS_SCALE * (points + MOONS_NOISE * rng.standard_normal((n, 2)))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.uniform(-2, 2, size=n)
    # Rows of the same parity as floor(x): -2 or 0 when floor(x) is even, -1 or 1 when odd.
    row = -2 + np.floor(x) % 2 + 2 * rng.integers(0, 2, size=n)
    y = row + rng.random(n)
    return np.stack([x, y], axis=1)


TOYS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "checkerboard": _checkerboard,
}


def sample_toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` exact samples `[n, 2]` float32 of the toy distribution `name`."""
    return lookup(TOYS, name, "toy distribution")(n, rng).astype(np.float32)


class ToySource:
    """`num_examples` samples of a toy distribution, drawn once from `seed`.

    The `test` split is an independent draw from the same distribution (another stream
    of the same seed), so train/test comparisons (memorization) need no extra option.
    """

    def __init__(
        self, name: str, split: str = "train", *, num_examples: int = 2**16, seed: int = 0
    ):
        stream = lookup({"train": 0, "test": 1}, split, "toy split")
        self.name = name
        self.x = sample_toy(name, num_examples, np.random.default_rng((seed, stream)))
        self.num_examples = num_examples
        self.example_shape = (2,)
        self.num_classes = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitems__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": self.x[indices]}
