"""Official ResNet and XCiT weights in and out: a released-style backbone file (`resnet.npz`,
`xcit.npz`) and a full checkpoint of an official ResNet run (`resnet_train_steps.npz`, after
its third step), written with our torch.save writer under the official names. Imported, every
parameter and BatchNorm buffer lands at its documented place and layout (buffers in the Flax
`batch_stats` collection), exported again it is the same file (names, order, dtypes, values),
and a file of another architecture is refused with the settings that would fit it. (Forward
parity with these weights is tested in test_resnet_parity.py / test_xcit_parity.py.)"""

import argparse
import collections
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import tiny_config

from dino_jax.interop import architecture
from dino_jax.interop.architecture import Head, ResNetArchitecture, XCiTArchitecture
from dino_jax.interop.official import (
    OfficialCheckpointError,
    check_init_from,
    load_backbone,
    load_official,
    official_state_dict,
    save_official_backbone,
    save_official_checkpoint,
)
from dino_jax.interop.pth import load_pth, save_pth
from dino_jax.interop.state_dict import from_state_dict, to_state_dict
from dino_jax.models import DINOHead
from dino_jax.models.resnet import ResNet
from dino_jax.models.xcit import XCiT

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
STEP = 2  # the run's last recorded step: student and teacher buffers differ by then

# The fixtures' architectures (their README sections).
RESNET = ResNetArchitecture(16, (16, 32, 64, 128), (1, 1, 1, 1))
XCIT = XCiTArchitecture(embed_dim=48, depth=2, num_heads=4, patch_size=16, mlp_hidden=192)
RUN = ResNetArchitecture(4, (4, 8, 16, 32), (1, 1, 1, 1), Head(3, 32, 16, 64, False))


def resnet_config(arch="resnet", stem=None, widths=None, depths=None):
    return tiny_config(
        **{
            "model.arch": arch,
            "model.embed_dim": None,
            "model.depth": None,
            "model.num_heads": None,
            "model.drop_path_rate": 0.0,
            "model.resnet_stem_width": stem,
            "model.resnet_widths": widths,
            "model.resnet_depths": depths,
        }
    )


RUN_CONFIG = resnet_config(stem=4, widths=(4, 8, 16, 32), depths=(1, 1, 1, 1))


def xcit_config(**changes):
    xcit = {"arch": "xcit", "embed_dim": 48, "depth": 2, "num_heads": 4, "patch_size": 16}
    return tiny_config(**{**{f"model.{k}": v for k, v in xcit.items()}, **changes})


XCIT_CONFIG = xcit_config()


def entries(data, prefix: str) -> collections.OrderedDict:
    """The fixture's state dict under `prefix` (its order is the official state-dict order)."""
    n = len(prefix)
    return collections.OrderedDict(
        (k[n:], data[k]) for k in data.files if k.startswith(prefix) and "/" not in k[n:]
    )


@pytest.fixture(scope="module")
def backbones():
    """name -> (the official backbone state dict, its architecture, its Flax module)."""
    return {
        "resnet": (
            entries(np.load(FIXTURES / "resnet.npz"), "param/"),
            RESNET,
            ResNet(stem_width=16, widths=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
        ),
        "xcit": (
            entries(np.load(FIXTURES / "xcit.npz"), "param/"),
            XCIT,
            XCiT(patch_size=16, embed_dim=48, depth=2, num_heads=4),
        ),
    }


@pytest.fixture(scope="module")
def backbone_files(backbones, tmp_path_factory):
    """name -> a *_pretrain.pth-style file (no prefixes) of that backbone."""
    directory = tmp_path_factory.mktemp("backbones")
    files = {}
    for name, (state, _, _) in backbones.items():
        save_pth(state, directory / f"{name}_pretrain.pth")
        files[name] = directory / f"{name}_pretrain.pth"
    return files


@pytest.fixture(scope="module")
def run():
    return np.load(FIXTURES / "resnet_train_steps.npz")


@pytest.fixture(scope="module")
def run_file(run, tmp_path_factory):
    """The checkpoint.pth main_dino.py saves after the run's step 2: the student and, since
    the network has BatchNorm, the DDP-wrapped teacher with `module.` names; the SGD
    momentum buffers keyed by position in the param groups."""
    student = entries(run, f"out/step{STEP}/student/")
    teacher = collections.OrderedDict(
        ("module." + k, v) for k, v in entries(run, f"out/step{STEP}/teacher/").items()
    )
    groups = run_groups(run)
    names = [*groups[0], *groups[1]]
    state = {
        i: {"momentum_buffer": run[f"out/step{STEP}/momentum_buffer/{n}"]}
        for i, n in enumerate(names)
        if f"out/step{STEP}/momentum_buffer/{n}" in run.files
    }
    start = len(groups[0])
    param_groups = [{"params": list(range(start))}, {"params": list(range(start, len(names)))}]
    checkpoint = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": state, "param_groups": param_groups},
        "epoch": STEP // 2 + 1,
        "args": argparse.Namespace(arch="resnet50", norm_last_layer=True, out_dim=64),
        "dino_loss": {"center": run[f"out/step{STEP}/center"]},
    }
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    save_pth(checkpoint, path)
    return path


