"""The device mesh and every sharding decision, in one place.

Mesh axes are `("data", "fsdp")`. A batch is split over both axes along its leading
dimension. A parameter (and the optimizer moments that mirror it) is replicated, unless the
`fsdp` axis has more than one device and the array holds at least `fsdp_min_size` elements:
then its largest dimension divisible by the `fsdp` size is split over `fsdp` (ZeRO-3 style;
XLA inserts the all-gathers). The rule depends only on an array's shape, so params, EMA and
Adam moments of the same shape always get the same sharding.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from core.errors import UserError

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A `("data", "fsdp")` mesh over `devices` (default: all); `data=-1` takes the rest."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise UserError(f"mesh.fsdp={fsdp} does not divide the {n} available devices")
        data = n // fsdp
    if data * fsdp != n:
        raise UserError(
            f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but {n} are available"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over both mesh axes."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """The FSDP rule: split the largest dimension divisible by `fsdp`, if big enough."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[dim] % fsdp == 0:
            return P(*([None] * dim + ["fsdp"]))
    return P()


def state_shardings(mesh: Mesh, abstract_tree, min_size: int = 2**18):
    """Shardings for a pytree of arrays / ShapeDtypeStructs by the FSDP rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda a: NamedSharding(mesh, param_spec(tuple(a.shape), fsdp, min_size)), abstract_tree
    )


def check_batch_size(mesh: Mesh, global_batch: int) -> None:
    if global_batch % mesh.size:
        raise UserError(
            f"batch_size={global_batch} is not divisible by the {mesh.size} devices "
            f"of the mesh {dict(mesh.shape)}"
        )


def sample_batch(mesh: Mesh, batch: int, num: int) -> int:
    """The batch for drawing `num` samples at most `batch` at a time: `min(batch, num)`
    rounded up to a multiple of the mesh's devices (the extra samples are dropped)."""
    return -(-min(batch, num) // mesh.size) * mesh.size


def place_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays split over the mesh (works multi-host)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
