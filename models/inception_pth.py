"""pytorch-fid's Inception checkpoint without torch: a restricted reader and a name converter.

`read_torch_checkpoint(path) -> {name: ndarray}` reads a `torch.save` file, both the zip
format (torch >= 1.6) and the legacy format (magic number + pickles + raw storages, as
pytorch-fid's 2019 release file `pt_inception-2015-12-05-6726825d.pth` is written). Its
unpickler admits only the globals a tensor state dict needs (the tensor-rebuild functions,
the storage types, OrderedDict); anything else is refused before it runs. Tensors are
rebuilt from (storage, offset, size, stride) with NumPy.

`convert_pytorch_fid(state)` maps pytorch-fid's names (`Mixed_5b.branch5x5_1.conv.weight`,
...) onto the layout of the shared npz (`net.layers.mixed.tower.conv.weight`, conv weights
OIHW, BatchNorm as `beta/mean/var`), plus `net.fc.weight/bias` (the 1008-way logits).

This module imports no jax, so the torch-side reference script can use the same mapping.
"""

import collections
import hashlib
import os
import pickle
import urllib.request
import zipfile

import numpy as np

from core.errors import UserError

PTH_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
# The file name carries the first 8 hex digits of the sha256 (torch.hub's convention);
# the full digest and size are the ones torch-fidelity and other FID code pin for it.
PTH_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PTH_BYTES = 95_628_359

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _Storage:
    """A storage named in the pickle: dtype, element count, and its data once read."""

    def __init__(self, dtype: str, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _TensorRef:
    """A tensor to rebuild once the storages are read (legacy files store them last)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        flat = self.storage.data
        size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
        if len(size) != len(stride) or min(stride, default=0) < 0:
            raise UserError(f"malformed tensor in checkpoint: size {size}, stride {stride}")
        if any(s == 0 for s in size):
            return np.zeros(size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if self.offset < 0 or last >= flat.size:
            raise UserError(f"malformed tensor in checkpoint: reads past its storage ({last})")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=size, strides=[s * flat.itemsize for s in stride]
        )
        return np.array(view)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if not isinstance(storage, _Storage):
        raise UserError("malformed checkpoint: a tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in _DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only `_ALLOWED` globals; storages become `_Storage` records."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path, self.storages = path, {}

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UserError(
                f"refusing to load {self.path}: it references {module}.{name}, "
                "which is not a tensor-rebuild global"
            )
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UserError(f"refusing to load {self.path}: unknown persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if storage_type not in _DTYPES:
            raise UserError(f"unsupported storage type in {self.path}: {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(_DTYPES[storage_type], int(numel))
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy view into a root storage: (view_key, offset, size)
            raise UserError(f"unsupported legacy storage view in {self.path}")
        return self.storages[key]


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # only for bf16 checkpoints; ships with jax

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _fill(storage: _Storage, raw: bytes, path: str) -> None:
    dtype = _np_dtype(storage.dtype)
    if len(raw) != storage.numel * dtype.itemsize:
        raise UserError(
            f"truncated or malformed checkpoint {path}: a storage has "
            f"{len(raw)} bytes, expected {storage.numel * dtype.itemsize}"
        )
    storage.data = np.frombuffer(raw, dtype.newbyteorder("<"))


def _materialize(obj):
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    return obj


def _read_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise UserError(f"{path} is not a torch checkpoint (no single data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder") != b"little":
            raise UserError(f"{path}: big-endian checkpoints are not supported")
        with zf.open(pkls[0]) as f:
            unpickler = _RestrictedUnpickler(f, path)
            result = unpickler.load()
        for key, storage in unpickler.storages.items():
            _fill(storage, zf.read(f"{prefix}data/{key}"), path)
    return result


def _read_legacy(path: str):
    with open(path, "rb") as f:
        header = [_RestrictedUnpickler(f, path).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or not isinstance(header[2], dict):
            raise UserError(f"{path} is neither a zip nor a legacy torch checkpoint")
        if not header[2].get("little_endian", False):
            raise UserError(f"{path}: big-endian checkpoints are not supported")
        unpickler = _RestrictedUnpickler(f, path)
        result = unpickler.load()
        for key in _RestrictedUnpickler(f, path).load():
            storage = unpickler.storages[str(key)]
            numel = int.from_bytes(f.read(8), "little")
            if numel != storage.numel:
                raise UserError(f"malformed checkpoint {path}: storage {key} size mismatch")
            _fill(storage, f.read(numel * _np_dtype(storage.dtype).itemsize), path)
    return result


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict (zip or legacy format) as NumPy arrays, without torch."""
    try:
        result = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"could not read torch checkpoint {path}: {e}") from None
    result = _materialize(result)
    if not isinstance(result, dict) or not all(isinstance(v, np.ndarray) for v in result.values()):
        raise UserError(f"{path} does not hold a flat state dict of tensors")
    return result


