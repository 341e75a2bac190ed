"""Device mesh and shardings: data parallel by default, batch split on its first axis."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with one auto-sharded `data` axis."""
    devices = list(jax.devices() if devices is None else devices)
    # jax.make_mesh defaults to explicit axis types in recent JAX; the step relies on the
    # compiler propagating shardings, so ask for automatic axes.
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, optimiser state, center by default)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """First axis split over the `data` axis: all crops of an image stay on one device."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch_from_local(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's slice of the global batch -> one global array sharded on axis 0."""
    sharding = batch_sharding(mesh)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)
