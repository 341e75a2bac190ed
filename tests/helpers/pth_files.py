"""Hand-made torch.save files for the reader's tests: pickles written opcode by opcode (so that
any layout, views and damage can be expressed), zipped the way torch.save does."""

import collections
import pickle
import zipfile

import numpy as np

from dino_jax.interop import architecture
from dino_jax.interop.pth import save_pth


def frag(value) -> bytes:
    """Protocol-2 opcodes for a plain value, without the PROTO header and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def tensor_ops(storage, key, numel, offset, size, stride) -> bytes:
    """A `_rebuild_tensor_v2` record: a view (offset, size, stride) of storage record `key`."""
    pid = b"(" + frag("storage") + f"ctorch\n{storage}\n".encode() + frag(key)
    pid += frag("cpu") + frag(numel) + b"tQ"
    args = pid + frag(offset) + frag(size) + frag(stride) + b"\x89ccollections\nOrderedDict\n)R"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"


def write_pth(path, pkl: bytes, storages: dict, byteorder=b"little", compression=None):
    with zipfile.ZipFile(path, "w", compression=compression or zipfile.ZIP_STORED) as z:
        z.writestr("made/data.pkl", pkl)
        z.writestr("made/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"made/data/{key}", data)
        z.writestr("made/version", b"3\n")
    return path


def dict_pkl(entries: dict) -> bytes:
    """A dict of name -> pickled value opcodes."""
    body = b"".join(frag(name) + ops for name, ops in entries.items())
    return b"\x80\x02}(" + body + b"u."


def as_pth(path, pkl: bytes):
    """`pkl` as the data.pkl of an otherwise empty archive."""
    return write_pth(path, pkl, {})


def expanded_entries(shapes: dict, prefix: str = "", first_key: int = 0):
    """(name -> opcodes, storages) of a state dict whose every tensor is a stride-0 view of a
    one-element storage, as torch.save writes an `expand`ed tensor: a few kB whatever the
    shapes."""
    entries, storages = {}, {}
    for i, (name, shape) in enumerate(shapes.items(), start=first_key):
        entries[prefix + name] = tensor_ops("FloatStorage", str(i), 1, 0, shape, (0,) * len(shape))
        storages[str(i)] = np.ones(1, np.float32).tobytes()
    return entries, storages


def expanded_state_dict(path, shapes: dict, prefix: str = ""):
    entries, storages = expanded_entries(shapes, prefix)
    return write_pth(path, dict_pkl(entries), storages)


def state_dict_ops(entries: dict) -> bytes:
    """An OrderedDict of name -> opcodes, as torch pickles a state dict."""
    body = b"".join(frag(name) + ops for name, ops in entries.items())
    return b"ccollections\nOrderedDict\n)R(" + body + b"u"


def arrays(shapes: dict, dtype=np.float32, seed=0) -> collections.OrderedDict:
    rng = np.random.default_rng(seed)
    out = collections.OrderedDict()
    for name, shape in shapes.items():
        kind = np.int64 if name.endswith("num_batches_tracked") else dtype
        out[name] = rng.standard_normal(shape).astype(kind)
    return out


def official_files(directory, model_config, img_size, **changes):
    """A full checkpoint.pth and a backbone-only backbone.pth of the configured model, written
    by save_pth in the official layout; `changes` (name -> array or None) edit the teacher."""
    shapes = architecture.state_shapes(architecture.from_model_config(model_config, img_size))
    teacher = arrays(shapes)
    for name, value in changes.items():
        if value is None:
            teacher.pop(name)
        else:
            teacher[name] = value
    student = collections.OrderedDict(("module." + k, v.copy()) for k, v in teacher.items())
    center = np.zeros((1, model_config.out_dim), np.float32)
    full = {"student": student, "teacher": teacher, "epoch": 3, "dino_loss": {"center": center}}
    save_pth(full, directory / "checkpoint.pth")
    backbone = collections.OrderedDict(
        (k.removeprefix("backbone."), v) for k, v in teacher.items() if k.startswith("backbone.")
    )
    save_pth(backbone, directory / "backbone.pth")
    return directory / "checkpoint.pth", directory / "backbone.pth"
