"""The package as pip installs it: declared dependencies that agree with the requirements
files, the console scripts, the recipes and the demo data inside the wheel, and an installed
copy that finds its recipes by name from another folder."""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = {
    "dino-jax-train": "dino_jax.train:main",
    "dino-jax-evaluate": "dino_jax.evaluate.cli:main",
    "dino-jax-bench": "dino_jax.bench.__main__:main",
}


def requirement_lines(name: str) -> list[str]:
    """The requirements of one file, without comments and `-r` includes."""
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


def normalise(requirement: str) -> str:
    name, spec = re.match(r"([A-Za-z0-9_.\-\[\],]+)(.*)", requirement.replace(" ", "")).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + spec


def test_requirements_files_list_what_pyproject_declares():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    same = {
        "requirements.txt": project["dependencies"],
        "requirements-tfds.txt": extras["tfds"],
        "requirements-test.txt": extras["bench"]
        + [r for r in extras["test"] if not r.startswith("dino_jax")],
    }
    for name, declared in same.items():
        assert sorted(map(normalise, requirement_lines(name))) == sorted(map(normalise, declared))
    assert "tensorflow-cpu>=2.18" in extras["tfds"]
    assert not any("tensorflow" in r for r in project["dependencies"])  # optional
    assert "-r requirements-tfds.txt" in (ROOT / "requirements-test.txt").read_text()


def test_every_package_directory_is_packaged():
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "dino_jax").rglob("__init__.py")
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found | {"dino_jax.configs"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """A wheel built from a copy of the sources (the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dino_jax", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out]
    built = subprocess.run([*cmd, source], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (path,) = out.glob("dino_jax-*.whl")
    return path


def test_wheel_metadata_lists_the_dependencies_and_scripts(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(whl.read(info).decode())
        entry_points = whl.read(info.replace("METADATA", "entry_points.txt")).decode()
    requires = metadata.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    assert sorted(map(normalise, runtime)) == sorted(
        map(normalise, PYPROJECT["project"]["dependencies"])
    )
    assert any(r.startswith("tensorflow-cpu") and 'extra == "tfds"' in r for r in requires)
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
    assert {"dino_jax/configs/demo.py", "dino_jax/configs/vit_small16.py"} <= set(names)
    assert "dino_jax/data/demo/fashion_mnist_demo.npz" in names


def test_installed_copy_finds_its_recipes_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    probe = (
        "import dino_jax, dino_jax.cli as cli;"
        "print(dino_jax.__file__);"
        "print(cli.recipe_path('vit_small16'));"
        "print(cli.load_config('demo').data.source)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    package, recipe, source = out.stdout.split()
    assert package.startswith(str(target)) and recipe.startswith(str(target))
    assert source == "demo"
    helped = subprocess.run(
        [sys.executable, "-m", "dino_jax.train", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "vit_small16" in helped.stdout, helped.stderr[-2000:]
