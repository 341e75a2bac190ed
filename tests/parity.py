"""Helpers shared by the parity tests: fixture loading and error measures."""

from __future__ import annotations

import numpy as np

from dino_jax.interop.state_dict import from_state_dict


def fixture_params(data, prefix: str) -> dict:
    """Flax params from the `param/<prefix>...` entries of a fixture .npz."""
    state = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/" + prefix)}
    params, buffers = from_state_dict(state, prefix)
    assert not buffers
    return params


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the acceptance measure of the parity tests."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nchw_to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)
