"""The front door shared by training, evaluation and the benchmark: a recipe by name or path,
`--config.section.key=value` overrides parsed and checked one way, user errors as messages."""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

import ml_collections

from dino_jax.config import ConfigError, closest_key, default_config, dotted, flatten_config

# Exit statuses of every command (train, evaluate, bench step); docs/reliability.md has the
# same table. A user error is a message on stderr, never a traceback, found before the work
# directory is touched.
FINISHED = 0  # finished, reached train.max_steps, preempted after saving; --help
UNEXPECTED = 1  # a bug: Python's traceback
USER_ERROR = 2  # the command line, config, data, a checkpoint refused or damaged, an unusable
# or locked work directory; the message says what to change
NON_FINITE = 3  # a non-finite loss or update (the message names the last good checkpoint)
STORAGE_FAILED = 4  # a save failed (disk full, I/O error); the message names the last good one
PEER_DIED = 134  # multi-host: another process died (SIGABRT from JAX's coordination service)
PREFIX = "--config."
# Where the recipes live: installed beside the package as dino_jax.configs, and in a checkout
# as the top-level configs/ folder (the same files, mapped by pyproject.toml).
_PACKAGE = pathlib.Path(__file__).resolve().parent
RECIPE_DIRS = (_PACKAGE / "configs", _PACKAGE.parent / "configs")


def fail(prog: str, message: str) -> NoReturn:
    """Print `message` (no traceback) and exit with USER_ERROR."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(USER_ERROR)


def recipe_names() -> list[str]:
    """Names accepted by --config=NAME (configs/NAME.py)."""
    for folder in RECIPE_DIRS:
        if folder.is_dir():
            return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))
    return []


def recipe_path(name_or_path: str) -> pathlib.Path:
    """The recipe file of `name_or_path`: an existing file, or a name such as "vit_small16"."""
    path = pathlib.Path(os.path.expanduser(name_or_path))
    if path.is_file():
        return path
    # `configs/NAME.py` typed outside a checkout still names a recipe; any other path does not
    in_configs = path.suffix == ".py" and path.parts[:-1] == ("configs",)
    name = path.stem if in_configs else name_or_path
    for folder in RECIPE_DIRS:
        candidate = folder / f"{name}.py"
        if candidate.is_file():
            return candidate
    names = recipe_names()
    close = closest_key(name, names)
    hint = f"; did you mean {close}?" if close else ""
    raise ConfigError(
        f"--config={name_or_path}: no such file and no recipe of that name{hint}"
        f" (recipes: {', '.join(names)}; or give the path of a recipe file)"
    )


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a recipe (name or path); ConfigError if it cannot be loaded."""
    from dino_jax.config import load_recipe

    return load_recipe(recipe_path(name_or_path))


def split_config_args(argv: Sequence[str]) -> tuple[list[str], str | None, list[tuple[str, str]]]:
    """(other args, --config value or None, [(dotted key, text)]) from a command line.

    `--config=X` / `--config X` names the recipe; `--config.a.b=v` / `--config.a.b v` sets a key.
    """
    rest, recipe, overrides = [], None, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if name == "--config" or name.startswith(PREFIX):
            if not has_value:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"{arg} needs a value ({arg}=VALUE)")
                value = args[i + 1]
                i += 1
            if name == "--config":
                recipe = value
            else:
                overrides.append((name.removeprefix(PREFIX), value))
        else:
            rest.append(arg)
        i += 1
    return rest, recipe, overrides


def _parse(text: str, kind: type | None, current: Any) -> Any:
    if text == "None" and current is None:
        return None
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"{text!r} is not a bool (True or False)")
        return lowered in ("true", "1")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an int") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind is str:
        return text
    if kind in (tuple, list) or isinstance(current, (tuple, list)):
        stripped = text.strip()
        literal = stripped if stripped[:1] in "([" else f"({stripped},)"
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            raise ValueError(f"{text!r} is not a tuple such as (0.4, 1.0)") from None
        return tuple(value)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]):
    """Set each (dotted key, text) of `overrides`, parsed as the key's declared type.

    Keys are those of default_config(); a misspelt one gets the closest key as a suggestion.
    Every problem is collected, then raised as one ConfigError.
    """
    keys = list(flatten_config(default_config()))
    errors = []
    for key, text in overrides:
        arg = f"{PREFIX}{key}={text}"
        if key not in keys:
            if any(k.startswith(key + ".") for k in keys):
                errors.append(f"{arg}: config.{key} is a section; set one of its keys")
                continue
            close = closest_key(key, keys)
            hint = f"; did you mean {PREFIX}{close}?" if close else ""
            errors.append(f"{arg}: config.{key} is not a setting{hint}")
            continue
        try:
            node, leaf = dotted(config, key)
            current, kind = node[leaf], node.get_type(leaf)
        except (KeyError, AttributeError):
            errors.append(
                f"{arg}: the recipe has no config.{key} (it must start from"
                " dino_jax.config.default_config())"
            )
            continue
        try:
            node[leaf] = _parse(text, kind, current)
        except (ValueError, TypeError) as err:
            errors.append(f"{arg}: {err}")
    if errors:
        raise ConfigError("invalid command line:\n  - " + "\n  - ".join(errors))


