"""Released DINOv2 backbones in: `dinov2_vit*14[_reg]_pretrain.pth` state dicts (and the
backbone of a DINOv2 training or teacher checkpoint) as DinoVisionTransformer params.

The names map mechanically (dino_jax.interop.state_dict): `blocks.0.ls1.gamma` ->
`blocks_0/ls1/gamma`, Linear / Conv weights transposed. Files are read with the project's safe
reader (pth.open_pth: no PyTorch, no code from the file), shapes checked before any tensor is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.interop.official_shapes import FLOAT_DTYPES, OfficialCheckpointError
from dino_jax.interop.pth import TensorInfo, open_pth
from dino_jax.interop.state_dict import from_state_dict
from dino_jax.models.vit2 import DINOV2_ARCHS, DinoVisionTransformer

HEADS_BY_WIDTH = {spec["embed_dim"]: spec["num_heads"] for spec in DINOV2_ARCHS.values()}
# FSDP training checkpoints (block_chunks > 0) name a block `blocks.<chunk>.<index>.`, where
# <index> already counts over all blocks (the chunks are padded with nn.Identity).
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def backbone_state_dict(tree: Mapping[str, Any], which: str = "teacher") -> dict[str, Any]:
    """The backbone entries of a DINOv2 file's object, under the released names.

    Takes a released backbone state dict as is; a teacher checkpoint (`{"teacher":
    {"backbone.*": ...}}`), a training checkpoint (`{"model": {"teacher.backbone.*": ...}}`,
    `which` = "teacher" or "student") or names with `module.`: the backbone part, prefixes
    removed and chunked block names flattened.
    """
    if "cls_token" not in tree:
        for key in ("teacher", "model", "state_dict"):
            if isinstance(tree.get(key), Mapping):
                tree = tree[key]
                break
    names = {k.removeprefix("module."): v for k, v in tree.items() if isinstance(k, str)}
    for prefix in (f"{which}.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in names):
            names = {k[len(prefix) :]: v for k, v in names.items() if k.startswith(prefix)}
            break
    if "cls_token" not in names:
        raise ValueError(
            "no DINOv2 backbone found (no 'cls_token' entry, with or without 'backbone.', "
            f"'{which}.backbone.' or 'module.')"
        )
    return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in names.items()}


def load_dinov2_backbone(state_dict: Mapping[str, Any], which: str = "teacher") -> dict:
    """DinoVisionTransformer params from a DINOv2 backbone state dict (numpy arrays or
    anything np.asarray reads), accepted in any layout `backbone_state_dict` takes."""
    params, buffers = from_state_dict(backbone_state_dict(state_dict, which))
    if buffers:
        raise ValueError(f"a DINOv2 ViT has no BatchNorm; found buffers {sorted(buffers)}")
    return params


def _mlp_ratio(dim: int, block: Mapping[str, Any]) -> tuple[str, float]:
    if "w12" not in block["mlp"]:
        return "mlp", np.shape(block["mlp"]["fc1"]["kernel"])[1] / dim
    hidden = np.shape(block["mlp"]["w12"]["kernel"])[1] // 2
    for ratio in (4.0, 1.5 * hidden / dim):  # SwiGLUFFNFused rounds 2/3 of int(D * ratio)
        if (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8 == hidden:
            return "swiglufused", ratio
    raise ValueError(f"no mlp_ratio gives a SwiGLU hidden width of {hidden} at width {dim}")


def dinov2_kwargs(
    params: Mapping[str, Any],
    num_heads: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
) -> dict[str, Any]:
    """DinoVisionTransformer fields read off a param tree (of arrays or shape stand-ins).

    Heads are not in the shapes: `num_heads`, else the official size of the width. Neither
    is the position-embedding resize: by default the released backbones' (hub/backbones.py),
    offset 0 with antialiasing for the `_reg` models, offset 0.1 without for the others.
    """
    dim = int(np.shape(params["cls_token"])[-1])
    if num_heads is None and dim not in HEADS_BY_WIDTH:
        raise ValueError(f"cannot tell the heads of a ViT of width {dim}; pass num_heads")
    depth = sum(1 for k in params if k.startswith("blocks_"))
    patch = int(np.shape(params["patch_embed"]["proj"]["kernel"])[0])
    grid = round((np.shape(params["pos_embed"])[1] - 1) ** 0.5)
    registers = int(np.shape(params["register_tokens"])[1]) if "register_tokens" in params else 0
    ffn, ratio = _mlp_ratio(dim, params["blocks_0"])
    return {
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": num_heads or HEADS_BY_WIDTH[dim],
        "mlp_ratio": ratio,
        "ffn": ffn,
        "num_register_tokens": registers,
        "init_values": 1.0 if "ls1" in params["blocks_0"] else None,
        "interpolate_offset": (0.0 if registers else 0.1)
        if interpolate_offset is None
        else interpolate_offset,
        "interpolate_antialias": bool(registers)
        if interpolate_antialias is None
        else interpolate_antialias,
        "img_size": grid * patch,
    }


def _stand_in(value: Any) -> Any:
    """A zero-memory array of a pickled tensor's shape, for checking shapes before reading."""
    if isinstance(value, TensorInfo):
        return np.broadcast_to(np.zeros((), np.float32), value.shape)
    return value


