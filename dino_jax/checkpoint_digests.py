"""Array digests of a checkpoint: computed where the arrays live, kept in its meta item."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

# Written into the "meta" item of every checkpoint, so they are committed with the arrays.
# A digest is two 32-bit sums over the elements of one array, of each element's bits mixed
# with a salt of its position (and mixed once more for the second sum). It is computed where
# the arrays live, one small jitted program per kind of array (shape, dtype, sharding): the
# same value on every process and for any device layout (a checkpoint may be resumed on
# another mesh), an element-wise pass like the finiteness check before each save, with no
# copy to the host. Any change confined to one 32-bit word changes both sums (mixing is a
# bijection); other damage goes unseen with a chance of about 2**-64. It guards against
# accidents, not against someone who rewrites the record too.
FORMAT_KEY = "checkpoint_format"
FORMAT = 2  # 1 (the key absent): written before array digests existed
DIGESTS_KEY = "array_digests"
DIGEST_SCHEME = "position-salted-mix32x2"
_POSITION_STEP = 0x9E3779B9  # odd: distinct positions get distinct salts
_SALT_SEED = 0x243F6A88
_SECOND_SUM_SEED = 0x85A308D3


def _mix32(h: jax.Array) -> jax.Array:
    """A bijection of uint32 words in which every input bit moves about half the output bits
    (xor-shifts and odd multipliers)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words: one per element, two per 64-bit element."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: a trailing axis of 2


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """The row-major index of every element of an array of `shape` (modulo 2**32)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _lanes(x: jax.Array) -> jax.Array:
    """The two uint32 sums of the digest of `x`."""
    words = _words(x)
    positions = _positions(words.shape)
    salts = _mix32(positions * jnp.uint32(_POSITION_STEP) + jnp.uint32(_SALT_SEED))
    mixed = _mix32(words ^ salts)
    again = _mix32(mixed ^ jnp.uint32(_SECOND_SUM_SEED))
    return jnp.stack([jnp.sum(mixed, dtype=jnp.uint32), jnp.sum(again, dtype=jnp.uint32)])


@functools.cache
def _digest_program(out_sharding):
    """The jitted digest of one array (compiled once per shape, dtype and sharding)."""
    return jax.jit(_lanes, out_shardings=out_sharding)


def _replicated_like(x) -> NamedSharding | None:
    """Every device of `x`'s mesh holds the result: each process can read it."""
    sharding = getattr(x, "sharding", None)
    return (
        NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, NamedSharding)
        else None
    )


def _named_leaves(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p, simple=True, separator="."), x) for p, x in leaves]


def array_digests(tree) -> dict[str, str]:
    """Array name -> its digest (16 hex digits) for every array of `tree`. Every process of a
    multi-process run must call it (collective programs over the global arrays)."""
    named = _named_leaves(tree)
    sums = jax.device_get([_digest_program(_replicated_like(x))(x) for _, x in named])
    return {
        name: "".join(f"{int(v):08x}" for v in np.asarray(pair))
        for (name, _), pair in zip(named, sums, strict=True)
    }


def digest_record(tree) -> dict[str, Any]:
    """What a checkpoint's meta item holds about its arrays: the format and the digests."""
    return {
        FORMAT_KEY: FORMAT,
        DIGESTS_KEY: {"scheme": DIGEST_SCHEME, "arrays": array_digests(tree)},
    }


def recorded_digests(meta: dict[str, Any]) -> dict[str, str] | None:
    """The digests a checkpoint's meta item records; None for a checkpoint written before
    digests existed. ValueError (saying what is wrong) for a record that is missing from a
    checkpoint of this format, malformed, or of an unknown scheme."""
    if FORMAT_KEY not in meta and DIGESTS_KEY not in meta:
        return None
    record = meta.get(DIGESTS_KEY)
    if record is None:
        raise ValueError("its record of array digests is missing")
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
        raise ValueError("its record of array digests is malformed")
    if record.get("scheme") != DIGEST_SCHEME:
        raise ValueError(
            f"its array digests are of an unknown kind {record.get('scheme')!r} (this version"
            f" writes {DIGEST_SCHEME!r}): written by a newer dino_jax?"
        )
    arrays = record["arrays"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in arrays.items()):
        raise ValueError("its record of array digests is malformed")
    return arrays


def digest_mismatches(
    recorded: dict[str, str], actual: dict[str, str], *, partial: bool = False
) -> list[str]:
    """Every array whose digest differs from the recorded one or has none, by name; also those
    recorded but not restored, unless `partial` (a restore of some arrays only)."""
    out = [
        f"{k}: its digest differs"
        for k in sorted(set(actual) & set(recorded))
        if recorded[k] != actual[k]
    ]
    out += [f"{k}: no digest recorded" for k in sorted(set(actual) - set(recorded))]
    if not partial:
        out += [f"{k}: recorded, but not restored" for k in sorted(set(recorded) - set(actual))]
    return out