def keys_help() -> str:
    """Every config key with its default (default_config(), the official ViT-S/16 recipe)."""
    lines = [f"  {PREFIX}{k}={v!r}" for k, v in flatten_config(default_config()).items()]
    return "config keys (official defaults; recipes override some):\n" + "\n".join(lines)


def parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An argparse parser whose --help also says how configs and their keys are given."""
    epilog = (
        f"--config=NAME|FILE picks a recipe ({', '.join(recipe_names())}, or a path);"
        f" {PREFIX}section.key=VALUE sets any key. `{prog} --help-keys` lists every key"
        " (dino_jax/config.py has their meaning)."
    )
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


class Command(NamedTuple):
    prog: str
    args: argparse.Namespace
    recipe: str | None  # the recipe's short name: --config=NAME|FILE, else the default
    config: ml_collections.ConfigDict | None  # that recipe with the overrides applied
    overrides: list[tuple[str, str]]  # (dotted key, text) of every --config.a.b=v


def parse_command(
    build: Callable[[], argparse.ArgumentParser],
    argv: Sequence[str] | None = None,
    default_recipe: str | None = None,
) -> Command:
    """The command line parsed by `build()`'s parser, with its config: the --config recipe
    (else `default_recipe`) and the overrides applied. User errors exit 2 with a message,
    before the command does anything; `--help-keys` prints every config key and exits 0.

    Without a recipe (and no default) the config is None and the overrides are checked
    against default_config(): the config the command ends up with (a work directory's, say)
    has the same keys and types; command_config applies them to it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build()
    if "--help-keys" in argv:
        print(keys_help())
        raise SystemExit(0)
    try:
        rest, recipe, overrides = split_config_args(argv)
        recipe = recipe or default_recipe
        config = load_config(recipe) if recipe else None
        apply_overrides(config if config is not None else default_config(), overrides)
    except ConfigError as err:
        fail(p.prog, str(err))
    name = pathlib.Path(recipe).stem if recipe else None
    return Command(p.prog, p.parse_args(rest), name, config, overrides)


def command_config(
    cmd: Command, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config of a command: its recipe's, else `base` (a copy) or default_config() with
    the command's overrides."""
    if cmd.config is not None:
        return cmd.config
    config = copy.deepcopy(base) if base is not None else default_config()
    apply_overrides(config, cmd.overrides)  # checked by parse_command: cannot fail
    return config


def quiet_orbax(show_info: bool = False) -> None:
    """Hide Orbax's INFO/DEBUG records (a few dozen lines per checkpoint); warnings show."""
    if show_info:
        return
    for handler in _absl_handlers():
        handler.addFilter(lambda r: not below_warning_from_orbax(r))


def below_warning_from_orbax(record: logging.LogRecord) -> bool:
    """True for Orbax's INFO/DEBUG records."""
    return record.levelno < logging.WARNING and f"{os.sep}orbax{os.sep}" in record.pathname


def _absl_handlers() -> list[logging.Handler]:
    handlers = list(logging.getLogger().handlers)
    try:
        from absl import logging as absl_logging

        handlers.append(absl_logging.get_absl_handler())
    except ImportError:
        pass
    return handlers


def setup_logging(show_orbax_info: bool = False, level: int = logging.INFO) -> None:
    """Log records on stderr, one per line; Orbax's INFO records hidden unless asked for."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s",
        datefmt="%m%d %H:%M:%S",
    )
    quiet_orbax(show_orbax_info)
    logging.getLogger("jax._src.xla_bridge").addFilter(lambda r: not tpu_probe_noise(r))


def tpu_probe_noise(record: logging.LogRecord) -> bool:
    """JAX's INFO record that its TPU backend failed to start, where no TPU runtime (libtpu)
    is installed: every CPU or GPU run would begin with it. On a TPU host it still shows."""
    return (
        record.levelno < logging.WARNING
        and record.getMessage().startswith("Unable to initialize backend 'tpu'")
        and importlib.util.find_spec("libtpu") is None
    )
