"""A `Source` over a tensorflow-datasets dataset, read by random access (no TensorFlow).

The dataset must be prepared in the array_record format under the tfds data_dir: the
argument, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`. Where it is not and
TensorFlow is importable, it is prepared here (downloaded and written as array_record);
without TensorFlow the error says how to fix it.

`in_memory=True` decodes the split once into a uint8 array (threads, progress bar) and,
with `cache_dir`, saves it as `.npy` so the next run maps it in at once; `in_memory=False`
decodes each batch when asked (ImageNet scale). `image_size` takes the central square of
each image and resizes it with PIL (bicubic, antialiased); grayscale keeps one channel.
"""

import importlib.util
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from core.errors import UserError
from data.arrays import to_float

log = logging.getLogger(__name__)

MAX_CHUNK = 512  # examples per decoding task


def resolve_data_dir(data_dir: str | None) -> str:
    """tfds's convention: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    path = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(path))


NAME_FORM = "NAME[/CONFIG][:x.y.z] (mnist, mnist:3.0.1, imagenet_resized/32x32)"


def _builder(name: str, data_dir: str):
    """tfds's builder of `name`; a malformed name, an unknown dataset, version or config is
    one UserError that names it (tfds raises ValueError, AssertionError or TypeError)."""
    from tensorflow_datasets.core import naming

    try:
        dataset_name, kwargs = naming.parse_builder_name_kwargs(name)
    except ValueError:
        from data import unknown_dataset

        names = tfds.list_builders(with_community_datasets=False)
        raise unknown_dataset(name, names, malformed=NAME_FORM) from None
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        from data import unknown_dataset

        names = tfds.list_builders(with_community_datasets=False)
        raise unknown_dataset(name, names) from None
    except (AssertionError, ValueError, TypeError) as e:
        raise UserError(_builder_args_error(name, str(dataset_name), kwargs, e)) from None


def open_builder(name: str, data_dir: str | None = None):
    """tfds's builder of the dataset `name` (its data is not read): `data.check_name`."""
    return _builder(name, resolve_data_dir(data_dir))


def _builder_args_error(name: str, base: str, kwargs: dict, e: Exception) -> str:
    """One line for a tfds name whose version, config or keyword its builder refuses."""
    # tfds words these as 'Failed to construct dataset "x", builder_kwargs "{...}": why'
    why = re.sub(r'^Failed to construct dataset .*?builder_kwargs ".*?": ', "", str(e).strip())
    why = why.splitlines()[0] if why else type(e).__name__
    if "version" in kwargs and "version" in why:
        only = re.search(r"only: (.+?)\.?$", why)
        versions = f"; its versions: {only.group(1)}" if only else f" ({why})"
        return f"dataset {base!r} has no version {kwargs['version']}{versions}"
    if "config" in kwargs and "BuilderConfig" in why:
        try:
            configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
        except Exception:  # a dataset known only from its files in data_dir
            configs = []
        known = f"its configs: {', '.join(configs)}" if configs else "it has no configs"
        return f"dataset {base!r} has no config {kwargs['config']!r}; {known}"
    extra = sorted(k for k in kwargs if k not in ("config", "version"))
    if extra and isinstance(e, TypeError):
        return (
            f"dataset name {name!r}: {base} takes no option(s) {', '.join(extra)}; "
            f"a tfds name is {NAME_FORM}"
        )
    return f"cannot open dataset {name!r}: {why}"


def _not_prepared(name: str, data_dir: str) -> UserError:
    return UserError(
        f"dataset {name!r} is not prepared in {data_dir} and preparing it needs TensorFlow: "
        f"pip install 'driftlab[prepare]' (tensorflow-cpu), or set TFDS_DATA_DIR "
        f"(or --config.data.data_dir) to a folder that holds {name}/"
    )


def _check_split(builder, split: str) -> None:
    """Every split named exists, the slicing parses (tfds's syntax) and selects examples."""
    known = list(builder.info.splits)
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in known:
            raise UserError(
                f"dataset {builder.name!r} has no split {base!r}; its splits: {', '.join(known)}"
            )
    try:
        count = builder.info.splits[split].num_examples
    except ValueError as e:  # tfds: "Error parsing split ...\n<why>"
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        why = re.sub(r"\s*See format at.*$", "", lines[-1] if lines else "")
        raise UserError(
            f"dataset {builder.name!r}: cannot read the split {split!r} ({why}); splits are "
            f"written as train, test[:1000], train[10%:], train[:50%]+test"
        ) from None
    if count <= 0:
        raise UserError(f"the split {split!r} of dataset {builder.name!r} selects no examples")


def can_prepare() -> bool:
    """Whether datasets can be prepared here (tfds's download_and_prepare needs TensorFlow)."""
    return importlib.util.find_spec("tensorflow") is not None


def open_data_source(name: str, split: str, data_dir: str):
    """`(builder, random-access data source)`, preparing the dataset if TensorFlow can."""
    builder = _builder(name, data_dir)
    if not builder.is_prepared() and can_prepare():
        log.info("preparing %s in %s (array_record)", name, data_dir)
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # offline, a manual download, a data_dir typo: one line
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UserError(
                f"dataset {name!r} is not in {data_dir} and preparing it failed "
                f"({type(e).__name__}: {first}); set TFDS_DATA_DIR (or --config.data.data_dir) "
                f"to a folder that holds {name}/"
            ) from e
    if builder.is_prepared():
        _check_split(builder, split)
    try:
        return builder, builder.as_data_source(split=split)
    except Exception as e:
        if not builder.is_prepared():
            raise _not_prepared(name, data_dir) from e
        if isinstance(e, NotImplementedError):  # prepared as tfrecord: no random access
            raise UserError(
                f"dataset {name!r} in {data_dir} is in the {builder.info.file_format.value} "
                f"format, which has no random access: rebuild it with `tfds build {name} "
                f"--file_format=array_record` or use another data_dir"
            ) from e
        raise


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] uint8 -> [size, size, C]: the central square, resized by PIL (bicubic)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return square
    pil = Image.fromarray(square[..., 0] if square.shape[-1] == 1 else square)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return resized.reshape(size, size, square.shape[-1])


