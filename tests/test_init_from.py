"""Official checkpoints against the architecture: `check_init_from` (what `--config.init_from`
is checked with before any work directory exists) and `load_official`, which check every
shape from the pickle before reading a tensor, then read only the tensors used."""

import collections
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.pth_files import (
    arrays,
    as_pth,
    dict_pkl,
    expanded_entries,
    frag,
    official_files,
    state_dict_ops,
    tensor_ops,
    write_pth,
)
from helpers.tiny import tiny_config

from dino_jax import recipe
from dino_jax.interop import architecture, official, pth_storage
from dino_jax.interop.official import (
    OfficialCheckpointError,
    check_init_from,
    load_backbone,
    load_official,
    official_state_dict,
)
from dino_jax.interop.pth import save_pth

CONFIG = tiny_config()
MODEL, SIZE = CONFIG.model, CONFIG.aug.global_size  # ViT width 16, depth 1, patch 4, 16 px
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(checkpoint.pth, backbone.pth) of the tiny configured model."""
    return official_files(tmp_path_factory.mktemp("good"), MODEL, SIZE)


def shapes_of(model_config, img_size):
    return architecture.state_shapes(architecture.from_model_config(model_config, img_size))


@pytest.mark.parametrize(
    "changes",
    [{}, {"model.use_bn_in_head": True}, {"model.head_nlayers": 1}, {"model.patch_size": 8}],
)
def test_expected_shapes_are_those_of_the_built_model(changes):
    c = tiny_config(**changes)
    network = recipe.build_network(c)
    crops = [jnp.zeros((1, 2, c.aug.global_size, c.aug.global_size, 3))]
    abstract = jax.eval_shape(lambda key: network.init(key, crops), jax.random.key(0))["params"]
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    built = {name: value.shape for name, value in official_state_dict(params).items()}
    assert built == shapes_of(c.model, c.aug.global_size)


def test_a_fitting_checkpoint_passes_and_loads_with_the_model_shapes(good):
    full, backbone = good
    for path in good:
        check_init_from(str(path), MODEL, SIZE)
        check_init_from(str(path), MODEL)  # without the crop size: any square grid
    ckpt = load_official(full, MODEL, img_size=SIZE, optimizer=False)
    shapes = jax.tree.map(np.shape, official_state_dict(ckpt.teacher))
    assert shapes == shapes_of(MODEL, SIZE) and ckpt.center.shape == (1, MODEL.out_dim)
    assert ckpt.student is not None and ckpt.adam is None
    only_backbone = load_official(backbone, MODEL, img_size=SIZE)
    assert set(only_backbone.teacher) == {"backbone"}


def counting_reads(monkeypatch) -> list[str]:
    """The storage records read from now on, by name."""
    read = []
    original = pth_storage._read_storage

    def counted(archive, info, dtype):
        read.append(info.filename)
        return original(archive, info, dtype)

    monkeypatch.setattr(pth_storage, "_read_storage", counted)
    return read


def test_the_check_reads_the_pickle_only(good, monkeypatch):
    read = counting_reads(monkeypatch)
    for path in good:
        check_init_from(str(path), MODEL, SIZE)
    assert read == []
    load_official(good[0], MODEL, img_size=SIZE)
    assert len(read) == 2 * len(shapes_of(MODEL, SIZE)) + 1  # teacher, student, center


def _other_model(tmp_path, **changes):
    c = tiny_config(**changes)
    return official_files(tmp_path, c.model, c.aug.global_size)[0]


def _with_teacher_changes(tmp_path, **changes):
    return official_files(tmp_path, MODEL, SIZE, **changes)[0]


def _expanded_full(tmp_path, shapes, args=None):
    """A full checkpoint (teacher only) of stride-0 tensors, optionally with args."""
    entries, storages = expanded_entries(shapes)
    body = frag("teacher") + state_dict_ops(entries)
    if args is not None:
        body += frag("args") + b"cargparse\nNamespace\n)\x81" + frag(args) + b"b"
    return write_pth(tmp_path / "expanded.pth", b"\x80\x02}(" + body + b"u.", storages)


def _full_with(tmp_path, **entries):
    shapes = shapes_of(MODEL, SIZE)
    checkpoint = {"teacher": arrays(shapes), **entries}
    save_pth(checkpoint, tmp_path / "full.pth")
    return tmp_path / "full.pth"


def _file(tmp_path, data: bytes, name="file.pth"):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _truncated(tmp_path):
    data = (FIXTURES / "backbone.pth").read_bytes()
    return _file(tmp_path, data[: len(data) // 3])


def _deep_teacher(tmp_path):
    deep = b"]" * 5000 + b"a" * 4999
    return as_pth(tmp_path / "deep.pth", b"\x80\x02}(" + frag("teacher") + deep + b"u.")


def _huge_pos_embed(tmp_path):
    shapes = dict(shapes_of(MODEL, SIZE))
    shapes["backbone.cls_token"], shapes["backbone.pos_embed"] = (1, 1, 32), (1, 4_000_001, 32)
    return _expanded_full(tmp_path, shapes)


DEEPER = tiny_config(**{"model.depth": 2})
# A custom model of vit_tiny's width and depth, with 4 heads instead of 3.
HEADS_CONFIG = tiny_config(**{"model.embed_dim": 192, "model.depth": 12, "model.num_heads": 4})


def _heads_differ(tmp_path):
    # A vit_tiny-sized file whose args say vit_tiny (3 heads) for HEADS_CONFIG.
    shapes = shapes_of(HEADS_CONFIG.model, SIZE)
    return _expanded_full(tmp_path, shapes, args={"arch": "vit_tiny"})


# name: (how to make the file, what the message must say, the model config it is checked for)
HOSTILE = {
    "not a dict": (lambda p: _file(p, b"\x80\x02]K\x01a."), "expected a dict of tensors", MODEL),
    "a list as the teacher": (
        lambda p: as_pth(p / "l.pth", b"\x80\x02}(" + frag("teacher") + b"]u."),
        "the teacher is a list, not a state dict",
        MODEL,
    ),
    "a number in the state dict": (
        lambda p: save_pth({"cls_token": 3}, p / "n.pth") or p / "n.pth",
        r"entry 'cls_token' that is not a tensor \(int\)",
        MODEL,
    ),
    "another width and depth": (
        lambda p: _other_model(p, **{"model.embed_dim": 32, "model.depth": 2}),
        r"--config\.model\.embed_dim=32 --config\.model\.depth=2",
        MODEL,
    ),
    "another head": (
        lambda p: _other_model(p, **{"model.out_dim": 128, "model.use_bn_in_head": True}),
        r"--config\.model\.out_dim=128 .*--config\.model\.use_bn_in_head=True",
        MODEL,
    ),
    "another crop size": (
        lambda p: _other_model(p, **{"aug.global_size": 32}),
        r"(?s)pos_embed has shape \(1, 65, 16\), expected \(1, 17, 16\).*global_size=32",
        MODEL,
    ),
    "a pos_embed of 4,000,001 positions": (_huge_pos_embed, "claim 128,000,", MODEL),
    "a missing tensor": (
        lambda p: _with_teacher_changes(p, **{"backbone.blocks.0.attn.qkv.weight": None}),
        r"qkv\.weight is missing \(expected \(48, 16\)\)",
        MODEL,
    ),
    "a tensor of another shape": (
        lambda p: _with_teacher_changes(p, **{"head.mlp.0.bias": np.zeros(31, np.float32)}),
        r"head\.mlp\.0\.bias has shape \(31,\), expected \(32,\)",
        MODEL,
    ),
    "int weights": (
        lambda p: _with_teacher_changes(p, **{"backbone.norm.weight": np.zeros(16, np.int32)}),
        "backbone.norm.weight holds int32, not floating point",
        MODEL,
    ),
    "a center of another size": (
        lambda p: _full_with(p, dino_loss={"center": np.zeros((1, 7), np.float32)}),
        r"center has shape \(1, 7\), expected \(1, 64\)",
        MODEL,
    ),
    "a student of another model": (
        lambda p: _full_with(p, student=arrays(shapes_of(DEEPER.model, SIZE))),
        "student: backbone.blocks.1.norm1.weight is not part of the model",
        MODEL,
    ),
    "trained with another number of heads": (
        _heads_differ,
        "vit_tiny with 3 attention heads, the config has 4: set --config.model.num_heads=3",
        HEADS_CONFIG.model,
    ),
    "a truncated zip": (_truncated, "truncated or corrupt zip", MODEL),
    "a memo bomb": (lambda p: _file(p, b"\x80\x02Nr\x00\x00\x00\x20."), "memo index", MODEL),
    "a PNG named .pth": (
        lambda p: _file(p, b"\x89PNG\r\n\x1a\n" + bytes(64)),
        "neither a zip archive nor a pickle",
        MODEL,
    ),
    "a text file": (
        lambda p: _file(p, b"weights: none\n", "w.txt"),
        "not a torch.save file",
        MODEL,
    ),
    "code in the pickle": (
        lambda p: _file(p, b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00lsR."),
        "refused global posix.system",
        MODEL,
    ),
    "deep nesting": (_deep_teacher, "nested more than 100 deep", MODEL),
    "a directory": (lambda p: p, "not a regular file", MODEL),
    "a missing path": (lambda p: p / "none.pth", "No such file or directory", MODEL),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_check_init_from_refuses_with_the_file_and_the_fix(tmp_path, tally, case):
    make, match, model_config = HOSTILE[case]
    path = make(tmp_path)
    with tally.bad_input():
        with pytest.raises(OfficialCheckpointError, match=match) as caught:
            check_init_from(str(path), model_config, SIZE)
        message = str(caught.value)
        assert message.startswith(f"init_from: {path}"), message
        assert isinstance(caught.value, ValueError)


def test_load_official_refuses_what_the_check_refuses(tmp_path, tally):
    """The trainer's load (with the model config) refuses before reading a tensor."""
    path = _with_teacher_changes(tmp_path, **{"head.mlp.0.bias": np.zeros(31, np.float32)})
    refusal = pytest.raises(OfficialCheckpointError, match=r"mlp\.0\.bias has shape \(31,\)")
    with tally.bad_input(), refusal:
        load_official(path, MODEL, img_size=SIZE, optimizer=False)


