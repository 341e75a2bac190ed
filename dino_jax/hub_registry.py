"""The DINO weights that Caron et al. (2021) released, by name: where each file lies on the
official server and which architecture it must hold.

Names: the official torch.hub names (facebookresearch/dino, hubconf.py) for the backbone-only
files `<folder>/<folder>.pth`, and the same name with `_full` for the full checkpoints that
the official README.md links beside them, `<folder>/<folder>_full_checkpoint.pth` (teacher and
student, each with its projection head, the DINO center and the training args).

`_release` looks a name up; HubError, the error of every dino_jax.hub failure, is defined
here, where the first one (an unknown name) is raised.
"""

from __future__ import annotations

import dataclasses

from dino_jax.config import closest_key

BASE_URL = "https://dl.fbaipublicfiles.com/dino"
FULL_SUFFIX = "_full"  # name suffix of the full checkpoints


@dataclasses.dataclass(frozen=True)
class Release:
    """One released file: `folder` is its directory under BASE_URL (also the file's stem);
    `arch` our architecture name (dino_jax.models: vit_small, xcit_small_12_p16, resnet50)
    with `patch_size` for a ViT (an XCiT's is in its name, a ResNet has none)."""

    title: str
    folder: str
    arch: str
    patch_size: int | None = None
    full: bool = False

    @property
    def filename(self) -> str:
        return f"{self.folder}_full_checkpoint.pth" if self.full else f"{self.folder}.pth"

    @property
    def path(self) -> str:
        """The file's path under the base URL."""
        return f"{self.folder}/{self.filename}"


# torch.hub name -> (title, folder, arch, ViT patch size), in the order of the official README.
_BACKBONES = {
    "dino_vits16": ("ViT-S/16", "dino_deitsmall16_pretrain", "vit_small", 16),
    "dino_vits8": ("ViT-S/8", "dino_deitsmall8_pretrain", "vit_small", 8),
    "dino_vitb16": ("ViT-B/16", "dino_vitbase16_pretrain", "vit_base", 16),
    "dino_vitb8": ("ViT-B/8", "dino_vitbase8_pretrain", "vit_base", 8),
    "dino_resnet50": ("ResNet-50", "dino_resnet50_pretrain", "resnet50", None),
    "dino_xcit_small_12_p16": (
        "XCiT-S12/16",
        "dino_xcit_small_12_p16_pretrain",
        "xcit_small_12_p16",
        None,
    ),
    "dino_xcit_small_12_p8": (
        "XCiT-S12/8",
        "dino_xcit_small_12_p8_pretrain",
        "xcit_small_12_p8",
        None,
    ),
    "dino_xcit_medium_24_p16": (
        "XCiT-M24/16",
        "dino_xcit_medium_24_p16_pretrain",
        "xcit_medium_24_p16",
        None,
    ),
    "dino_xcit_medium_24_p8": (
        "XCiT-M24/8",
        "dino_xcit_medium_24_p8_pretrain",
        "xcit_medium_24_p8",
        None,
    ),
}

RELEASES: dict[str, Release] = {
    name + suffix: Release(f"{title} {what}", folder, arch, patch, full)
    for suffix, what, full in (("", "backbone", False), (FULL_SUFFIX, "full checkpoint", True))
    for name, (title, folder, arch, patch) in _BACKBONES.items()
}


class HubError(ValueError):
    """A named model or a file that cannot be had or loaded; the message says what was tried
    and what to do (a user error: the command-line tools print it without a traceback)."""


def _release(name: str) -> Release:
    if not isinstance(name, str):
        raise HubError(f"{name!r} is not a model name: give one of names() (load takes paths)")
    if name in RELEASES:
        return RELEASES[name]
    close = closest_key(name.lower(), RELEASES)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise HubError(
        f"unknown DINO model {name!r}{hint}. Known names: {', '.join(RELEASES)} (the backbones,"
        f" and with {FULL_SUFFIX!r} the full checkpoints with heads); or give the path of a"
        " .pth file"
    )