def run_groups(run) -> list[list[str]]:
    """The student's parameter names in the order of the optimiser's two param groups."""
    return json.loads(str(run["meta"]))["optimizer"]["group_param_names"]


def documented_place(name: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray]:
    """(collection, path, array) where an official entry belongs, as the layout conventions
    state it: Sequential indices join their module (`proj.0.0` -> `proj_0_0`), conv OIHW ->
    HWIO, Linear [out, in] -> [in, out], a 1-D weight is a norm's scale, BatchNorm buffers go
    to batch_stats as mean / var / count (int32), everything else is kept as it is."""
    *modules, leaf = name.split(".")
    path = tuple(re.sub(r"\.(\d+)", r"_\1", ".".join(modules)).split(".")) if modules else ()
    stats = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}
    if leaf in stats:
        array = value.astype(np.int32) if leaf == "num_batches_tracked" else value
        return "batch_stats", (*path, stats[leaf]), array
    if leaf == "weight" and value.ndim == 4:
        return "params", (*path, "kernel"), value.transpose(2, 3, 1, 0)
    if leaf == "weight" and value.ndim == 2:
        return "params", (*path, "kernel"), value.T
    if leaf == "weight" and value.ndim == 1:
        return "params", (*path, "scale"), value
    if leaf in ("weight_g", "weight_v"):
        return "params", (*path, leaf), value.T
    return "params", (*path, leaf), value


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def assert_documented_places(state, trees: dict, prefix: str = "") -> None:
    """Every entry of `state` (names after `prefix`) is at its documented place in `trees`
    ({'params': ..., 'batch_stats': ...}) with its exact value and dtype, and nothing else is."""
    count = 0
    for name, value in state.items():
        collection, path, expected = documented_place(name.removeprefix(prefix), value)
        ours = np.asarray(at(trees[collection], path))
        assert ours.dtype == expected.dtype, (name, ours.dtype)
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        count += 1
    assert sum(len(jax.tree.leaves(t)) for t in trees.values()) == count


# Examples of the convention, written out: official name -> (collection/path, Flax shape).
EXAMPLES = {
    "resnet": {
        "conv1.weight": ("params/conv1/kernel", (7, 7, 3, 16)),
        "bn1.weight": ("params/bn1/scale", (16,)),
        "bn1.running_mean": ("batch_stats/bn1/mean", (16,)),
        "layer1.0.bn3.running_var": ("batch_stats/layer1_0/bn3/var", (64,)),
        "layer2.0.conv2.weight": ("params/layer2_0/conv2/kernel", (3, 3, 32, 32)),
        "layer2.0.downsample.0.weight": ("params/layer2_0/downsample_0/kernel", (1, 1, 64, 128)),
        "layer4.0.downsample.1.bias": ("params/layer4_0/downsample_1/bias", (512,)),
        "layer4.0.downsample.1.num_batches_tracked": (
            "batch_stats/layer4_0/downsample_1/count",
            (),
        ),
    },
    "xcit": {
        "patch_embed.proj.0.0.weight": ("params/patch_embed/proj_0_0/kernel", (3, 3, 3, 6)),
        "patch_embed.proj.2.1.weight": ("params/patch_embed/proj_2_1/scale", (12,)),
        "patch_embed.proj.6.1.running_var": ("batch_stats/patch_embed/proj_6_1/var", (48,)),
        "blocks.0.local_mp.conv1.weight": ("params/blocks_0/local_mp/conv1/kernel", (3, 3, 1, 48)),
        "blocks.1.local_mp.bn.num_batches_tracked": ("batch_stats/blocks_1/local_mp/bn/count", ()),
        "blocks.1.attn.temperature": ("params/blocks_1/attn/temperature", (4, 1, 1)),
        "blocks.0.gamma3": ("params/blocks_0/gamma3", (48,)),
        "cls_attn_blocks.1.attn.qkv.weight": (
            "params/cls_attn_blocks_1/attn/qkv/kernel",
            (48, 144),
        ),
        "pos_embeder.token_projection.weight": (
            "params/pos_embeder/token_projection/kernel",
            (1, 1, 64, 48),
        ),
    },
}