def _records(ds, indices: list[int]) -> list[dict]:
    try:
        return ds.__getitems__(indices)  # batched read (array_record reads in parallel)
    except TypeError:
        # tfds.testing.mock_data (4.9.x) installs an unbound `__getitems__` on its mock
        # reader; any genuine TypeError comes back from the per-record reads below.
        return [ds[i] for i in indices]


def _image_shape(info, image_size: int | None) -> tuple[int, ...]:
    features = info.features
    if "image" not in features:
        raise UserError(
            f"dataset {info.name!r} has no 'image' feature; its features: {', '.join(features)}"
        )
    image = features["image"]
    if np.dtype(image.np_dtype) != np.uint8:  # (`.dtype` would import TensorFlow)
        raise UserError(f"dataset {info.name!r}: images are {image.np_dtype}, expected uint8")
    height, width, channels = image.shape
    if image_size is not None:
        if image_size < 1:
            raise UserError(f"image_size must be positive, got {image_size}")
        return (image_size, image_size, channels)
    if height is None or width is None:
        raise UserError(
            f"dataset {info.name!r} has images of varying size {image.shape}; set image_size"
        )
    return (height, width, channels)


def _num_classes(info) -> int:
    label = info.features["label"] if "label" in info.features else None
    if label is None or not hasattr(label, "num_classes"):
        raise UserError(
            f"dataset {info.name!r} has no class 'label' feature; "
            f"its features: {', '.join(info.features)}, so set use_labels=False"
        )
    return int(label.num_classes)


def _cache_paths(cache_dir: str, info, split: str, image_size: int | None) -> tuple[str, str]:
    tag = "-".join(
        [
            info.full_name.replace("/", "-"),
            re.sub(r"[^\w.-]+", "_", split),
            str(image_size or "full"),
        ]
    )
    return (
        os.path.join(cache_dir, f"{tag}.images.npy"),
        os.path.join(cache_dir, f"{tag}.labels.npy"),
    )


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


class TfdsSource:
    """The split `split` of the tfds dataset `name`; see the module docstring."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        data_dir: str | None = None,
        use_labels: bool = False,
        image_size: int | None = None,
        in_memory: bool = True,
        cache_dir: str | None = None,
        num_workers: int | None = None,
    ):
        self.data_dir = resolve_data_dir(data_dir)
        builder, self._ds = open_data_source(name, split, self.data_dir)
        info = builder.info
        self.name, self.split, self.image_size = name, split, image_size
        self.example_shape = _image_shape(info, image_size)
        self.num_examples = len(self._ds)
        self.num_classes = _num_classes(info) if use_labels else 0
        self._has_labels = "label" in info.features
        self.use_labels = use_labels
        self._workers = num_workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="driftlab-decode")
        self.images: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        if in_memory:
            paths = _cache_paths(cache_dir, info, split, image_size) if cache_dir else None
            self.images, self.labels = self._load_all(paths)
            self._pool.shutdown()

    def __len__(self) -> int:
        return self.num_examples

    def __getitems__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self.images is not None:
            images = self.images[indices]
            labels = self.labels[indices] if self.use_labels else None
        else:
            images, labels = self._decode(np.asarray(indices), progress=False)
        batch = {"x": to_float(images)}
        if self.use_labels:
            batch["cond"] = labels.astype(np.int32)
        return batch

    def _decode_chunk(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        records = _records(self._ds, indices.tolist())
        images = [np.asarray(r["image"]) for r in records]
        if self.image_size is not None:
            images = [center_crop_resize(im, self.image_size) for im in images]
        labels = np.array([r["label"] for r in records], np.int32) if self._has_labels else None
        return np.stack(images), labels

    def _decode(self, indices: np.ndarray, progress: bool):
        """(images uint8 [n, H, W, C], labels int32 [n] or None) of `indices`, in threads."""
        size = max(1, min(MAX_CHUNK, math.ceil(len(indices) / self._workers)))
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        bar = tqdm(
            total=len(indices),
            desc=f"decoding {self.name}:{self.split}",
            unit="img",
            disable=not progress,
            mininterval=1.0,
        )
        images, labels = [], []
        with bar:
            for chunk_images, chunk_labels in self._pool.map(self._decode_chunk, chunks):
                images.append(chunk_images)
                labels.append(chunk_labels)
                bar.update(len(chunk_images))
        labels = np.concatenate(labels) if self._has_labels else None
        return np.concatenate(images), labels

    def _load_all(self, paths: tuple[str, str] | None):
        """The whole split, from the `.npy` cache at `paths` when there, else decoded."""
        if paths and os.path.exists(paths[0]):
            log.info("reading %s:%s from %s", self.name, self.split, paths[0])
            images = np.load(paths[0], mmap_mode="r")
            labels = np.load(paths[1]) if self._has_labels else None
            if images.shape != (self.num_examples, *self.example_shape):
                raise UserError(
                    f"cache {paths[0]} holds {images.shape}, expected "
                    f"{(self.num_examples, *self.example_shape)}: delete it"
                )
            return images, labels
        images, labels = self._decode(np.arange(self.num_examples), progress=True)
        if paths:
            os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
            if labels is not None:
                _save(paths[1], labels)
            _save(paths[0], images)  # last: its presence means both are complete
            log.info("cached %s:%s in %s", self.name, self.split, paths[0])
        return images, labels
