"""Official checkpoints: import, run, export and re-import (checkpoint.pth, backbone.pth)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import nchw_to_nhwc

from dino_jax.interop.official import (
    infer_backbone,
    infer_head,
    load_backbone,
    load_official,
    official_state_dict,
    save_official_backbone,
    save_official_checkpoint,
)
from dino_jax.interop.pth import UnsafeCheckpointError, load_pth
from dino_jax.interop.state_dict import from_state_dict
from dino_jax.models import DINOHead, MultiCropNetwork, VisionTransformer


@pytest.fixture(scope="module")
def steps(fixtures_dir):
    return np.load(fixtures_dir / "train_steps.npz")


@pytest.fixture(scope="module")
def ckpt(fixtures_dir):
    return load_official(fixtures_dir / "checkpoint.pth", optimizer=True)


def network(ckpt):
    arch = infer_backbone(ckpt.teacher["backbone"], num_heads=2)
    return MultiCropNetwork(
        backbone=VisionTransformer(**arch), head=DINOHead(**infer_head(ckpt.teacher["head"]))
    )


def test_import_gives_the_official_arrays(ckpt, steps):
    for which, tree, prefix in [
        ("teacher", ckpt.teacher, ""),
        ("student", ckpt.student, "module."),
    ]:
        state = official_state_dict(tree, prefix)
        for name, value in state.items():
            np.testing.assert_array_equal(value, steps[f"out/step3/{which}/{name}"], err_msg=name)
    np.testing.assert_array_equal(ckpt.center, steps["out/step3/center"])
    assert ckpt.epoch == 2 and ckpt.args.patch_size == 8 and ckpt.args.out_dim == 128
    assert infer_head(ckpt.teacher["head"]) == dict(
        nlayers=3, hidden_dim=64, bottleneck_dim=32, out_dim=128, use_bn=False
    )


def test_imported_teacher_reproduces_official_outputs(ckpt, steps):
    """The official run records the teacher's batch-mean output through the center update:
    c_3 = 0.9 c_2 + 0.1 mean(teacher_2(crops_3)). Our forward of the official teacher matches
    it, and the imported checkpoint runs the same network."""
    model = network(ckpt)
    crops = [nchw_to_nhwc(steps[f"in/step3/crop{c}"]) for c in range(2)]
    globals_ = jnp.stack(crops, axis=1)
    teacher_2 = {
        k[len("out/step2/teacher/") :]: steps[k]
        for k in steps.files
        if k.startswith("out/step2/teacher/")
    }
    params_2, _ = from_state_dict(teacher_2)
    logits = model.apply({"params": params_2}, [globals_])  # (2, B, K)
    official_mean = (steps["out/step3/center"] - 0.9 * steps["out/step2/center"]) / 0.1
    ours_mean = np.asarray(logits).mean(axis=(0, 1))[None]
    assert np.max(np.abs(ours_mean - official_mean)) <= 1e-5 * np.abs(official_mean).max() + 2e-7
    # and the imported checkpoint gives exactly the network built from the fixture arrays
    teacher_3 = {
        k[len("out/step3/teacher/") :]: steps[k]
        for k in steps.files
        if k.startswith("out/step3/teacher/")
    }
    ours = model.apply({"params": ckpt.teacher}, [globals_])
    ref = model.apply({"params": from_state_dict(teacher_3)[0]}, [globals_])
    np.testing.assert_array_equal(ours, ref)


def test_adam_state_imported_by_name(ckpt, steps):
    assert len(ckpt.adam) == 37  # weight_g is frozen: not in the optimiser
    for name, state in ckpt.adam.items():
        np.testing.assert_array_equal(state["exp_avg"], steps[f"out/adamw/exp_avg/{name}"])
        np.testing.assert_array_equal(state["exp_avg_sq"], steps[f"out/adamw/exp_avg_sq/{name}"])
        assert float(state["step"]) == float(steps[f"out/adamw/step/{name}"])


def test_checkpoint_round_trip_is_lossless(ckpt, fixtures_dir, tmp_path):
    out = tmp_path / "exported.pth"
    save_official_checkpoint(
        out,
        student=ckpt.student,
        teacher=ckpt.teacher,
        center=ckpt.center,
        epoch=ckpt.epoch,
        args=ckpt.args,
    )
    original, exported = load_pth(fixtures_dir / "checkpoint.pth"), load_pth(out)
    for key in ("student", "teacher", "dino_loss"):
        assert list(exported[key]) == list(original[key]), key
        for name, value in original[key].items():
            assert (
                exported[key][name].shape == value.shape
                and exported[key][name].dtype == value.dtype
            )
            np.testing.assert_array_equal(exported[key][name], value)
    assert vars(exported["args"]) == vars(original["args"])
    again = load_official(out)
    for a, b in [(again.teacher, ckpt.teacher), (again.student, ckpt.student)]:
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_backbone_round_trip_and_load_backbone(fixtures_dir, tmp_path):
    official = load_pth(fixtures_dir / "backbone.pth")
    model, variables = load_backbone(fixtures_dir / "backbone.pth", num_heads=2)
    assert (model.embed_dim, model.depth, model.patch_size, model.img_size) == (32, 2, 8, 32)
    out = tmp_path / "backbone.pth"
    save_official_backbone(out, {"backbone": variables["params"]})
    exported = load_pth(out)
    assert list(exported) == list(official)
    for name, value in official.items():
        np.testing.assert_array_equal(exported[name], value)
    x = jax.random.normal(jax.random.key(0), (2, 48, 32, 3))  # non-square, interpolated
    feats = model.apply(variables, x, return_attention=True)
    assert feats.cls.shape == (2, 32) and feats.attention.shape == (2, 2, 25, 25)


def test_heads_needed_when_the_width_is_not_official(fixtures_dir):
    with pytest.raises(ValueError, match="num_heads"):
        load_backbone(fixtures_dir / "backbone.pth")


def test_crafted_checkpoint_is_refused(tmp_path):
    import zipfile

    marker = tmp_path / "pwned"
    payload = (
        b"\x80\x02cposix\nsystem\nq\x00X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_official(path)
    assert not marker.exists()
