"""dino_jax.hub: the released DINO weights by their torch.hub names, downloaded from a loopback
server (never from outside the machine) into a per-test cache: one request, then the cache
alone (also offline); truncated, corrupted, missing and wrong files refused with a message and
nothing left in the cache."""

import hashlib
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.http_server import LoopbackServer
from helpers.pth_files import dict_pkl, expanded_state_dict, official_files, tensor_ops, write_pth
from helpers.tiny import tiny_config

from dino_jax import hub, hub_registry
from dino_jax.config import default_config
from dino_jax.interop import architecture
from dino_jax.interop.official import backbone_module, load_backbone

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VITS16 = "/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
VITB16 = "/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
RESNET50 = "/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
# The files of facebookresearch/dino's hubconf.py on SERVER, by torch.hub name; README.md links
# each full checkpoint beside its backbone as <same stem>_full_checkpoint.pth.
SERVER = "https://dl.fbaipublicfiles.com/dino/"
OFFICIAL = {
    "dino_vits16": "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vits8": "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vitb16": "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dino_vitb8": "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_resnet50": "dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
    "dino_xcit_small_12_p16": "dino_xcit_small_12_p16_pretrain/dino_xcit_small_12_p16_pretrain.pth",
    "dino_xcit_small_12_p8": "dino_xcit_small_12_p8_pretrain/dino_xcit_small_12_p8_pretrain.pth",
    "dino_xcit_medium_24_p16": (
        "dino_xcit_medium_24_p16_pretrain/dino_xcit_medium_24_p16_pretrain.pth"
    ),
    "dino_xcit_medium_24_p8": "dino_xcit_medium_24_p8_pretrain/dino_xcit_medium_24_p8_pretrain.pth",
}
PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def c_strides(shape):
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def vit_s16_file(path: pathlib.Path) -> pathlib.Path:
    """A backbone-only file of the official ViT-S/16's exact shapes (21.7M weights) in 12 MB:
    every tensor a contiguous view, at its own offset, into one shared storage of random
    values (as torch.save writes views; within the reader's bound on view elements)."""
    shapes = architecture.state_shapes(architecture.Architecture(384, 12, 16, 1536, True, 14))
    elements = 3 << 20
    entries = {}
    for i, (name, shape) in enumerate(shapes.items()):
        offset = (i * 7919) % (elements - math.prod(shape))
        entries[name.removeprefix("backbone.")] = tensor_ops(
            "FloatStorage", "0", elements, offset, shape, c_strides(shape)
        )
    data = np.random.default_rng(0).standard_normal(elements).astype(np.float32).tobytes()
    return write_pth(path, dict_pkl(entries), {"0": data})


@pytest.fixture(scope="module")
def vits16(tmp_path_factory) -> bytes:
    return vit_s16_file(tmp_path_factory.mktemp("official") / "vits16.pth").read_bytes()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    """A fresh cache folder per test, and a hub URL that reaches nothing (a closed loopback
    port) unless the test points it at its server; no proxy in the way."""
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv(hub.ENV_URL, "http://127.0.0.1:9")
    return tmp_path / "cache"


@pytest.fixture
def server(monkeypatch, vits16):
    with LoopbackServer() as s:
        s.files[VITS16] = vits16
        monkeypatch.setenv(hub.ENV_URL, s.url)
        yield s


