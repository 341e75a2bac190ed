"""scripts/compare_official.py without PyTorch: its recipe mapping cannot drift from
configs/demo.py, and its figures are read as main_dino.py logs them."""

import importlib.util
import json
import os

import pytest

from dino_jax.config import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    path = os.path.join(ROOT, "scripts", "compare_official.py")
    spec = importlib.util.spec_from_file_location("compare_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


co = _script()


@pytest.fixture
def demo():
    return load_recipe(os.path.join(ROOT, "configs", "demo.py"))


def test_demo_recipe_maps_completely(demo):
    assert co.recipe_problems(demo) == []


def test_official_arguments_carry_the_recipe(demo):
    args = co.official_args(demo, seed=7)
    assert args.seed == 7
    for key, flag in co.OFFICIAL_FLAGS.items():
        if key == "seed":
            continue
        value = co.get_path(demo, key)
        got = getattr(args, flag)
        assert co._normal(got) == co._normal(value), key
    assert args.batch_size_per_gpu == demo.optim.batch_size
    assert args.local_crops_number == demo.aug.n_local
    assert (args.global_size, args.local_size) == (demo.aug.global_size, demo.aug.local_size)
    assert args.mean == tuple(demo.aug.mean) and args.std == tuple(demo.aug.std)
    assert (args.embed_dim, args.depth, args.num_heads) == (96, 4, 3)
    assert args.head_hidden_dim == demo.model.head_hidden_dim
    assert args.use_fp16 is False


@pytest.mark.parametrize(
    "key, value",
    [
        ("aug.brightness", 0.5),  # a constant of DataAugmentationDINO
        ("aug.global_solarize_prob", (0.2, 0.0)),
        ("dino.koleo_weight", 0.1),  # not in the official method
        ("model.compute_dtype", "bfloat16"),  # the comparison is float32
        ("model.arch", "vit_small"),
    ],
)
def test_a_recipe_the_official_code_cannot_run_is_refused(demo, key, value):
    section, name = key.split(".")
    demo[section][name] = value
    problems = co.recipe_problems(demo)
    assert len(problems) == 1 and problems[0].startswith(key), problems


def test_a_new_config_key_must_be_mapped(demo):
    demo.dino.new_option = 1.0
    assert co.recipe_problems(demo) == [
        "dino.new_option has no counterpart in the comparison: map it in this script"
    ]


def test_epoch_losses_are_the_means_of_every_step(demo, tmp_path):
    demo.optim.epochs = 2
    steps = 10_000 // demo.optim.batch_size
    with open(tmp_path / "train.jsonl", "w") as f:
        for s in range(1, 2 * steps + 1):
            f.write(json.dumps({"step": s, "train/loss": 1.0 if s <= steps else float(s)}) + "\n")
        f.write(json.dumps({"step": 2 * steps, "knn/top1": 50.0}) + "\n")
    losses = co.epoch_losses(str(tmp_path), demo)
    assert losses[0] == 1.0
    assert losses[1] == pytest.approx(sum(range(steps + 1, 2 * steps + 1)) / steps)


def test_table_has_every_figure_with_mean_and_spread():
    results = {
        "official": {"0": {"losses": [7.0, 6.2], "train_seconds": 100.0}},
        "ours": {"0": {"losses": [7.0, 6.0], "train_seconds": 50.0}},
        "evaluation": {"0": {}},
    }
    results["official"]["1"] = {"losses": [7.0, 6.4], "train_seconds": 110.0}
    results["ours"]["1"] = {"losses": [7.0, 6.1], "train_seconds": 60.0}
    for seed, shift in (("0", 0.0), ("1", 2.0)):
        results["evaluation"][seed] = {
            f"{side}_teacher/{ev}": 70.0 + shift
            for side in ("official", "ours")
            for ev in ("official_knn", "our_knn")
        }
    text = co.table(results, [0, 1])
    assert "| last-epoch training loss | official | 6.200 | 6.400 | 6.300 ± 0.141 |" in text
    assert "| last-epoch training loss | ours | 6.000 | 6.100 | 6.050 ± 0.071 |" in text
    assert text.count("| 70.00 | 72.00 | 71.00 ± 1.41 |") == 4
    assert co.mean_spread([1.0]) == (1.0, 0.0)
