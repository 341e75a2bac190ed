"""The DINOv3-style demo recipe (DINOv3's RoPE ViT with storage tokens, LayerScale, SwiGLU
and RoPE coordinate rescaling; Sinkhorn-Knopp, KoLeo, iBOT and Gram anchoring) trains on the
bundled data, resumes exactly, matches on 8 devices and 1, draws its RoPE augmentation in the
student only, and evaluates (k-NN, the linear probe's features)."""

import functools

import jax
import numpy as np
import pytest
from helpers.states import assert_states_equal, steps_on_meshes
from helpers.tiny import demo_recipe

from dino_jax import parallel, recipe
from dino_jax.evaluate.cli import evaluate
from dino_jax.evaluate.features import backbone_features
from dino_jax.evaluate.knn_eval import knn_evaluation
from dino_jax.models.vit3 import VisionTransformer3
from dino_jax.state import backbone_variables
from dino_jax.train_step import dino_update
from dino_jax.trainer import train

# at test size, with a shallower network and the Gram term on within the tests' few steps
SMALL = {"model.depth": 2, "dino.gram_start_step": 2, "dino.gram_update_every": 2}


def config(**overrides):
    return demo_recipe("demo_dinov3", **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(straight 5 steps, 3 steps then resumed to 5, the resumed run's work directory)."""
    base = tmp_path_factory.mktemp("dinov3")
    straight = train(config(**{"train.max_steps": 5}), str(base / "a"))
    train(config(**{"train.max_steps": 3}), str(base / "b"))
    resumed = train(config(**{"train.max_steps": 5}), str(base / "b"))
    return straight, resumed, base / "b"


def test_the_recipe_trains_and_resumes_exactly(runs):
    straight, resumed, _ = runs
    assert int(resumed.state.step) == 5
    assert_states_equal(straight.state, resumed.state)
    params = jax.device_get(resumed.state.teacher["backbone"])
    assert "pos_embed" not in params  # RoPE: no learned position embedding
    assert params["storage_tokens"].shape == (1, 4, 96)
    assert {"w1", "w2", "w3"} <= set(params["blocks_0"]["mlp"]) and "ls1" in params["blocks_0"]
    first = jax.device_get(straight.state.student["backbone"]["blocks_0"]["ls1"]["gamma"])
    assert not np.allclose(first, 1e-5)  # trained from LayerScale's 1e-5
    assert straight.metrics["train/gram"] > 0 and straight.metrics["train/ibot"] > 0


def test_steps_on_8_devices_equal_1():
    # KoLeo off: at LayerScale 1e-5 a fresh model's CLS features nearly coincide, and float
    # rounding alone can pick another nearest neighbour (docs/research.md); KoLeo's own
    # sharding is checked in tests/test_centering_koleo.py. The third step has the Gram term.
    mesh_runs = steps_on_meshes(config(**{"dino.koleo_weight": 0.0}), 3)
    assert_states_equal(mesh_runs[8].final, mesh_runs[1].final, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        mesh_runs[8].metrics["train/loss"], mesh_runs[1].metrics["train/loss"], 1e-5
    )


@functools.cache
def built(rescale: float | None = 2.0):
    """The recipe of the test config with model.rope_rescale_coords = `rescale`, LayerScale
    at 1 (at 1e-5 the attention branches, where RoPE acts, barely move a fresh model's
    features), and the DINO loss alone (no iBOT masks or Gram teacher to feed)."""
    c = config(
        **{
            "model.rope_rescale_coords": rescale,
            "model.layerscale_init": 1.0,
            "dino.ibot_weight": 0.0,
            "dino.gram_weight": 0.0,
        }
    )
    return recipe.build(c, steps_per_epoch=10)


def random_crops(r: recipe.Recipe) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(7), 2)
    return tuple(jax.random.normal(k, c.shape) for k, c in zip(keys, r.sample_crops(), strict=True))


def student_features(r: recipe.Recipe, params, crops, rope_seed: int, train: bool = True):
    """The features of the student's call in the training step, with this "rope" key."""
    rngs = {"drop_path": jax.random.key(0), "rope": jax.random.key(rope_seed)}
    out = _apply(r.hp.model, {"params": params}, crops, train, rngs)
    return np.asarray(out.features)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, variables, crops, train, rngs):
    return model.apply(variables, crops, train=train, return_features=True, rngs=rngs)


