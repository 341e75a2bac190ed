"""Whole crops against the official augmentation: the distribution over random draws of each
crop statistic (mean, contrast, high-frequency energy, chroma), per kind of crop, of our
multi-crop against crops that main_dino.DataAugmentationDINO made of the same images
(tests/fixtures/crop_stats.npz, scripts/make_crop_fixture.py). The per-op tests check each op
on given parameters; these check what the network is shown, and fail on plausible wrong
variants of the pipeline (wrong crop scales, blur radii, jitter strengths, solarised crop)."""

import dataclasses
import functools
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from dino_jax.data import augment
from dino_jax.data.crop_statistics import STATISTICS, crop_statistics, ks_bound, ks_distance


def _fixture_script():
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_crop_fixture.py"
    spec = importlib.util.spec_from_file_location("make_crop_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_maker = _fixture_script()
KINDS, SETTINGS = _maker.KINDS, _maker.SETTINGS
setting_config, setting_images = _maker.setting_config, _maker.setting_images

# Deterministic draws: a bound at alpha = 1e-4 per comparison keeps the 32 same-distribution
# comparisons clear of chance, and is still far below what the wrong variants below reach.
ALPHA = 1e-4


@pytest.fixture(scope="module")
def official(fixtures_dir):
    with np.load(fixtures_dir / "crop_stats.npz") as data:
        return {k: data[k] for k in data.files}


def our_crops(name: str, mc: augment.MultiCropConfig, rounds: int | None = None):
    """Our crops of the setting's images on the 0..255 scale, per kind: every image once per
    call (one compilation: the images share one canvas size, as a training batch does)."""
    rounds = rounds or SETTINGS[name]["rounds"]
    images = [
        np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in setting_images(name)
    ]
    side = max(max(im.shape[:2]) for im in images)
    canvases = np.zeros((len(images), side, side, 3), np.uint8)
    for canvas, im in zip(canvases, images, strict=True):
        canvas[: im.shape[0], : im.shape[1]] = im
    sizes = np.asarray([im.shape[:2] for im in images], np.int32)
    fn = jax.jit(functools.partial(augment.multicrop, cfg=mc))
    mean, std = np.asarray(mc.mean) * 255.0, np.asarray(mc.std) * 255.0
    out = {kind: [] for kind in KINDS}
    for r in range(rounds):
        g, loc = fn(jax.random.split(jax.random.key(r), len(images)), canvases, sizes)
        _collect(out, g, loc, mean, std)
    return {kind: np.concatenate(v) for kind, v in out.items()}


def _collect(out, g, loc, mean, std):
    g, loc = np.asarray(g) * std + mean, np.asarray(loc) * std + mean
    out["global1"].append(g[:, 0])
    out["global2"].append(g[:, 1])
    out["local"].append(loc.reshape(-1, *loc.shape[2:]))


def distances(official, name, mc, rounds=None) -> dict[tuple[str, str], tuple[float, float]]:
    """(kind, statistic) -> (KS distance to the official crops, bound at ALPHA)."""
    ours = our_crops(name, mc, rounds)
    result = {}
    for kind in KINDS:
        stats = crop_statistics(ours[kind])
        for stat in STATISTICS:
            ref = official[f"{name}/{kind}/{stat}"]
            result[kind, stat] = (
                ks_distance(stats[stat], ref),
                ks_bound(len(stats[stat]), len(ref), ALPHA),
            )
    return result


def config(name: str) -> augment.MultiCropConfig:
    return augment.MultiCropConfig.from_config(setting_config(name).aug)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_crop_statistics_match_the_official_augmentation(official, name):
    meta = json.loads(str(official["meta"]))
    assert meta["settings"][name] == SETTINGS[name]
    found = distances(official, name, config(name))
    over = {k: v for k, v in found.items() if v[0] > v[1]}
    assert not over, f"{name}: statistics off the official distribution: {over}"


WRONG = {
    # local crops from the global crops' scale range
    "local scale": lambda mc: dataclasses.replace(mc, local_scale=mc.global_scale),
    # PIL's radius read as twice the Gaussian's standard deviation
    "blur radius": lambda mc: dataclasses.replace(
        mc, blur_radius=tuple(r * 0.5 for r in mc.blur_radius)
    ),
    # ColorJitter's strengths doubled
    "jitter": lambda mc: dataclasses.replace(
        mc, brightness=0.8, contrast=0.8, saturation=0.4, hue=0.2
    ),
    # the solarised crop swapped with the always-blurred one
    "solarize": lambda mc: dataclasses.replace(
        mc, global_solarize_prob=tuple(reversed(mc.global_solarize_prob))
    ),
}


@pytest.mark.parametrize("variant", list(WRONG))
def test_wrong_pipelines_fail_the_crop_statistics(official, variant):
    found = distances(official, "demo", WRONG[variant](config("demo")))
    worst = max(found.items(), key=lambda kv: kv[1][0] / kv[1][1])
    assert worst[1][0] > worst[1][1], f"{variant}: undetected, worst {worst}"