def test_a_file_must_be_consistent_with_its_own_architecture(tmp_path, tally):
    """Without a config (evaluation, load_backbone) the file's own tensors fix the shapes."""
    shapes = dict(shapes_of(MODEL, SIZE))
    with tally.bad_input():  # a position grid past 256 x 256, with real storage
        grid = architecture.MAX_POS_GRID + 1
        state = arrays({**shapes, "backbone.pos_embed": (1, grid * grid + 1, 16)})
        save_pth({k.removeprefix("backbone."): v for k, v in state.items()}, tmp_path / "g.pth")
        with pytest.raises(OfficialCheckpointError, match="square grid of side g <= 256"):
            load_backbone(tmp_path / "g.pth", num_heads=2)
    with tally.bad_input():  # one block of another width
        state = arrays({**shapes, "backbone.blocks.0.mlp.fc2.weight": (16, 48)})
        save_pth({"teacher": state}, tmp_path / "w.pth")
        with pytest.raises(OfficialCheckpointError, match="do not form one DINO network"):
            load_official(tmp_path / "w.pth")


def _with_optimizer(tmp_path, exp_avg_shape=None):
    shapes = shapes_of(MODEL, SIZE)
    student = collections.OrderedDict(("module." + k, v) for k, v in arrays(shapes).items())
    names = official._adam_names(student, True)
    state = {
        i: {
            "step": np.array(3.0, np.float32),
            "exp_avg": np.zeros(exp_avg_shape or student[n].shape, np.float32),
            "exp_avg_sq": np.zeros(student[n].shape, np.float32),
        }
        for i, n in enumerate(names)
    }
    optimizer = {"state": state, "param_groups": [{"params": list(range(len(names)))}]}
    checkpoint = {"student": student, "teacher": arrays(shapes), "optimizer": optimizer}
    save_pth(checkpoint, tmp_path / "adam.pth")
    return tmp_path / "adam.pth", len(names)