def test_the_rope_augmentation_acts_in_the_student_only():
    on, off = built(2.0), built(None)
    params = on.init_state(jax.random.key(0)).student
    crops = random_crops(on)
    a, b = (student_features(on, params, crops, seed) for seed in (1, 2))
    np.testing.assert_array_equal(a, student_features(on, params, crops, 1))  # keyed
    assert np.abs(a - b).max() > 1e-4 * np.abs(a).max()  # another key, another rescale
    # train=False (the teacher's call) is deterministic and draws nothing
    evals = [student_features(on, params, crops, seed, train=False) for seed in (1, 2)]
    np.testing.assert_array_equal(*evals)
    # without the augmentation (no drop path in the demo), training mode is eval mode
    plain = [student_features(off, params, crops, seed) for seed in (1, 2)]
    np.testing.assert_array_equal(plain[0], plain[1])
    np.testing.assert_allclose(plain[0], evals[0], rtol=1e-6, atol=1e-6)


def test_the_training_step_feeds_the_student_its_rope_key():
    r = built(2.0)
    state, crops = r.init_state(jax.random.key(0)), random_crops(r)
    step = jax.jit(lambda key: dino_update(state, crops, key, r.hp)[1]["train/loss"])
    losses = [float(step(jax.random.key(seed))) for seed in (0, 0, 1)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_knn_evaluation_of_the_trained_work_directory(runs):
    """The command line's k-NN of the saved teacher is the trainer's k-NN of the final state:
    the work directory rebuilds the same DINOv3 backbone from its saved config."""
    _, resumed, workdir = runs
    splits = {"eval_train_split": "test", "eval_test_split": "test"}
    evals = {"knn_max_train": 200, "knn_ks": (10, 20), "batch_size": 400}
    flags = [f"--config.data.{k}={v}" for k, v in splits.items()]
    flags += [
        f"--config.eval.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in evals.items()
    ]
    result = evaluate(["knn", "--weights", str(workdir), *flags])
    assert (result["bank"], result["queries"]) == (200, 2000)
    c = config()
    c.data.update(splits)
    c.eval.update(evals)
    backbone = recipe.build_network(c).backbone
    params = backbone_variables(resumed.state.teacher, resumed.state.teacher_stats)
    expected = knn_evaluation(c, backbone, params, parallel.make_mesh())
    for k in (10, 20):
        key = f"knn/top1_k{k}"
        assert result["metrics"][key] == pytest.approx(expected[key]), key


def test_the_linear_probe_reads_cls_and_patches_of_the_last_blocks_without_storage():
    """eval_linear.py's features (CLS of the last n blocks, then the mean patch token of the
    last) from DINOv3's get_intermediate_layers(norm=True): each block's output through the
    final norm, storage tokens dropped. The first of two blocks is checked against a
    one-block model on the same parameters, whose final output is that block's."""
    kw = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, n_storage_tokens=3)
    model = VisionTransformer3(**kw, layerscale_init=1.0)
    x = jax.random.normal(jax.random.key(1), (2, 12, 8, 3))
    variables = model.init(jax.random.key(0), x)
    feats = np.asarray(backbone_features(model, variables, x, n_last_blocks=2, avgpool=True))
    out = model.apply(variables, x)
    params = variables["params"]
    one_block = {k: v for k, v in params.items() if k != "blocks_1"}
    first = VisionTransformer3(**{**kw, "depth": 1}, layerscale_init=1.0).apply(
        {"params": one_block}, x
    )
    patches = np.asarray(out.patch_tokens).mean(axis=1)
    expected = np.concatenate([first.cls, out.cls, patches], axis=-1)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    with_storage = np.concatenate([out.storage_tokens, out.patch_tokens], axis=1).mean(axis=1)
    assert np.abs(with_storage - patches).max() > 1e-3  # the storage tokens would show
    with pytest.raises(ValueError, match="n_last_blocks=3 outside"):
        model.apply(variables, x, n_last_blocks=3)


def test_the_linear_probe_bounds_n_last_blocks_by_the_depth(runs, capsys):
    _, _, workdir = runs
    with pytest.raises(SystemExit) as exit_info:
        evaluate(
            [
                "linear",
                "--weights",
                str(workdir),
                "--config.data.eval_train_split=test",
                "--config.data.eval_test_split=test",
                "--config.linear.n_last_blocks=5",
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "linear.n_last_blocks=5: in [1, depth=2]" in err, err