# --- pytorch-fid names -> npz layout ---------------------------------------------------

_BLOCKS = {
    "Conv2d_1a_3x3": ("conv", None),
    "Conv2d_2a_3x3": ("conv_1", None),
    "Conv2d_2b_3x3": ("conv_2", None),
    "Conv2d_3b_1x1": ("conv_3", None),
    "Conv2d_4a_3x3": ("conv_4", None),
    "Mixed_5b": ("mixed", "A"),
    "Mixed_5c": ("mixed_1", "A"),
    "Mixed_5d": ("mixed_2", "A"),
    "Mixed_6a": ("mixed_3", "B"),
    "Mixed_6b": ("mixed_4", "C"),
    "Mixed_6c": ("mixed_5", "C"),
    "Mixed_6d": ("mixed_6", "C"),
    "Mixed_6e": ("mixed_7", "C"),
    "Mixed_7a": ("mixed_8", "D"),
    "Mixed_7b": ("mixed_9", "E"),
    "Mixed_7c": ("mixed_10", "E"),
}


def _tower(name: str, prefix: str, n: int, start: int = 1) -> dict[str, str]:
    convs = ["conv"] + [f"conv_{i}" for i in range(1, n)]
    return {f"{name}_{i + start}": f"{prefix}.{c}" for i, c in enumerate(convs)}


_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        **_tower("branch5x5", "tower", 2),
        **_tower("branch3x3dbl", "tower_1", 3),
        "branch_pool": "tower_2.conv",
    },
    "B": {"branch3x3": "conv", **_tower("branch3x3dbl", "tower", 3)},
    "C": {
        "branch1x1": "conv",
        **_tower("branch7x7", "tower", 3),
        **_tower("branch7x7dbl", "tower_1", 5),
        "branch_pool": "tower_2.conv",
    },
    "D": {**_tower("branch3x3", "tower", 2), **_tower("branch7x7x3", "tower_1", 4)},
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_LEAVES = {
    "conv.weight": "weight",
    "bn.bias": "beta",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
}


def npz_name(torch_name: str) -> str | None:
    """The npz name of a pytorch-fid parameter; None for the ones the npz drops
    (BatchNorm's all-ones `weight` and `num_batches_tracked`). Unknown names raise."""
    if torch_name in ("fc.weight", "fc.bias"):
        return "net." + torch_name
    parts = torch_name.split(".")
    block, leaf = parts[0], ".".join(parts[-2:])
    if block not in _BLOCKS or len(parts) not in (3, 4):
        raise UserError(f"unexpected parameter {torch_name!r} in a pytorch-fid checkpoint")
    if leaf in ("bn.weight", "bn.num_batches_tracked"):
        return None
    layer, kind = _BLOCKS[block]
    if kind is not None:
        branch = _BRANCHES[kind].get(parts[1]) if len(parts) == 4 else None
        if branch is None:
            raise UserError(f"unexpected parameter {torch_name!r} in a pytorch-fid checkpoint")
        layer = f"{layer}.{branch}"
    if leaf not in _LEAVES:
        raise UserError(f"unexpected parameter {torch_name!r} in a pytorch-fid checkpoint")
    return f"net.layers.{layer}.{_LEAVES[leaf]}"


def convert_pytorch_fid(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid state dict -> npz layout (float32). BatchNorm scales must be all ones
    (the TF graph has none), since the npz layout stores no scale."""
    out = {}
    for name, value in state.items():
        target = npz_name(name)
        if target is None:
            if name.endswith("bn.weight") and not np.all(value == 1):
                raise UserError(f"{name} is not all ones; these are not the FID weights")
            continue
        out[target] = np.asarray(value, np.float32)
    return out


def download_verified(url: str, dest: str, *, sha256: str, timeout: float = 60) -> None:
    """Stream `url` to `dest`, keeping it only if its sha256 equals `sha256`."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp, digest = dest + ".part", hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    if digest.hexdigest() != sha256:
        os.remove(tmp)
        raise UserError(
            f"checksum mismatch for {url}: sha256 {digest.hexdigest()}, expected {sha256}"
        )
    os.replace(tmp, dest)