def test_only_the_tensors_used_are_read(tmp_path, monkeypatch):
    path, n_params = _with_optimizer(tmp_path)
    read = counting_reads(monkeypatch)
    n_tensors = len(shapes_of(MODEL, SIZE))
    load_official(path, MODEL, img_size=SIZE, optimizer=False)  # the trainer's load
    assert len(read) == 2 * n_tensors  # teacher and student; no AdamW state
    read.clear()
    ckpt = load_official(path, optimizer=True)
    assert len(read) == 2 * n_tensors + 3 * n_params and len(ckpt.adam) == n_params


def test_optimizer_state_of_another_shape_is_refused(tmp_path, tally):
    path, _ = _with_optimizer(tmp_path, exp_avg_shape=(1_000_000,))
    refusal = pytest.raises(OfficialCheckpointError, match="optimizer state 'exp_avg' of")
    with tally.bad_input(), refusal:
        load_official(path, optimizer=True)
    load_official(path, MODEL, img_size=SIZE, optimizer=False)  # not read when not needed


def test_weights_that_are_views_into_larger_storages_are_refused(tmp_path, tally, monkeypatch):
    shapes = shapes_of(MODEL, SIZE)
    total = sum(int(np.prod(s)) for s in shapes.values())
    entries, offset = {}, 0
    for name, shape in shapes.items():
        strides = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
        entries[name] = tensor_ops("FloatStorage", "0", 3 * total, offset, shape, strides)
        offset += int(np.prod(shape))
    path = write_pth(tmp_path / "flat.pth", dict_pkl(entries), {"0": bytes(12 * total)})
    assert load_official(path).teacher["backbone"]["cls_token"].shape == (1, 1, 16)
    monkeypatch.setattr(official, "STORAGE_OVERHEAD_SLACK", 0)
    refusal = pytest.raises(OfficialCheckpointError, match="views into storages of")
    with tally.bad_input(), refusal:
        check_init_from(str(path), MODEL, SIZE)
