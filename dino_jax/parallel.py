"""Device mesh and shardings: data parallel by default, batch split on its first axis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with one auto-sharded `data` axis."""
    devices = list(jax.devices() if devices is None else devices)
    # jax.make_mesh defaults to explicit axis types in recent JAX; the step relies on the
    # compiler propagating shardings, so ask for automatic axes.
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def connect_processes(mesh: Mesh) -> None:
    """Open the collectives between the processes of a multi-process mesh now, while they
    are in step (every process must call this; a no-op for one process).

    On CPU the collective library (gloo) connects a group of devices at its first collective
    and gives up if the other processes arrive more than 30 s later; compiling a train step
    on unevenly loaded hosts can take longer than that. Once connected, later collectives
    wait for slow peers (a dead one is caught by the coordination service's heartbeat).
    """
    if jax.process_count() == 1:
        return
    ones = jax.make_array_from_process_local_data(
        batch_sharding(mesh), np.ones(mesh.local_mesh.size, np.int32), (mesh.size,)
    )
    jax.block_until_ready(jax.jit(jnp.sum, out_shardings=replicated(mesh))(ones))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, optimiser state, center by default)."""
    return NamedSharding(mesh, PartitionSpec())


def on_every_device(make: Callable[[], jax.Array], mesh: Mesh) -> jax.Array:
    """The value `make()` computes, made where it lives: replicated on every device of the
    mesh, in every process (a device_put of a host value needs all devices addressable)."""
    return jax.jit(make, out_shardings=replicated(mesh))()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """First axis split over the `data` axis: all crops of an image stay on one device."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch_from_local(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's slice of the global batch -> one global array sharded on axis 0."""
    sharding = batch_sharding(mesh)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = 2**14) -> PartitionSpec:
    """Shard the largest axis that splits evenly over the devices (ZeRO-3 / FSDP style).

    Small arrays (under `min_size` elements) stay replicated: gathering them costs more than
    the memory they would save.
    """
    if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
    """Shardings of a (abstract) train state: replicated, or FSDP rules on every array."""
    if not fsdp:
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    n = mesh.shape[DATA_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), abstract_state)


def round_up(size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count >= `size` (a padded batch size)."""
    devices = mesh.shape[DATA_AXIS]
    return -(-size // devices) * devices