def _shape_problems(model: DinoVisionTransformer, params: Mapping[str, Any]) -> list[str]:
    size = model.img_size
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(init["params"])}
    have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree.leaves_with_path(params)}
    lines = [f"missing {k} {want[k]}" for k in want if k not in have]
    lines += [f"unexpected {k} {have[k]}" for k in have if k not in want]
    lines += [
        f"{k} is {have[k]}, expected {want[k]}" for k in want if have.get(k, want[k]) != want[k]
    ]
    return lines


def load_dinov2_pth(
    path: str | os.PathLike[str],
    *,
    which: str = "teacher",
    num_heads: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
    **fields: Any,
) -> tuple[DinoVisionTransformer, dict[str, Any]]:
    """(model, variables) for `model.apply(variables, images)` from a DINOv2 .pth file.

    The architecture is read off the tensor shapes (see `dinov2_kwargs` for what is not in
    them); `fields` override module fields (dtype, attention_impl, ...). Every backbone
    entry must be a floating-point tensor of the model's shape, checked from the pickle
    before the tensors are read. Raises OfficialCheckpointError (or PthError) naming the file.
    """
    path = os.path.expanduser(os.fspath(path))
    pth = open_pth(path)
    if not isinstance(pth.tree, Mapping):
        raise OfficialCheckpointError(f"{path}: not a state dict ({type(pth.tree).__name__})")
    try:
        entries = backbone_state_dict(pth.tree, which)
        bad = [k for k, v in entries.items() if not isinstance(v, TensorInfo)]
        bad += [k for k, v in entries.items() if k not in bad and v.dtype not in FLOAT_DTYPES]
        if bad:
            raise ValueError(f"entries that are not floating-point tensors: {bad[:6]}")
        shapes = load_dinov2_backbone({k: _stand_in(v) for k, v in entries.items()})
        kwargs = dinov2_kwargs(shapes, num_heads, interpolate_offset, interpolate_antialias)
        model = DinoVisionTransformer(**{**kwargs, **fields})
        problems = _shape_problems(model, shapes)
        if problems:
            raise ValueError(
                "its tensors do not form a DINOv2 ViT:\n  - " + "\n  - ".join(problems[:6])
            )
    except KeyError as err:
        raise OfficialCheckpointError(f"{path}: no {err} entry: not a DINOv2 ViT") from None
    except ValueError as err:
        raise OfficialCheckpointError(f"{path}: {err}") from None
    loaded = backbone_state_dict(pth.load({v.storage for v in entries.values()}), which)
    return model, {"params": load_dinov2_backbone(loaded)}


def dinov2_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our DINOv2 ViT params as the official state dict of a released backbone (names and
    layouts of dinov2/models/vision_transformer.py: `blocks.0.ls1.gamma`, `register_tokens`,
    `mlp.w12.weight`, ...), loadable with `DinoVisionTransformer.load_state_dict`."""
    from dino_jax.interop.state_dict import to_state_dict

    return to_state_dict(jax.tree.map(np.asarray, dict(params)))


def save_dinov2_backbone(path: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
    """Write a DINOv2 backbone as a `torch.save` file of its official state dict."""
    from dino_jax.interop.pth_write import save_pth

    save_pth(dinov2_state_dict(params), path)
