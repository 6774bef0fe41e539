"""A linear manifold with variance blocks: the toy source of the lost-dimensions study.

Data `y = U z` in `R^D`, where `U [D, d]` has orthonormal columns (a random rotation of
the first `d` axes, fixed by `basis_seed`, or those axes themselves) and `z [d]` is a
centred Gaussian whose coordinates come in blocks: block `b` has `block_dims[b]`
coordinates of variance `block_vars[b]`. The data lie on a `d = sum(block_dims)`
dimensional subspace, and within it have directions of different variance, as in the
linear-manifold experiments of Achilli et al. 2024 ("Losing dimensions", arXiv 2410.08727).

`LinearBlocksSource` materialises `num_examples` points (the training set of size N; the
`test` split is an independent draw).
"""

import dataclasses

import numpy as np

from core.errors import UserError, lookup


@dataclasses.dataclass(frozen=True)
class LinearBlocks:
    """The distribution: ambient dimension, block sizes and variances, basis."""

    ambient_dim: int = 16
    block_dims: tuple[int, ...] = (2, 2)
    block_vars: tuple[float, ...] = (1.0, 0.1)
    basis_seed: int | None = 0  # None: the first d coordinate axes

    def __post_init__(self):
        dims, variances = tuple(self.block_dims), tuple(self.block_vars)
        if len(dims) != len(variances) or not dims:
            raise UserError(
                f"linear_blocks: block_dims {dims} and block_vars {variances} must be "
                "non-empty and of the same length"
            )
        if any(int(k) < 1 for k in dims) or any(float(v) <= 0 for v in variances):
            raise UserError("linear_blocks: block_dims must be >= 1 and block_vars > 0")
        if sum(dims) > self.ambient_dim:
            raise UserError(
                f"linear_blocks: the blocks' {sum(dims)} dimensions exceed ambient_dim="
                f"{self.ambient_dim}"
            )
        object.__setattr__(self, "block_dims", tuple(int(k) for k in dims))
        object.__setattr__(self, "block_vars", tuple(float(v) for v in variances))

    @property
    def manifold_dim(self) -> int:
        return sum(self.block_dims)

    def basis(self) -> np.ndarray:
        """`U [D, d]`, orthonormal columns, block after block."""
        eye = np.eye(self.ambient_dim, self.manifold_dim)
        if self.basis_seed is None:
            return eye
        rng = np.random.default_rng(self.basis_seed)
        q, r = np.linalg.qr(rng.standard_normal((self.ambient_dim, self.ambient_dim)))
        q = q * np.sign(np.diag(r))  # a Haar-distributed rotation
        return q @ eye

    def block_bases(self) -> list[np.ndarray]:
        """`[U_b [D, d_b]]`: the columns of `basis()` of each block."""
        u, out, start = self.basis(), [], 0
        for k in self.block_dims:
            out.append(u[:, start : start + k])
            start += k
        return out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` points `[n, D]` float32."""
        scales = np.repeat(np.sqrt(self.block_vars), self.block_dims)
        z = rng.standard_normal((n, self.manifold_dim)) * scales
        return (z @ self.basis().T).astype(np.float32)


class LinearBlocksSource:
    """`num_examples` points of `LinearBlocks(...)`, drawn once from `seed` (the `test`
    split: another stream of the same seed)."""

    def __init__(
        self,
        split: str = "train",
        *,
        num_examples: int = 1024,
        seed: int = 0,
        ambient_dim: int = 16,
        block_dims=(2, 2),
        block_vars=(1.0, 0.1),
        basis_seed: int | None = 0,
    ):
        stream = lookup({"train": 0, "test": 1}, split, "linear_blocks split")
        if int(num_examples) < 1:
            raise UserError(f"linear_blocks: num_examples must be >= 1, got {num_examples}")
        self.spec = LinearBlocks(ambient_dim, tuple(block_dims), tuple(block_vars), basis_seed)
        self.name = "linear_blocks"
        self.num_examples = int(num_examples)
        self.x = self.spec.sample(self.num_examples, np.random.default_rng((seed, stream)))
        self.example_shape = (ambient_dim,)
        self.num_classes = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitems__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": self.x[indices]}