@pytest.mark.parametrize("name", ["resnet", "xcit"])
def test_backbone_file_imports_params_and_batch_stats_at_their_places(
    name, backbones, backbone_files
):
    state, arch, _ = backbones[name]
    ckpt = load_official(backbone_files[name])
    assert ckpt.architecture == arch and ckpt.student is None
    trees = {"params": ckpt.teacher["backbone"], "batch_stats": ckpt.teacher_stats["backbone"]}
    assert set(ckpt.teacher) == set(ckpt.teacher_stats) == {"backbone"}
    assert_documented_places(state, trees)
    for official, (place, shape) in EXAMPLES[name].items():
        ours = at(trees, place.split("/"))
        assert ours.shape == shape, official
        assert ours.dtype == (np.int32 if place.endswith("count") else np.float32), official
    # the value check tells layouts of the same shape apart: HWIO is no H/W-swapped kernel
    official, (place, _) = next(iter(EXAMPLES[name].items()))
    assert not np.array_equal(at(trees, place.split("/")), state[official].transpose(3, 2, 1, 0))


@pytest.mark.parametrize("name", ["resnet", "xcit"])
def test_imported_trees_are_those_of_our_module(name, backbones, backbone_files):
    """Names, shapes and dtypes of the import are exactly the variables our ResNet / XCiT
    create, and load_backbone builds that module from the file alone."""
    _, _, module = backbones[name]
    x = jnp.zeros((1, 32, 32, 3))
    built = jax.eval_shape(module.init, jax.random.key(0), x)
    model, variables = load_backbone(backbone_files[name])
    assert type(model) is type(module)
    for field in ("stem_width", "widths", "depths", "patch_size", "embed_dim", "depth"):
        assert getattr(model, field, None) == getattr(module, field, None), field
    spec = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), built)
    ours = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), variables)
    assert ours == spec


@pytest.mark.parametrize("name", ["resnet", "xcit"])
def test_expected_shapes_are_the_official_state_dict(name, backbones):
    """The architecture's expected entries are the official state dict's, in its order, and
    the architecture read off the file's shapes is the one it was built with."""
    state, arch, _ = backbones[name]
    found = {f"backbone.{k}": v.shape for k, v in state.items()}
    assert list(architecture.state_shapes(arch).items()) == list(found.items())
    assert architecture.from_state_shapes(found) == arch


@pytest.mark.parametrize(
    "config",
    [
        RUN_CONFIG,
        # a stem as wide as layer1's output: torchvision gives layer1.0 no downsample then
        resnet_config(stem=16, widths=(4, 8, 16, 32), depths=(2, 1, 1, 1)),
        xcit_config(**{"model.use_bn_in_head": True}),
        xcit_config(**{"model.patch_size": 8}),
    ],
    ids=["resnet", "resnet-wide-stem", "xcit-bn-head", "xcit-p8"],
)
def test_expected_shapes_are_those_of_the_built_network(config):
    """What check_init_from expects of a configured ResNet / XCiT is what recipe builds."""
    from dino_jax import recipe

    network = recipe.build_network(config)
    crops = [jnp.zeros((1, 2, config.aug.global_size, config.aug.global_size, 3))]
    built = jax.eval_shape(lambda key: network.init(key, crops), jax.random.key(0))
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), built)
    state = official_state_dict(zeros["params"], batch_stats=zeros["batch_stats"])
    expected = architecture.state_shapes(architecture.from_model_config(config.model))
    assert [(name, value.shape) for name, value in state.items()] == list(expected.items())


