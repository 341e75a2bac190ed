"""The KoLeo regulariser of DINOv2 (Sablayrolles et al. 2018, "Spreading vectors for
similarity search"): spread the student's CLS features by pushing apart nearest neighbours."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / max(||x||, eps) over the last axis, as torch's F.normalize: a zero row stays zero.

    Written as sqrt(max(||x||^2, eps^2)) (the same value) so that the gradient of a zero row
    is finite: jnp.linalg.norm's is NaN at 0.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def nearest_neighbours(x: jax.Array) -> jax.Array:
    """(B,) index of each row's nearest other row by the largest inner product.

    For unit vectors the largest dot product is the smallest distance. The diagonal is set to
    -1 as in dinov2/loss/koleo_loss.py's pairwise_NNs_inner (so a zero row, whose dots are all
    0, still picks another row); ties go to the first index, as torch.max does on CPU.
    """
    dots = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)  # (B, B)
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    return jnp.argmax(dots, axis=1)


def koleo_distances(features: jax.Array, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """(nearest-neighbour index (B,), distance (B,)) of the L2-normalised rows of (B, D).

    The distance is ||x_i - x_nn(i) + eps||, torch's nn.PairwiseDistance(2, eps): eps is added
    to the difference, so identical rows are eps * sqrt(D) apart, not 0. The neighbour search
    is not differentiated; the distance is, through both rows.
    """
    x = l2_normalize(features.astype(jnp.float32), eps)
    index = nearest_neighbours(jax.lax.stop_gradient(x))
    diff = x - x[index] + eps
    return index, jnp.sqrt(jnp.sum(diff * diff, axis=-1))


def koleo_loss(features: jax.Array, eps: float = 1e-8) -> jax.Array:
    """-mean_i log(d_i + eps) over a (B, D) batch, as dinov2/loss/koleo_loss.py's KoLeoLoss.

    Neighbours are searched within `features` only. In the official training each GPU calls it
    on its own chunk of the batch; called on a global (sharded) array under jit it searches the
    whole global batch instead (an all-gather and a B x B product): a different regulariser,
    closer to DINOv3's KoLeoLossDistributed. Use koleo_loss_chunked to reproduce the official
    per-GPU value.
    """
    _, distances = koleo_distances(features, eps)
    return -jnp.mean(jnp.log(distances + eps))


def koleo_loss_chunked(features: jax.Array, num_chunks: int, eps: float = 1e-8) -> jax.Array:
    """Mean of koleo_loss over `num_chunks` equal consecutive chunks of the (B, D) batch.

    This is the official per-GPU behaviour: each of the world's GPUs holds B / world rows,
    computes KoLeoLoss on them alone, and data-parallel training averages the GPUs' gradients,
    i.e. differentiates the mean of the per-GPU losses. What matters is the chunk size (the
    official per-GPU batch), not our device count: num_chunks = official world size. With the
    batch axis sharded over a mesh whose size divides num_chunks, every chunk lives on one
    device and the B x B products stay local.
    """
    batch, dim = features.shape
    if batch % num_chunks:
        raise ValueError(f"batch {batch} does not split into {num_chunks} equal chunks")
    chunks = features.reshape(num_chunks, batch // num_chunks, dim)
    return jnp.mean(jax.vmap(lambda chunk: koleo_loss(chunk, eps))(chunks))


def dinov2_koleo_term(
    global_features: jax.Array, *, weight: float = 0.1, num_chunks: int = 1, eps: float = 1e-8
) -> jax.Array:
    """The KoLeo term of dinov2/train/ssl_meta_arch.py: weight * sum over global crops.

    global_features: (n_global, B, D) crop-major student backbone CLS features of the global
    crops (x_norm_clstoken, before the head). Each crop is regularised on its own (never across
    the two crops of one image), per chunk of num_chunks; `weight` is cfg.dino.koleo_loss_weight
    (0.1 by default). The official log shows this value divided by 2.
    """
    per_crop = jax.vmap(lambda crop: koleo_loss_chunked(crop, num_chunks, eps))(global_features)
    return weight * jnp.sum(per_crop)