def cached_files(cache: pathlib.Path) -> list[str]:
    """Everything in the cache folder, hidden temporary files included."""
    return sorted(os.listdir(cache)) if cache.exists() else []


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_names_and_urls_are_the_official_ones(monkeypatch, tmp_path):
    assert hub.names() == (*OFFICIAL, *(name + "_full" for name in OFFICIAL))
    monkeypatch.delenv(hub.ENV_URL)
    for name, path in OFFICIAL.items():
        assert hub.url(name) == SERVER + path
        assert (
            hub.url(name + "_full") == SERVER + path.removesuffix(".pth") + "_full_checkpoint.pth"
        )
    assert hub.url("dino_vits16", base_url="http://mirror/dino/") == "http://mirror/dino" + VITS16
    # The cache folder: cache_dir=, else DINO_JAX_CACHE, else $XDG_CACHE_HOME, else ~/.cache.
    file = "dino_deitsmall16_pretrain.pth"
    assert hub.cache_path("dino_vits16") == str(tmp_path / "cache" / file)
    assert hub.cache_path("dino_vits16", cache_dir=tmp_path / "c") == str(tmp_path / "c" / file)
    monkeypatch.delenv(hub.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_path("dino_vits16") == str(tmp_path / "xdg" / "dino_jax" / file)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_path("dino_vits16") == str(tmp_path / "home" / ".cache" / "dino_jax" / file)


def official_module(release):
    """The backbone module that load_backbone builds for the official file of `release`."""
    m = default_config().model
    m.arch = release.arch
    if release.patch_size:
        m.patch_size = release.patch_size
    return backbone_module(architecture.from_model_config(m, 224))


def test_each_name_accepts_its_own_architecture_and_no_other():
    backbones = [name for name in hub.names() if not name.endswith("_full")]
    modules = {name: official_module(hub_registry.RELEASES[name]) for name in backbones}
    for name in hub.names():
        release = hub_registry.RELEASES[name]
        for other in backbones:
            problem = hub._architecture_problem(modules[other], release)
            assert (problem is None) == (name.removesuffix("_full") == other), (name, other)


def test_a_name_downloads_once_then_loads_from_the_cache_offline(server, cache, capsys, vits16):
    model, variables = hub.load("dino_vits16")  # with the progress bar
    assert "dino_deitsmall16_pretrain.pth" in capsys.readouterr().err
    assert server.requests == [VITS16]
    assert cached_files(cache) == [
        "dino_deitsmall16_pretrain.pth",
        "dino_deitsmall16_pretrain.pth.json",
    ]
    record = json.loads((cache / "dino_deitsmall16_pretrain.pth.json").read_text())
    assert record == {
        "url": server.url + VITS16,
        "size": len(vits16),
        "sha256": hashlib.sha256(vits16).hexdigest(),
    }
    assert (cache / "dino_deitsmall16_pretrain.pth").read_bytes() == vits16
    fields = (model.patch_size, model.embed_dim, model.depth, model.num_heads)
    assert (type(model).__name__, *fields) == ("VisionTransformer", 16, 384, 12, 6)
    # What load_backbone gives for the same file: the hub adds no conversion of its own.
    _, direct = load_backbone(cache / "dino_deitsmall16_pretrain.pth")
    jax.tree.map(np.testing.assert_array_equal, variables, direct)

    assert hub.download("dino_vits16", progress=False) == str(
        cache / "dino_deitsmall16_pretrain.pth"
    )
    server.stop()  # offline: the cache alone
    model, again = hub.load("dino_vits16", progress=False)
    assert server.requests == [VITS16]
    jax.tree.map(np.testing.assert_array_equal, variables, again)
    out = model.apply(again, jnp.zeros((1, 32, 32, 3)))
    assert out.cls.shape == (1, 384) and bool(jnp.isfinite(out.cls).all())


def test_base_url_and_a_file_mirror_are_used(server, cache, tmp_path, vits16, monkeypatch):
    monkeypatch.setenv(hub.ENV_URL, "http://127.0.0.1:9")  # the parameter wins over it
    hub.download("dino_vits16", base_url=server.url + "/", progress=False)
    assert server.requests == [VITS16]
    mirror = tmp_path / "mirror"
    (mirror / VITS16.strip("/")).parent.mkdir(parents=True)
    (mirror / VITS16.strip("/")).write_bytes(vits16)
    other = tmp_path / "other"
    path = hub.download("dino_vits16", cache_dir=other, base_url=mirror.as_uri(), progress=False)
    assert pathlib.Path(path).read_bytes() == vits16 and server.requests == [VITS16]


def test_a_local_path_loads_directly(tmp_path, vits16, cache):
    path = tmp_path / "weights.pth"
    path.write_bytes(vits16)
    for given in (str(path), path):
        model, _ = hub.load(given, progress=False)
        assert (model.embed_dim, model.patch_size) == (384, 16)
    # Any architecture from a path (its heads given, as load_backbone takes them).
    model, _ = hub.load(FIXTURES / "backbone.pth", num_heads=2)
    assert (model.embed_dim, model.depth, model.patch_size) == (32, 2, 8)
    checkpoint, _ = official_files(tmp_path, tiny_config().model, tiny_config().aug.global_size)
    model, _ = hub.load(checkpoint, which="student", num_heads=2)
    with pytest.raises(hub.HubError, match="no such file"):
        hub.load(str(tmp_path / "missing.pth"))
    with pytest.raises(hub.HubError, match="is a directory"):
        hub.load(str(tmp_path))
    assert cached_files(cache) == []


def test_a_file_put_in_the_cache_by_hand_loads_offline_and_is_recorded(cache, vits16):
    cache.mkdir()
    (cache / "dino_deitsmall16_pretrain.pth").write_bytes(vits16)
    model, _ = hub.load("dino_vits16", progress=False)  # the hub URL reaches nothing
    assert model.embed_dim == 384
    record = json.loads((cache / "dino_deitsmall16_pretrain.pth.json").read_text())
    assert record["sha256"] == hashlib.sha256(vits16).hexdigest()
    # A partial copy put there by hand is refused as such.
    (cache / "dino_deitsmall16_pretrain.pth.json").unlink()
    (cache / "dino_deitsmall16_pretrain.pth").write_bytes(vits16[: len(vits16) // 2])
    with pytest.raises(hub.HubError, match="in the cache but is not a complete zip archive"):
        hub.load("dino_vits16", progress=False)


def test_a_truncated_download_is_refused_and_nothing_is_kept(server, cache, vits16):
    server.truncated[VITS16] = len(vits16) // 3
    with pytest.raises(hub.HubError) as caught:
        hub.load("dino_vits16", progress=False)
    message = str(caught.value)
    assert f"closed after {len(vits16) // 3:,} of {len(vits16):,} bytes" in message
    assert server.url + VITS16 in message and "nothing was kept" in message
    assert cached_files(cache) == []  # no partial file under the final name, no temporary
    del server.truncated[VITS16]  # trying again works
    hub.download("dino_vits16", progress=False)
    assert len(server.requests) == 2


def test_a_corrupted_download_is_refused_and_nothing_is_kept(server, cache, vits16):
    server.files[VITS16] = flipped(vits16, len(vits16) // 2)  # the right length
    with pytest.raises(hub.HubError, match=r"does not match its CRC-32.*nothing was kept"):
        hub.download("dino_vits16", progress=False)
    assert cached_files(cache) == []
    server.files[VITS16] = b"<html>a proxy's error page</html>"
    with pytest.raises(hub.HubError, match=r"33 bytes.*not a complete zip archive"):
        hub.download("dino_vits16", progress=False)
    assert cached_files(cache) == []


def test_a_damaged_cache_is_refused_naming_the_file(server, cache, vits16):
    path = pathlib.Path(hub.download("dino_vits16", progress=False))
    path.write_bytes(flipped(vits16, len(vits16) // 2))
    with pytest.raises(hub.HubError) as caught:
        hub.load("dino_vits16", progress=False)
    message = str(caught.value)
    assert f"{path} is damaged: its SHA-256" in message and f"Delete it ({path})" in message
    path.write_bytes(vits16[:1000])
    with pytest.raises(hub.HubError, match=f"1,000 bytes where {len(vits16):,} were downloaded"):
        hub.load("dino_vits16", progress=False)
    (cache / "dino_deitsmall16_pretrain.pth.json").write_text("{")
    with pytest.raises(hub.HubError, match=r"record of .* is unreadable"):
        hub.load("dino_vits16", progress=False)
    assert server.requests == [VITS16]  # never replaced behind the user's back
    path.unlink()  # as the message says: then it downloads again
    (cache / "dino_deitsmall16_pretrain.pth.json").unlink()
    hub.load("dino_vits16", progress=False)
    assert server.requests == [VITS16, VITS16]


def test_without_network_or_file_the_message_says_what_was_tried_and_what_to_do(cache):
    with pytest.raises(hub.HubError) as caught:
        hub.load("dino_vits16", progress=False)
    message = str(caught.value)
    assert "http://127.0.0.1:9" + VITS16 in message and "cannot connect" in message
    assert hub.cache_path("dino_vits16") in message and "download it by hand" in message
    assert "the official file is " + SERVER + OFFICIAL["dino_vits16"] in message  # a mirror was set
    assert hub.ENV_CACHE in message and "/path/to/dino_deitsmall16_pretrain.pth" in message
    assert cached_files(cache) == []


@pytest.mark.parametrize("trouble", ["missing", "server error", "no answer"])
def test_http_errors_are_messages(server, cache, trouble):
    if trouble == "missing":
        del server.files[VITS16]
    elif trouble == "server error":
        server.status[VITS16] = 500
    else:
        server.stalled.add(VITS16)
    expected = {"missing": "HTTP 404", "server error": "HTTP 500", "no answer": "timed out"}
    with pytest.raises(hub.HubError, match=f"{server.url + VITS16}: .*{expected[trouble]}"):
        hub.download("dino_vits16", progress=False, timeout=0.5)
    assert cached_files(cache) == []


def test_an_unknown_name_lists_the_known_ones(server):
    with pytest.raises(hub.HubError) as caught:
        hub.load("dino_vit16")
    message = str(caught.value)
    assert "unknown DINO model 'dino_vit16' (did you mean 'dino_vits16'?)" in message
    assert all(name in message for name in hub.names())
    with pytest.raises(hub.HubError, match=r"unknown DINO model 'vgg16'\. Known names"):
        hub.download("vgg16")
    assert server.requests == []
    assert issubclass(hub.HubError, ValueError)  # a user error, as the command lines treat them


def test_which_is_checked_before_any_download(server):
    with pytest.raises(
        hub.HubError, match="the student is in the full checkpoint 'dino_vits16_full'"
    ):
        hub.load("dino_vits16", which="student")
    with pytest.raises(hub.HubError, match="which='ema'"):
        hub.load("dino_vits16", which="ema")
    assert server.requests == []
    with pytest.raises(hub.HubError, match="HTTP 404"):  # the student of a full one is asked for
        hub.load("dino_vits16_full", which="student", progress=False)
    assert server.requests == [
        "/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain_full_checkpoint.pth"
    ]


def test_a_file_of_another_architecture_is_refused_naming_it(server, cache, tmp_path, vits16):
    path = hub.cache_path("dino_vits16")
    server.files[VITS16] = (FIXTURES / "backbone.pth").read_bytes()  # a tiny ViT/8
    with pytest.raises(hub.HubError) as caught:
        hub.load("dino_vits16", progress=False)
    message = str(caught.value)
    assert f"{path} holds a VisionTransformer with patch_size 8 (expected 16)" in message
    assert "embed_dim 32 (expected 384), depth 2 (expected 12)" in message
    assert "not the ViT-S/16 backbone 'dino_vits16' names" in message
    assert "removed from the cache" in message and cached_files(cache) == []
    # One differing size is enough: the ViT-S/16 is not the ViT-S/8, nor a ResNet-50.
    server.files["/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"] = vits16
    with pytest.raises(hub.HubError, match=r"with patch_size 16 \(expected 8\): it is not"):
        hub.load("dino_vits8", progress=False)
    server.files[RESNET50] = vits16
    with pytest.raises(hub.HubError, match="holds a VisionTransformer, not a ResNet"):
        hub.load("dino_resnet50", progress=False)
    # Not a DINO file at all: the loader's own refusal comes through, naming the file.
    server.files[VITB16] = expanded_state_dict(
        tmp_path / "x.pth", {"fc.weight": (4, 4)}
    ).read_bytes()
    with pytest.raises(hub.HubError) as caught:
        hub.load("dino_vitb16", progress=False)
    assert f"{hub.cache_path('dino_vitb16')}: the backbone state dict has no DINO backbone" in str(
        caught.value
    )
    assert cached_files(cache) == []


def test_a_cache_folder_that_cannot_be_written_is_a_message(server, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(
        hub.HubError, match=f"cannot write 'dino_vits16' into the cache folder {blocked}"
    ):
        hub.download("dino_vits16", cache_dir=blocked, progress=False)


def test_the_evaluation_loads_a_released_name_through_the_hub(server, cache):
    """`--weights dino_vits16` (load_weights): downloaded once, then as the local file; a
    hub failure is the evaluation's own WeightsError, with the hub's message."""
    from dino_jax.evaluate.weights import WeightsError, load_weights

    backbone, _, info = load_weights("dino_vits16")
    assert info.source == "pth" and backbone.embed_dim == 384 and server.requests == [VITS16]
    load_weights("dino_vits16")
    assert server.requests == [VITS16]
    with pytest.raises(WeightsError, match="dino_vitb8"):
        load_weights("dino_vitb8")  # not on this server: 404
