"""Write tests/fixtures/crop_stats.npz: whole-crop statistics of the official DINO augmentation.

    python scripts/make_crop_fixture.py --official PATH/TO/dino [--out FILE]

FILE: tests/fixtures/crop_stats.npz by default.

Crops come from main_dino.DataAugmentationDINO of a facebookresearch/dino checkout (PIL and
torchvision), never from dino_jax; dino_jax.data.crop_statistics only summarises them. Two
settings:
  demo      configs/demo.py's crops (28 / 14 px, its statistics) of the first 512 bundled
            Fashion-MNIST training images, 4 draws each
  imagenet  the ImageNet recipe's crops (224 / 96 px, 8 local crops: main_dino.py's default)
            of 5 photos from scikit-image's data, 48 draws each
Run with the environment scripts/compare_official.py names; the fixture's `meta` records the
checkout's commit and the torch, torchvision and Pillow versions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
SETTINGS = {
    "demo": {"images": 512, "rounds": 4, "n_local": 4},
    "imagenet": {"images": len(PHOTOS), "rounds": 48, "n_local": 8},
}
KINDS = ("global1", "global2", "local")


def setting_images(name: str) -> list[np.ndarray]:
    """The images of a setting: uint8 (H, W) grey or (H, W, 3) RGB arrays."""
    if name == "demo":
        from dino_jax.data.sources.demo import load_split

        return list(load_split("train")[0][: SETTINGS["demo"]["images"]])
    import skimage.data

    return [getattr(skimage.data, p)() for p in PHOTOS]


def setting_config(name: str):
    """The aug section of the setting's recipe (configs/demo.py or the default config)."""
    from dino_jax.config import default_config, load_recipe

    if name == "demo":
        config = load_recipe(os.path.join(ROOT, "configs", "demo.py"))
    else:
        config = default_config()
    config.aug.n_local = SETTINGS[name]["n_local"]
    return config


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--official", required=True)
    p.add_argument("--out", default=os.path.join("tests", "fixtures", "crop_stats.npz"))
    args = p.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import PIL
    import torch
    import torchvision
    from PIL import Image

    from dino_jax.data.crop_statistics import crop_statistics
    from scripts import compare_official as co
    from scripts import official_side

    off = official_side.import_checkout(args.official)
    arrays = {}
    for name, setting in SETTINGS.items():
        config = setting_config(name)
        off_args = co.official_args(config, 0)
        aug = official_side.dino_augmentation(off, off_args)
        torch.manual_seed(0)
        random.seed(0)
        mean = np.asarray(config.aug.mean)[:, None, None]
        std = np.asarray(config.aug.std)[:, None, None]
        crops = {kind: [] for kind in KINDS}
        for image in setting_images(name):
            pil = Image.fromarray(image).convert("RGB")
            for _ in range(setting["rounds"]):
                views = [((v.numpy() * std + mean) * 255.0).transpose(1, 2, 0) for v in aug(pil)]
                crops["global1"].append(views[0])
                crops["global2"].append(views[1])
                crops["local"].extend(views[2:])
        for kind, values in crops.items():
            for stat, v in crop_statistics(np.stack(values)).items():
                arrays[f"{name}/{kind}/{stat}"] = v.astype(np.float32)
    meta = {
        "official_commit": off.commit,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "settings": SETTINGS,
        "photos": PHOTOS,
    }
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {meta}")


if __name__ == "__main__":
    main()
