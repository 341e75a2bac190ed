"""k-NN and the linear probe on ResNet and XCiT features: from a work directory (the teacher's
BatchNorm running statistics restored with its parameters) and from an official ResNet file;
attention maps, a ViT's alone, are refused for them."""

import jax
import numpy as np
import pytest
from helpers.tiny import SMALL_EVAL_DATA, TINY_RESNET, TINY_XCIT, tiny_eval_config
from PIL import Image

from dino_jax.evaluate.cli import evaluate
from dino_jax.evaluate.weights import load_weights
from dino_jax.interop.pth_write import save_pth
from dino_jax.trainer import train

BACKBONES = {"resnet": TINY_RESNET, "xcit": TINY_XCIT}
EVAL_DATA = [
    "--config.data.eval_train_split=test",
    "--config.data.eval_test_split=test",
    "--config.eval.knn_max_train=200",
    "--config.eval.knn_ks=5,10",
]


def config_for(name):
    c = tiny_eval_config(2)
    for key, value in BACKBONES[name].items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def workdir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    result = train(config_for(request.param), str(path))
    assert result.status == "max_steps"
    return request.param, path, jax.device_get(result.state)


def test_work_directory_gives_the_teacher_with_its_running_statistics(workdir):
    _, path, state = workdir
    backbone, variables, info = load_weights(path)
    stats = state.teacher_stats["backbone"]
    assert jax.tree.structure(variables["batch_stats"]) == jax.tree.structure(stats)
    for ours, saved in zip(
        jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(stats), strict=True
    ):
        np.testing.assert_array_equal(ours, saved)
    assert info.patch_size == 1  # any input size
    images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    eval_mode = backbone.apply(variables, images).feature
    # the running statistics are what evaluation normalises with (not the batch's)
    batch_mode, _ = backbone.apply(
        variables, images, use_running_average=False, mutable=["batch_stats"]
    )
    assert not np.allclose(eval_mode, batch_mode.feature, atol=1e-4)
    single = backbone.apply(variables, images[:1]).feature
    np.testing.assert_allclose(single, eval_mode[:1], rtol=1e-5, atol=1e-6)


def test_knn_and_linear_probe_of_a_work_directory(workdir, tmp_path, capsys):
    _, path, _ = workdir
    knn = evaluate(["knn", "--weights", str(path), *EVAL_DATA])
    assert knn["bank"] == 200 and 0.0 <= knn["metrics"]["knn/top1"] <= 100.0
    linear = evaluate(
        [
            "linear",
            "--weights",
            str(path),
            *EVAL_DATA,
            "--config.linear.epochs=1",
            "--config.linear.steps_per_epoch=2",
            "--config.linear.batch_size=16",
        ]
    )
    name = workdir[0]
    # eval_linear.py's features of a ResNet or XCiT: the backbone's output (n_last_blocks is
    # a ViT setting)
    assert linear["feature_dim"] == {"resnet": 4 * 8, "xcit": 16}[name]
    assert 0.0 <= linear["best_top1"] <= 100.0
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "attention"
    with pytest.raises(SystemExit) as exit_info:
        evaluate(["attention", "--weights", str(path), "--image", str(image), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "attention maps need DINO's ViT" in err, err
    assert not out.exists()


def test_knn_of_an_official_resnet_backbone(tmp_path, fixtures_dir):
    # the backbone of resnet.npz (official torchvision layout, BatchNorm buffers included),
    # written as a *_pretrain.pth
    with np.load(fixtures_dir / "resnet.npz") as data:
        state = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    backbone_state = {k: v for k, v in state.items() if not k.startswith("head/")}
    path = tmp_path / "resnet_pretrain.pth"
    save_pth(backbone_state, path)
    backbone, variables, _ = load_weights(path)
    assert type(backbone).__name__ == "ResNet" and backbone.embed_dim == 512
    assert set(variables) == {"params", "batch_stats"}
    result = evaluate(["knn", "--weights", str(path), *SMALL_EVAL_DATA, "--config.eval.knn_ks=5"])
    assert result["source"] == "pth" and result["bank"] == 64
