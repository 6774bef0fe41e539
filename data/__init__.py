"""Input pipelines: a `Source` per dataset, stateless `Batches`, and `prefetch`.

    source = build_source("mnist", use_labels=True)           # or "cifar10", "moons", "npz"
    batches = Batches(source, global_batch_size=256, seed=0,
                      process_index=jax.process_index(), process_count=jax.process_count())
    for batch in prefetch(batches.iterate(start_step), 2, put=place_on_devices): ...

A batch is `{"x": float32 [b, ...], "cond": int32 [b]}` (`cond` only with labels); images
are NHWC in [-1, 1]. Host-side numpy only: device placement is the caller's `put`.
"""

import difflib
import inspect
import re
from typing import Protocol, runtime_checkable

import numpy as np

from core.errors import UserError
from data.arrays import ArraySource
from data.pipeline import Batches, Prefetcher, prefetch
from data.toy import TOYS, ToySource, sample_toy

EARTH = ("volcano", "earthquake", "flood", "fire")

__all__ = [
    "ArraySource",
    "Batches",
    "Prefetcher",
    "Source",
    "TfdsSource",
    "ToySource",
    "build_source",
    "prefetch",
    "sample_toy",
]


@runtime_checkable
class Source(Protocol):
    """A finite indexed dataset; `__getitems__` returns the examples at `indices`."""

    num_examples: int
    example_shape: tuple[int, ...]
    num_classes: int  # 0 when labels are not used

    def __getitems__(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


def _construct(cls, name: str, args: tuple, options: dict) -> Source:
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("name", "split")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"dataset {name!r} has no option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(allowed)}"
        )
    return cls(*args, **options)


def build_source(name: str, *, split: str = "train", **options) -> Source:
    """The dataset `name`: a toy (`8gaussians`, `moons`, `checkerboard`; options
    `num_examples`, `seed`), `linear_blocks` (a linear manifold with variance blocks:
    `num_examples`, `seed`, `ambient_dim`, `block_dims`, `block_vars`, `basis_seed`), `npz` (options `path`, `use_labels`; one file per split:
    `{split}` in the path is replaced by the split, `data/mnist_{split}.npz`; a path
    without it is one split only; `train[:64]` takes rows of it),
    or any tfds dataset (`mnist`, `cifar10`, `celeb_a`, `imagenet2012`, ...; options
    `data_dir`, `use_labels`, `image_size`, `in_memory`, `cache_dir`, `num_workers`).
    On the sphere: the Earth event datasets `volcano`, `earthquake`, `flood`, `fire`
    (options `seed`, `data_dir`), `vmf_mixture` (`num_examples`, `num_components`,
    `kappa`, `seed`) and `earth_geoloc`, a synthetic geolocation task (`dataset`,
    `embed_dim`, `bandwidth`, `noise`, `feature_seed`, `seed`, `data_dir`)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"the dataset name is empty; {_KNOWN}")
    if name in TOYS:
        return _construct(ToySource, name, (name, split), options)
    if name == "linear_blocks":
        from data.linear_blocks import LinearBlocksSource

        return _construct(LinearBlocksSource, name, (split,), options)
    if name in EARTH or name in ("vmf_mixture", "earth_geoloc"):  # on the sphere (imports jax)
        from data.earth import EarthSource, GeolocSource, VMFMixtureSource

        if name == "vmf_mixture":
            return _construct(VMFMixtureSource, name, (split,), options)
        if name == "earth_geoloc":
            return _construct(GeolocSource, name, (split,), options)
        return _construct(EarthSource, name, (name, split), options)
    if name == "npz":
        if "path" not in options:
            raise UserError("dataset 'npz' needs the option path=<file.npz>")
        base, rows = split_rows(split)
        options["path"] = npz_path(options["path"], base)
        source = _construct(ArraySource, name, (), options)
        return source.select(rows) if rows is not None else source
    from data.tfds import TfdsSource  # imports tensorflow_datasets (~0.5 s)

    return _construct(TfdsSource, name, (name, split), options)


SPHERE = (*EARTH, "vmf_mixture", "earth_geoloc")
_KNOWN = (
    f"built in: the toys {', '.join(TOYS)}, linear_blocks; npz (path=<file.npz>); on the sphere "
    f"{', '.join(SPHERE)}; else a tensorflow-datasets name (mnist, cifar10, ...)"
)


def unknown_dataset(name: str, tfds_names=(), *, malformed: str | None = None) -> UserError:
    """The error for a dataset name that is neither built in nor a tfds dataset (or, with
    `malformed`, the form it breaks, not even a well-formed tfds name): the closest names,
    built in or tfds's, and the built-in ones."""
    base = name.split(":")[0].split("/")[0].strip()
    builtin = [*TOYS, "linear_blocks", "npz", *SPHERE]
    close = difflib.get_close_matches(base, [*builtin, *tfds_names], n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    if malformed:
        what = f"unknown dataset {name!r}, not a tfds name either (those are {malformed}): "
    else:
        what = f"unknown dataset {name!r}: "
        if ":" in name:
            hint += "(a version after ':' is x.y.z, as in mnist:3.0.1) "
    return UserError(f"{what}{hint}{_KNOWN[0].upper()}{_KNOWN[1:]}")


def check_name(name: str, *, data_dir: str | None = None) -> None:
    """Refuse, before any work, a dataset name that `build_source` would refuse as empty,
    malformed or unknown (for a tfds name its builder is opened, not its data)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"the dataset name is empty; {_KNOWN}")
    if name in TOYS or name in SPHERE or name in ("npz", "linear_blocks"):
        return
    from data.tfds import open_builder

    open_builder(name, data_dir)


def split_rows(split: str) -> tuple[str, slice | None]:
    """`"train[:64]"` -> `("train", slice(None, 64))`; a split without rows -> `(split, None)`.
    (The integer slices of tfds's split syntax, for npz files.)"""
    m = re.fullmatch(r"\s*([\w.-]+)\s*\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]\s*", split)
    if m is None:
        if "[" in split:
            raise UserError(
                f"npz splits take integer rows, as train[:64] or test[10:20]: {split!r}"
            )
        return split, None
    start, stop = (int(v) if v else None for v in m.group(2, 3))
    return m.group(1), slice(start, stop)


def npz_path(path: str, split: str) -> str:
    """The file of `split` (rows ignored): `path` with `{split}` replaced (a path without it
    is returned)."""
    return path.replace("{split}", split_rows(split)[0])


def __getattr__(attr: str):
    if attr == "TfdsSource":  # lazily, like build_source
        from data.tfds import TfdsSource

        return TfdsSource
    raise AttributeError(f"module 'data' has no attribute {attr!r}")