def test_resnet50_has_torchvision_resnet50_shapes():
    """23,508,032 parameters: torchvision's resnet50 (25,557,032) without its 2048 -> 1000 fc."""
    m = resnet_config("resnet50").model
    arch = architecture.from_model_config(m)
    assert (arch.stem_width, arch.widths, arch.depths) == (64, (64, 128, 256, 512), (3, 4, 6, 3))
    assert arch.embed_dim == 2048
    shapes = architecture.state_shapes(ResNetArchitecture(64, arch.widths, arch.depths))
    params = [s for n, s in shapes.items() if n.rsplit(".", 1)[-1] in ("weight", "bias")]
    assert sum(int(np.prod(s)) for s in params) == 23_508_032
    assert architecture.describe(arch).startswith("resnet50 (stem 64")


@pytest.mark.parametrize("name", ["resnet", "xcit"])
def test_backbone_export_is_the_official_file_again(name, backbones, backbone_files, tmp_path):
    state, _, _ = backbones[name]
    ckpt = load_official(backbone_files[name])
    out = tmp_path / "exported.pth"
    save_official_backbone(out, ckpt.teacher, ckpt.teacher_stats)
    exported = load_pth(out)
    assert list(exported) == list(state)  # official names, in PyTorch's order
    assert list(state) != sorted(state)  # (an order the comparison can tell apart)
    for key, value in state.items():
        assert exported[key].dtype == value.dtype, key  # num_batches_tracked: int64
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = load_official(out)
    jax.tree.map(np.testing.assert_array_equal, again.teacher, ckpt.teacher)
    jax.tree.map(np.testing.assert_array_equal, again.teacher_stats, ckpt.teacher_stats)


def test_resnet_run_checkpoint_imports_both_networks_with_their_own_stats(run, run_file):
    ckpt = load_official(run_file, optimizer=True)
    assert ckpt.architecture == RUN and ckpt.epoch == 2 and ckpt.args.arch == "resnet50"
    for which, prefix in [("teacher", ""), ("student", "module.")]:
        state = entries(run, f"out/step{STEP}/{which}/")
        trees = {"params": getattr(ckpt, which), "batch_stats": getattr(ckpt, which + "_stats")}
        assert_documented_places(state, trees, prefix)
        assert set(trees["batch_stats"]) == {"backbone"}  # this run's head has no BatchNorm
    teacher, student = ckpt.teacher_stats["backbone"], ckpt.student_stats["backbone"]
    assert teacher["bn1"]["count"] == STEP + 1 and student["bn1"]["count"] == 2 * (STEP + 1)
    assert not np.array_equal(teacher["bn1"]["mean"], student["bn1"]["mean"])
    np.testing.assert_array_equal(ckpt.center, run[f"out/step{STEP}/center"])
    model, variables = load_backbone(run_file, which="student")
    assert isinstance(model, ResNet) and model.widths == RUN.widths
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], student)
    # SGD's momentum buffers by parameter name: BatchNorm buffers are not parameters
    groups = run_groups(run)
    with_state = [
        n for n in [*groups[0], *groups[1]] if f"out/step{STEP}/momentum_buffer/{n}" in run
    ]
    assert list(ckpt.adam) == with_state and len(with_state) == 58
    for name, state in ckpt.adam.items():
        expected = run[f"out/step{STEP}/momentum_buffer/{name}"]
        np.testing.assert_array_equal(state["momentum_buffer"], expected, err_msg=name)


