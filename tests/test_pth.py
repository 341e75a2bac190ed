"""load_pth / save_pth: the official DINO checkpoint files, round trips, refusal of pickles that
would run code, and agreement with real PyTorch in both directions."""

import collections
import itertools
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
from helpers.pth_files import as_pth, dict_pkl, tensor_ops, write_pth

from dino_jax.interop.pth import Namespace, UnsafeCheckpointError, load_pth, save_pth
from dino_jax.interop.pth_read import LEGACY_MAGIC

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REPO = pathlib.Path(__file__).parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def checkpoint():
    return load_pth(FIXTURES / "checkpoint.pth")


@pytest.fixture(scope="module")
def steps():
    with np.load(FIXTURES / "train_steps.npz") as z:
        return dict(z)


def assert_same(a, b, where="obj"):
    """Same types, key order, dtypes, shapes and bytes, all the way down."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, np.ndarray | np.generic):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
        assert_same(getattr(a, "__dict__", None), getattr(b, "__dict__", None), f"{where}.attrs")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, Namespace):
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


# ---- hand-made torch.save files ---------------------------------------------------------------


BASE = np.arange(12, dtype=np.float32) * 1.5
BF = np.array([1, -2, 3.5, 0.125, 7, -0.5], dtype=BF16)
LONGS = np.array([1, -(2**40), 3, 2**62, -5], dtype=np.int64)
BOOLS = np.array([True, False, False, True])
COMPLEX = np.array([1 + 2j, -3.5 - 0.25j], dtype=np.complex64)


def make_synthetic(path, byteorder="little"):
    order = "<" if byteorder == "little" else ">"
    raw = {  # each storage in the file's byte order; complex swaps each half
        "0": BASE.astype(f"{order}f4").tobytes(),
        "1": BF.view(np.uint16).astype(f"{order}u2").tobytes(),
        "2": LONGS.astype(f"{order}i8").tobytes(),
        "3": BOOLS.tobytes(),
        "4": COMPLEX.astype(f"{order}c8").tobytes(),
    }
    entries = {
        "base": tensor_ops("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        "transposed": tensor_ops("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),
        "offset": tensor_ops("FloatStorage", "0", 12, 5, (2,), (3,)),
        "bf16": tensor_ops("BFloat16Storage", "1", 6, 0, (2, 3), (3, 1)),
        "int64": tensor_ops("LongStorage", "2", 5, 0, (5,), (1,)),
        "expanded": tensor_ops("LongStorage", "2", 5, 1, (3, 2), (0, 1)),
        "bool": tensor_ops("BoolStorage", "3", 4, 0, (2, 2), (2, 1)),
        "scalar": tensor_ops("FloatStorage", "0", 12, 11, (), ()),
        "complex": tensor_ops("ComplexFloatStorage", "4", 2, 0, (2,), (1,)),
    }
    write_pth(path, dict_pkl(entries), raw, byteorder.encode())


# ---- the official checkpoint files ------------------------------------------------------------


def test_checkpoint_layout(checkpoint, steps):
    assert list(checkpoint) == ["student", "teacher", "optimizer", "epoch", "args", "dino_loss"]
    assert checkpoint["epoch"] == 2
    student = checkpoint["student"]
    assert isinstance(student, collections.OrderedDict)
    assert {k.split(".")[1] for k in student} == {"backbone", "head"}
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in student)
    teacher = checkpoint["teacher"]
    names = [k[len("out/step3/teacher/") :] for k in steps if k.startswith("out/step3/teacher/")]
    assert list(teacher) == names
    for name in names:
        assert_same(teacher[name], steps[f"out/step3/teacher/{name}"], name)
    center = checkpoint["dino_loss"]["center"]
    assert center.shape == (1, 128) and center.dtype == np.float32
    assert teacher._metadata[""] == {"version": 1}  # state-dict metadata survives as in torch


def test_checkpoint_args(checkpoint):
    args = checkpoint["args"]
    assert isinstance(args, Namespace)
    assert (args.arch, args.patch_size, args.out_dim, args.epochs) == ("vit_tiny", 8, 128, 10)
    assert args.teacher_temp == 0.07 and args.use_fp16 is False
    assert args.global_crops_scale == [0.4, 1.0] and args.world_size == 1


def test_checkpoint_optimizer(checkpoint, steps):
    optimizer = checkpoint["optimizer"]
    meta = json.loads(str(steps["meta"]))
    names = list(itertools.chain(*meta["optimizer"]["group_param_names"]))
    assert sorted(optimizer["state"]) == list(range(len(names)))
    for i, name in enumerate(names):
        state = optimizer["state"][i]
        assert_same(state["step"], steps[f"out/adamw/step/{name}"], name)
        assert_same(state["exp_avg"], steps[f"out/adamw/exp_avg/{name}"], name)
        assert_same(state["exp_avg_sq"], steps[f"out/adamw/exp_avg_sq/{name}"], name)
        assert state["exp_avg"].shape == checkpoint["student"][name].shape
    groups = optimizer["param_groups"]
    assert list(itertools.chain(*(g["params"] for g in groups))) == list(range(len(names)))
    for group, expected in zip(groups, meta["final_param_groups"], strict=True):
        assert type(group["lr"]) is np.float64 and group["lr"] == expected["lr"]
        assert group["betas"] == (0.9, 0.999)
    assert type(groups[0]["weight_decay"]) is np.float64


def test_backbone_file(checkpoint):
    backbone = load_pth(FIXTURES / "backbone.pth")
    assert list(backbone)[:3] == ["cls_token", "pos_embed", "patch_embed.proj.weight"]
    teacher = checkpoint["teacher"]
    prefixed = [k for k in teacher if k.startswith("backbone.")]
    assert list(backbone) == [k[len("backbone.") :] for k in prefixed]
    for key in prefixed:
        assert_same(backbone[key[len("backbone.") :]], teacher[key], key)


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["checkpoint.pth", "backbone.pth"])
def test_round_trip_fixture(tmp_path, name):
    original = load_pth(FIXTURES / name)
    save_pth(original, tmp_path / name)
    assert_same(load_pth(tmp_path / name), original)


def data_offsets(path) -> list[int]:
    offsets = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:])
            offsets.append(info.header_offset + 30 + name_len + extra_len)
    return offsets


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_synthetic_views_and_round_trip(tmp_path, byteorder):
    make_synthetic(tmp_path / "in.pth", byteorder)
    loaded = load_pth(tmp_path / "in.pth")
    base = BASE.reshape(3, 4)
    np.testing.assert_array_equal(loaded["base"], base)
    np.testing.assert_array_equal(loaded["transposed"], base.T)
    np.testing.assert_array_equal(loaded["offset"], BASE[5:11:3])
    np.testing.assert_array_equal(loaded["expanded"], np.broadcast_to(LONGS[1:3], (3, 2)))
    assert loaded["scalar"].shape == () and loaded["scalar"] == BASE[11]
    assert_same(loaded["bf16"], BF.reshape(2, 3))
    assert_same(loaded["int64"], LONGS)
    assert_same(loaded["bool"], BOOLS.reshape(2, 2))
    assert_same(loaded["complex"], COMPLEX)
    # One storage, several views, as in torch: a write shows through all of them.
    assert loaded["transposed"].strides == (4, 16)
    loaded["base"][1, 1] = -1.0
    assert loaded["transposed"][1, 1] == -1.0 and loaded["offset"][0] == -1.0

    save_pth(loaded, tmp_path / "out.pth")
    again = load_pth(tmp_path / "out.pth")
    assert_same(again, loaded)
    assert again["transposed"].flags.c_contiguous
    assert all(offset % 64 == 0 for offset in data_offsets(tmp_path / "out.pth"))


def test_save_plain_values(tmp_path):
    obj = {
        "ints": [0, 255, 256, 65536, -1, -(2**31), 2**31, 2**70, -(2**70)],
        "floats": (0.1, -2.5e300, float("inf")),
        "text": ["", "é∂", "a" * 300],
        "flags": (True, False, None),
        "bytes": b"\x00\xffraw",
        "nested": collections.OrderedDict(a={1: (2, [3])}),
        "scalars": [np.float64(0.5), np.float32(-1.25), np.int64(-7), np.bool_(True)],
        "args": Namespace(lr=0.1, crops=[0.4, 1.0]),
        "empty": np.zeros((0, 3), np.float16),
    }
    save_pth(obj, tmp_path / "plain.pth")
    assert_same(load_pth(tmp_path / "plain.pth"), obj)


def test_save_refuses_what_torch_cannot_read(tmp_path):
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        save_pth({"a": loop}, tmp_path / "x.pth")
    with pytest.raises(TypeError, match="object"):
        save_pth({"a": object()}, tmp_path / "x.pth")
    with pytest.raises(TypeError, match="uint16"):
        save_pth({"a": np.zeros(2, np.uint16)}, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


# ---- damaged and foreign files ------------------------------------------------------------------


def test_damaged_files_name_the_path(tmp_path):
    data = (FIXTURES / "backbone.pth").read_bytes()
    (tmp_path / "short.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"short\.pth: truncated or corrupt zip"):
        load_pth(tmp_path / "short.pth")
    flipped = bytearray(data)
    offset = data_offsets(FIXTURES / "backbone.pth")[5]  # a tensor record
    flipped[offset] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flipped\.pth: truncated or corrupt zip"):
        load_pth(tmp_path / "flipped.pth")
    (tmp_path / "noise.pth").write_bytes(b"\x80\x02\x8a\xff" + bytes(range(40)))
    with pytest.raises(ValueError, match=r"noise\.pth: cannot read"):
        load_pth(tmp_path / "noise.pth")


def test_malformed_tensor_view_is_refused(tmp_path):
    pkl = dict_pkl({"w": tensor_ops("FloatStorage", "0", 4, 1, (2, 2), (2, 1))})
    write_pth(tmp_path / "overrun.pth", pkl, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match="overruns its storage"):
        load_pth(tmp_path / "overrun.pth")
    pkl = dict_pkl({"w": tensor_ops("FloatStorage", "0", 1000, 0, (4,), (1,))})
    write_pth(tmp_path / "short.pth", pkl, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match="has 16 bytes"):
        load_pth(tmp_path / "short.pth")


def test_plain_pickle_and_legacy_files(tmp_path):
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": [1, 2.5], "b": None}, protocol=2))
    assert load_pth(tmp_path / "plain.pkl") == {"a": [1, 2.5], "b": None}
    legacy = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    (tmp_path / "legacy.pt").write_bytes(legacy)
    with pytest.raises(ValueError, match=r"legacy .*torch\.save\(torch\.load"):
        load_pth(tmp_path / "legacy.pt")


# ---- files that try to run code -----------------------------------------------------------------


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_os_system_payload_is_refused(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Exploit(f"touch {control}"), protocol=2))
    assert control.exists(), "the payload is live: plain pickle runs it"

    target = tmp_path / "pwned"
    for protocol in (2, 4):  # GLOBAL and STACK_GLOBAL
        payload = pickle.dumps(Exploit(f"touch {target}"), protocol=protocol)
        (tmp_path / "plain.pkl").write_bytes(payload)
        for path in (as_pth(tmp_path / "zipped.pth", payload), tmp_path / "plain.pkl"):
            with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system") as err:
                load_pth(path)
            assert str(path) in str(err.value) and "weights_only=True" in str(err.value)
    assert not target.exists()


@pytest.mark.parametrize(
    ("pkl", "named"),
    [
        (b"cbuiltins\neval\n(X\x0a\x00\x00\x00print(123)tR.", "builtins.eval"),
        (b"c__builtin__\nexec\n(X\x0a\x00\x00\x00print(123)tR.", "__builtin__.exec"),
        # getattr reached through an allowlisted global is still refused
        (b"cbuiltins\ngetattr\n(ccollections\nOrderedDict\nX\x04\x00\x00\x00keystR.", "getattr"),
        (b"cnumpy\nload\n(X\x01\x00\x00\x00xtR.", "numpy.load"),
        (b"ctorch\nload\n(X\x01\x00\x00\x00xtR.", "torch.load"),
    ],
)
def test_dangerous_globals_are_refused(tmp_path, pkl, named):
    with pytest.raises(UnsafeCheckpointError, match=named):
        load_pth(as_pth(tmp_path / "evil.pth", b"\x80\x02" + pkl))


def test_pickle_cannot_edit_allowlisted_objects(tmp_path):
    # BUILD with (state, slotstate) would setattr on the class or the constructor it names.
    for target in (b"cargparse\nNamespace\n", b"cnumpy\ndtype\n", b"ccollections\nOrderedDict\n"):
        pkl = b"\x80\x02" + target + b"N}X\x03\x00\x00\x00fooK\x01s\x86b."
        with pytest.raises(ValueError):
            load_pth(as_pth(tmp_path / "edit.pth", pkl))
    assert not hasattr(Namespace, "foo")
    with pytest.raises(UnsafeCheckpointError, match="persistent id 'evil'"):
        load_pth(as_pth(tmp_path / "pid.pth", b"\x80\x02X\x04\x00\x00\x00evilQ."))
    with pytest.raises(UnsafeCheckpointError, match="not a plain number type"):
        load_pth(as_pth(tmp_path / "obj.pth", b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R."))


def test_load_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from dino_jax.interop.pth import load_pth, save_pth\n"
        f"save_pth(load_pth({str(FIXTURES / 'checkpoint.pth')!r}), {str(tmp_path / 'c.pth')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---- agreement with real PyTorch ----------------------------------------------------------------


def torch_to_numpy(t):
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def assert_torch_same(ours, theirs, where="obj"):
    """Deep equality between a torch.load result and another one (or our own values)."""
    import torch

    if isinstance(theirs, torch.Tensor):
        ours = torch_to_numpy(ours) if isinstance(ours, torch.Tensor) else ours
        assert_same(np.asarray(ours, order="C"), torch_to_numpy(theirs), where)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for key in theirs:
            assert_torch_same(ours[key], theirs[key], f"{where}/{key}")
        assert getattr(ours, "__dict__", None) == getattr(theirs, "__dict__", None), where
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
            assert_torch_same(x, y, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def test_agrees_with_pytorch(tmp_path, monkeypatch):
    import torch
    from torch.utils.serialization import config

    # 1. What we write, torch reads bit for bit (weights_only, and mmap with computed offsets).
    state = collections.OrderedDict(
        f32=np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1),  # non-contiguous
        f16=np.linspace(-2, 2, 7, dtype=np.float16),
        bf16=np.array([[1.5, -3.25]], dtype=BF16),
        f64=np.array(np.pi),
        i64=np.array([2**62, -3], dtype=np.int64),
        i32=np.array([7], np.int32),
        i8=np.array([-128, 127], np.int8),
        u8=np.array([255], np.uint8),
        flags=np.array([True, False]),
        c64=COMPLEX,
        empty=np.zeros((0, 3), np.float32),
    )
    state.update(nested={"layers": [np.ones(2, np.float32)], "step": 3, "name": "x", "t": (1.5,)})
    save_pth(state, tmp_path / "ours.pth")
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch checks its computed offsets
    monkeypatch.setattr(config.load, "calculate_storage_offsets", True)
    for mmap in (False, True):
        theirs = torch.load(tmp_path / "ours.pth", weights_only=True, mmap=mmap)
        assert_torch_same(state, theirs)

    # 2. The official checkpoint reads here as in torch, and re-written by us, reads the same.
    ours = load_pth(FIXTURES / "checkpoint.pth")
    save_pth(ours, tmp_path / "ckpt.pth")
    original = torch.load(FIXTURES / "checkpoint.pth", weights_only=False)
    rewritten = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert vars(rewritten.pop("args")) == vars(original.pop("args")) == vars(ours.pop("args"))
    assert_torch_same(ours, original)
    assert_torch_same(rewritten, original)

    # 3. What torch writes (views, offsets, shared storage, Parameters, metadata) reads identically.
    base = torch.randn(6, 5)
    linear = torch.nn.Linear(3, 2)
    sd = linear.state_dict()
    sd.update(
        view=base.t(),
        offset=base[2:, 1:4],
        expanded=torch.arange(3, dtype=torch.int64).expand(4, 3),
        bf16=torch.randn(3, 4).to(torch.bfloat16)[:, ::2],
        longs=torch.tensor([2**60, -1]),
        flags=torch.tensor([True, False, True]),
        half=torch.randn(3).half(),
        param=torch.nn.Parameter(torch.randn(2, 2)),
    )
    torch.save(sd, tmp_path / "theirs.pth")
    ours = load_pth(tmp_path / "theirs.pth")
    assert_torch_same(ours, sd)
    assert ours["view"].strides == (4, 20) and np.shares_memory(ours["view"], ours["offset"])
    assert ours["expanded"].strides == (0, 8)
    save_pth(ours, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert_torch_same(back, sd)
    torch.nn.Linear(3, 2).load_state_dict({k: back[k] for k in ("weight", "bias")})
