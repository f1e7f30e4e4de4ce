"""Loading config files: ``configs/*.py`` modules with a ``get_config()``.

``load_config`` applies ``--config.a.b=value`` overrides through
ml_collections' ``config_flags``, so ``rag-jax train`` and ``launch/train.py``
accept the same syntax and type checks.
"""
from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from rag_jax.errors import ConfigError, UsageError

# How an override starts on a command line (``--noconfig.a.b`` sets a boolean false).
OVERRIDE_PREFIXES = ("--config.", "--noconfig.")


def load_config_module(path: str | os.PathLike) -> ModuleType:
    """Imports a config file by path (as ``--config=configs/x.py`` does)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"rag_jax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str) -> ModuleType:
    """Config module ``name`` next to ``file``: configs import ``base`` this way,
    which works whatever the current directory or sys.path."""
    return load_config_module(Path(file).with_name(f"{name}.py"))


def _override_path(arg: str) -> str:
    """``--config.a.b=v`` / ``--noconfig.a.b`` -> ``a.b``."""
    name = arg.lstrip("-").split("=", 1)[0]
    return name.removeprefix("no").split(".", 1)[1]


def _has_field(cfg: Any, path: str) -> bool:
    node = cfg
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return False
    return True


def _field_paths(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every field of ``cfg``, sub-configs included."""
    paths = []
    for key, value in cfg.items():
        paths.append(prefix + key)
        if hasattr(value, "items") and not isinstance(value, dict):  # a (Frozen)ConfigDict
            paths += _field_paths(value, f"{prefix}{key}.")
    return paths


def suggest_field(cfg: Any, path: str) -> str | None:
    """The existing field an unknown ``path`` most likely meant, if any: first
    a near spelling of its first unknown part (``trian.lr`` -> ``train.lr``),
    then a field anywhere named like its last part (``eval.lr`` -> ``train.lr``)."""
    parts = path.split(".")
    known = 0
    while known < len(parts) and _has_field(cfg, ".".join(parts[: known + 1])):
        known += 1
    node = cfg
    for part in parts[:known]:
        node = node[part]
    if hasattr(node, "keys") and known < len(parts):
        for near in difflib.get_close_matches(parts[known], list(node.keys()), n=3, cutoff=0.6):
            candidate = ".".join([*parts[:known], near, *parts[known + 1:]])
            if _has_field(cfg, candidate):
                return candidate
    by_last: dict[str, list[str]] = {}
    for p in _field_paths(cfg):
        by_last.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    near = difflib.get_close_matches(parts[-1], list(by_last), n=1, cutoff=0.8)
    if near and len(by_last[near[0]]) == 1:  # one field of that name: not a guess between several
        return by_last[near[0]][0]
    return None


def unknown_field_error(cfg: Any, path: str, source: str) -> ConfigError:
    """``--config.PATH: no such field in SOURCE (did you mean --config.X?)``."""
    msg = f"--config.{path}: no such field in {source}"
    near = suggest_field(cfg, path)
    return ConfigError(msg + (f" (did you mean --config.{near}?)" if near else ""))


def _parse_flags(fv: Any, argv: Sequence[str], spec: str | None, overrides: Sequence[str]) -> list[str]:
    """``fv(argv)`` with absl's and config_flags' failures as one-line errors;
    ``spec`` is the config flag's value (``FILE`` or ``FILE:ARG``)."""
    from absl import flags

    try:
        return fv(list(argv))
    except flags.Error as e:  # a value of the wrong type, a missing flag: absl names the flag
        raise (ConfigError if "--config." in str(e) else UsageError)(str(e)) from None
    except (AttributeError, KeyError):
        if spec is None:
            raise
        # config_flags reports an unknown field by its last component only; find the whole path.
        path, *arg = spec.split(":", 1)
        cfg = load_config_module(path).get_config(*arg)
        unknown = next((p for p in map(_override_path, overrides) if not _has_field(cfg, p)), None)
        if unknown is None:
            raise
        raise unknown_field_error(cfg, unknown, path) from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """``get_config()`` of the config file ``path`` with command-line overrides
    such as ``--config.train.lr=1e-4`` applied, locked against new fields.

    A bad override (unknown field, value of the wrong type) raises a
    one-line ``ConfigError`` naming the field.
    """
    from absl import flags
    from ml_collections import config_flags

    path = str(path)
    # config_flags defers a missing file to the first use of the config; fail here instead.
    # "FILE:ARG" passes ARG to get_config (configs/fever.py:2way), as config_flags does.
    file = path.split(":", 1)[0]
    if not Path(file).is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), file)
    for arg in overrides:
        if not arg.startswith(OVERRIDE_PREFIXES):
            raise ConfigError(f"expected a --config.FIELD=VALUE override, got {arg!r}")
    argv = ["rag-jax", f"--config={path}", *overrides]
    # A private FlagValues: nothing leaks into absl's global FLAGS, and each call
    # may load a different file. config_flags finds the overrides in sys_argv.
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
    )
    _parse_flags(fv, argv, path, overrides)
    return holder.value


def parse_absl_flags(argv: list[str]) -> list[str]:
    """``app.run``'s ``flags_parser`` for ``launch/*.py``: parses absl's global
    flags (a ``config_flags.DEFINE_config_file("config")`` among them) and
    raises the one-line errors of ``load_config`` instead of absl's usage
    exit or config_flags' traceback."""
    from absl import flags

    # config_flags reads a missing file only on first use, and takes the file
    # from "--config=FILE" or "--config FILE" (the script's required flag).
    at = next((i for i, a in enumerate(argv) if re.match(r"--?config(=|$)", a)), None)
    spec = None
    if at is not None:
        spec = argv[at].split("=", 1)[1] if "=" in argv[at] else (argv[at + 1] if at + 1 < len(argv) else None)
    if spec is not None:
        path = spec.split(":", 1)[0]  # "file.py:arg" passes arg to get_config
        if not Path(path).is_file():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    overrides = [a for a in argv if a.startswith(OVERRIDE_PREFIXES)]
    return _parse_flags(flags.FLAGS, argv, spec, overrides)