def test_resnet_run_checkpoint_exports_to_the_same_file(run_file, tmp_path):
    ckpt = load_official(run_file)
    out = tmp_path / "exported.pth"
    save_official_checkpoint(
        out,
        student=ckpt.student,
        teacher=ckpt.teacher,
        student_stats=ckpt.student_stats,
        teacher_stats=ckpt.teacher_stats,
        center=ckpt.center,
        epoch=ckpt.epoch,
        args=ckpt.args,
    )
    original, exported = load_pth(run_file), load_pth(out)
    for key in ("student", "teacher", "dino_loss"):
        assert list(exported[key]) == list(original[key]), key
        for name, value in original[key].items():
            assert exported[key][name].dtype == value.dtype, name
            np.testing.assert_array_equal(exported[key][name], value, err_msg=name)
    assert all(name.startswith("module.backbone.") for name in list(exported["teacher"])[:5])
    assert exported["epoch"] == original["epoch"] and vars(exported["args"]) == vars(ckpt.args)
    again = load_official(out)
    for ours, theirs in [
        (again.teacher, ckpt.teacher),
        (again.student, ckpt.student),
        (again.teacher_stats, ckpt.teacher_stats),
        (again.student_stats, ckpt.student_stats),
    ]:
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_the_teacher_is_prefixed_exactly_when_the_network_has_batch_norm(tmp_path):
    """The official code wraps the teacher in DDP only when the network has BatchNorm: a ViT
    with a plain head keeps `backbone.*`, one with BatchNorm in its head gets `module.`."""
    from dino_jax import recipe

    for use_bn, prefix in [(False, "backbone."), (True, "module.backbone.")]:
        c = tiny_config(**{"model.use_bn_in_head": use_bn})
        crops = [jnp.zeros((1, 2, c.aug.global_size, c.aug.global_size, 3))]
        variables = recipe.build_network(c).init(jax.random.key(0), crops)
        stats = variables.get("batch_stats", {})
        assert bool(stats) == use_bn
        kw = dict(student=variables["params"], teacher=variables["params"], epoch=0)
        save_official_checkpoint(
            tmp_path / "c.pth", **kw, center=np.zeros(64), student_stats=stats, teacher_stats=stats
        )
        saved = load_pth(tmp_path / "c.pth")
        assert next(iter(saved["teacher"])).startswith(prefix)
        assert next(iter(saved["student"])).startswith("module.backbone.")


def test_batch_norm_head_round_trips_through_the_mechanical_mapping():
    """DINOHead with use_bn (resnet.npz's head): BatchNorm1d at mlp.1 / mlp.4, its buffers
    in batch_stats, back to the same names, order and dtypes; the trees fit our DINOHead."""
    state = entries(np.load(FIXTURES / "resnet.npz"), "param/head/")
    params, stats = from_state_dict(state)
    assert_documented_places(state, {"params": params, "batch_stats": stats})
    assert set(stats) == {"mlp_1", "mlp_4"}
    back = to_state_dict(params, batch_stats=stats)
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    head = DINOHead(out_dim=64, use_bn=True, nlayers=3, hidden_dim=64, bottleneck_dim=32)
    built = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((2, 2048)))
    shapes = jax.tree.map(np.shape, {"params": params, "batch_stats": stats})
    assert jax.tree.map(lambda a: a.shape, built) == shapes


def test_a_backbone_without_its_batch_stats_is_not_exported(backbone_files):
    ckpt = load_official(backbone_files["resnet"])
    with pytest.raises(ValueError, match="ResNet has BatchNorm layers but no running stat"):
        official_state_dict(ckpt.teacher)
    official_state_dict(ckpt.teacher, batch_stats=ckpt.teacher_stats)


def test_a_fitting_config_checks_and_loads(run_file, backbone_files):
    check_init_from(str(run_file), RUN_CONFIG.model, RUN_CONFIG.aug.global_size)
    ckpt = load_official(run_file, RUN_CONFIG.model, img_size=RUN_CONFIG.aug.global_size)
    assert set(ckpt.teacher_stats) == {"backbone"}
    check_init_from(str(backbone_files["xcit"]), XCIT_CONFIG.model, XCIT_CONFIG.aug.global_size)


def _edited(state, path, **changes):
    state = collections.OrderedDict(state)
    for name, value in changes.items():
        if value is None:
            state.pop(name)
        else:
            state[name] = value
    save_pth(state, path)
    return path


