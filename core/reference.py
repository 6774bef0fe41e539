"""Reference data for evaluation: a dataset split's images, and its Inception features and
FID statistics, cached on disk per dataset, split and image size.

The cache is `cache_dir` (default `$XDG_CACHE_HOME` or `~/.cache`, then
`driftlab/fid_stats/`): `<tag>.features.npy` (float32 `[N, 2048]`) and `<tag>.stats.npz`
(pytorch-fid's `mu`, `sigma`), `<tag>` = `<dataset>-<split>-<image size or full>`.
"""

import dataclasses
import functools
import os
import re
from collections.abc import Callable

import numpy as np

from core import plots
from core.experiment import Data
from core.files import content_tag
from metrics import fid as fm

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 images [N, H, W, C] -> [N, 2048]


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "driftlab", "fid_stats")


def source_images(source) -> np.ndarray:
    """All examples of a data source: uint8 `[N, H, W, C]` images (the stored bytes of tfds
    and npz sources; float images of an npz file, in [-1, 1], rounded to uint8), or float32
    arrays for non-image data."""
    from data.arrays import is_image_shape

    for attr in ("images", "x"):
        arr = getattr(source, attr, None)
        if isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
            floats = arr.dtype != np.uint8 and is_image_shape(arr.shape)
            return plots.to_uint8(arr) if floats else arr
    parts = [
        source.__getitems__(np.arange(s, min(s + 4096, source.num_examples)))["x"]
        for s in range(0, source.num_examples, 4096)
    ]
    x = np.concatenate(parts)
    return plots.to_uint8(x) if x.ndim == 4 else x


def _atomic_save(path: str, save: Callable[[str], None]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    save(tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


@dataclasses.dataclass(eq=False)
class Dataset:
    """A reference dataset split; `build()` returns its data source (called lazily, once)."""

    name: str
    split: str
    build: Callable[[], object]
    image_size: int | None = None
    cache_dir: str | None = None
    # features / stats by (cache file suffix, precision), from the disk cache or computed
    _memo: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @property
    def tag(self) -> str:
        parts = [self.name, self.split, str(self.image_size or "full")]
        return re.sub(r"[^\w.-]+", "_", "-".join(parts))

    def _path(self, suffix: str, precision: str = "highest") -> str:
        """The cache file of Inception `features.npy` / `stats.npz`: named by the data, by
        the weights that made them (`models.inception.weights_tag`) and by the convolutions'
        precision where it is not the default "highest"."""
        from models.inception import weights_tag

        extra = "" if precision == "highest" else f"_{precision}"
        name = f"{self.tag}-inception_{weights_tag()}{extra}.{suffix}"
        return os.path.join(self.cache_dir or default_cache_dir(), name)

    @functools.cached_property
    def images(self) -> np.ndarray:
        return source_images(self.build())

    def features(self, compute: FeatureFn, precision: str = "highest") -> np.ndarray:
        """Inception features of all images: memory, else the disk cache, else `compute`
        (whose network runs its convolutions at `precision`, which names the cache)."""
        return self._cached(
            "features.npy", precision, np.load, lambda: self._compute(compute, precision), np.save
        )

    def _compute(self, compute: FeatureFn, precision: str) -> np.ndarray:
        """`compute(images)`, once the data is known to be images, said on stderr first (a
        dataset's pass is long on a CPU; `metrics.fid.inception_features` shows its
        progress)."""
        import sys

        from core.errors import UserError
        from data.arrays import is_image_shape

        images = self.images
        if not is_image_shape(images.shape):
            raise UserError(
                f"Inception features (fid, kid, pr, is, memorization's inception space) need "
                f"images [N, H, W, 1 or 3]; the reference data {self.name}:{self.split} is "
                f"{images.dtype} of shape {images.shape} (for low-dimensional data use swd)"
            )
        print(
            f"Inception features of {self.name}:{self.split}: {len(images):,} images, once "
            f"(cached in {self._path('features.npy', precision)})",
            file=sys.stderr,
        )
        return compute(images)

    def has_features(self, precision: str = "highest") -> bool:
        """Whether the Inception features are at hand (in memory or in the disk cache)."""
        key = ("features.npy", precision)
        return key in self._memo or os.path.exists(self._path("features.npy", precision))

    def stats(
        self, compute: FeatureFn, precision: str = "highest"
    ) -> tuple[np.ndarray, np.ndarray]:
        """FID `(mu, sigma)`: memory, else the disk cache, else from `features(compute)`."""
        return self._cached(
            "stats.npz",
            precision,
            fm.load_stats,
            lambda: fm.stats(self.features(compute, precision)),
            lambda path, out: fm.save_stats(path, *out),
        )

    def _cached(self, suffix: str, precision: str, load, make, save):
        """The value of cache file `suffix` at `precision`: memory, else the file (`load`),
        else `make()`, written with `save(path, value)`."""
        key = (suffix, precision)
        if key not in self._memo:
            path = self._path(suffix, precision)
            if os.path.exists(path):
                self._memo[key] = load(path)
            else:
                self._memo[key] = out = make()
                _atomic_save(path, lambda p: save(p, out))
        return self._memo[key]


def dataset_from_name(
    name: str, split: str = "train", *, cache_dir: str | None = None, **options
) -> Dataset:
    """A dataset by name (`data.build_source` options: `data_dir`, `image_size`, ...); a name
    ending in `.npz` is that file (`{split}` in it is replaced by the split)."""
    import data

    options = {k: v for k, v in options.items() if v is not None}
    if name.endswith(".npz"):
        name, options["path"] = "npz", name
    data.check_name(name, data_dir=options.get("data_dir"))  # now, not when first used
    build = lambda: data.build_source(name, split=split, **options)
    cache_name = _cache_name(name, options.get("path"), split)
    return Dataset(cache_name, split, build, options.get("image_size"), cache_dir)


def _cache_name(name: str, path: str | None, split: str) -> str:
    """The dataset's name in cache tags. An npz file is named by its stem and a digest of its
    bytes (`core.files.content_tag`): a rewritten file never shares cached features, and the
    same file re-provisioned with a new modification time keeps them."""
    if name != "npz" or path is None:
        return name
    import data

    path = data.arrays.require_file(data.npz_path(path, split))
    return f"npz_{os.path.splitext(os.path.basename(path))[0]}_{content_tag(path)}"


def run_dataset(data: Data, split: str | None = None, *, cache_dir: str | None = None) -> Dataset:
    """A run's own data (`Experiment.data`): its training split, or another `split` of it."""
    split = split or data.split
    build = lambda: data.source(split)
    name = _cache_name(data.name, data.path, split)
    return Dataset(name, split, build, data.image_size, cache_dir)