XCIT_IN_RESNET = "(?s)an XCiT backbone, the configured model is a ResNet.*--config.model.arch=xcit"
REFUSED = {
    # name: (the file, the config it is checked for, what the message must say)
    "a ResNet file for an XCiT": (
        lambda files, p: files["resnet"],
        XCIT_CONFIG,
        r"(?s)a ResNet backbone, the configured model is an XCiT\n.*The file holds a ResNet "
        r"\(stem 16.*--config\.model\.arch=resnet --config\.model\.resnet_stem_width=16 "
        r"--config\.model\.resnet_widths=\(16,32,64,128\) "
        r"--config\.model\.resnet_depths=\(1,1,1,1\)",
    ),
    "a ResNet file for a ViT": (
        lambda files, p: files["resnet"],
        tiny_config(),
        r"(?s)a ResNet backbone, the configured model is a ViT.*drop_path_rate=0\.0",
    ),
    "an XCiT file for a ResNet": (
        lambda files, p: files["xcit"],
        RUN_CONFIG,
        XCIT_IN_RESNET + r" --config\.model\.embed_dim=48 --config\.model\.depth=2 "
        r"--config\.model\.num_heads=4 --config\.model\.patch_size=16",
    ),
    "a ViT file for a ResNet": (
        lambda files, p: FIXTURES / "backbone.pth",
        RUN_CONFIG,
        r"a ViT backbone, the configured model is a ResNet",
    ),
    "a small ResNet for resnet50": (
        lambda files, p: files["resnet"],
        resnet_config("resnet50"),
        r"(?s)resnet50 \(stem 64.*backbone\.conv1\.weight has shape \(16, 3, 7, 7\), expected "
        r"\(64, 3, 7, 7\).*--config\.model\.arch=resnet ",
    ),
    "an XCiT of 8 heads for 4": (
        lambda files, p: _edited(
            load_pth(files["xcit"]),
            p / "heads.pth",
            **{f"blocks.{i}.attn.temperature": np.ones((8, 1, 1), np.float32) for i in (0, 1)},
        ),
        XCIT_CONFIG,
        r"(?s)blocks\.0\.attn\.temperature has shape \(8, 1, 1\), expected \(4, 1, 1\).*"
        r"--config\.model\.num_heads=8",
    ),
    "a missing BatchNorm buffer": (
        lambda files, p: _edited(
            load_pth(files["resnet"]), p / "missing.pth", **{"layer3.0.bn2.running_var": None}
        ),
        resnet_config(stem=16, widths=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
        r"backbone\.layer3\.0\.bn2\.running_var is missing \(expected \(64,\)\)",
    ),
    "a float batch count": (
        lambda files, p: _edited(
            load_pth(files["xcit"]),
            p / "count.pth",
            **{"blocks.0.local_mp.bn.num_batches_tracked": np.zeros((), np.float32)},
        ),
        XCIT_CONFIG,
        r"num_batches_tracked holds float32, not an integer count",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_another_architecture_is_refused_with_the_settings_that_fit(
    case, backbone_files, tmp_path, tally
):
    make, config, match = REFUSED[case]
    path = make(backbone_files, tmp_path)
    with tally.bad_input():
        with pytest.raises(OfficialCheckpointError, match=match) as caught:
            check_init_from(str(path), config.model, config.aug.global_size)
        assert str(caught.value).startswith(f"init_from: {path} does not fit the configured")
        with pytest.raises(OfficialCheckpointError, match=match):
            load_official(path, config.model, img_size=config.aug.global_size)


def test_a_resnet_inconsistent_with_itself_is_refused(backbones, tmp_path, tally):
    """Without a config (evaluation, load_backbone) the file's own stem and block widths fix
    every shape; a block of another width does not form one network."""
    state, _, _ = backbones["resnet"]
    path = _edited(state, tmp_path / "w.pth", **{"layer2.0.conv3.weight": np.ones((96, 32, 1, 1))})
    with tally.bad_input():
        with pytest.raises(OfficialCheckpointError, match="do not form one DINO network") as err:
            load_backbone(path)
        assert "layer2.0.conv3.weight has shape (96, 32, 1, 1), expected (128, 32, 1, 1)" in str(
            err.value
        )


def test_a_batch_count_out_of_range_is_refused(backbones, tmp_path, tally):
    state, _, _ = backbones["xcit"]
    bad = {"patch_embed.proj.0.1.num_batches_tracked": np.array(-3, np.int64)}
    path = _edited(state, tmp_path / "n.pth", **bad)
    with tally.bad_input(), pytest.raises(OfficialCheckpointError, match="is not a batch count"):
        load_official(path)
