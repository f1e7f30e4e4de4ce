"""Loading config files: ``configs/*.py`` modules with a ``get_config()``.

``load_config`` applies ``--config.a.b=value`` overrides through
ml_collections' ``config_flags``, so ``rag-jax train`` and ``launch/train.py``
accept the same syntax and type checks.
"""
from __future__ import annotations

import errno
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

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


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """``get_config()`` of the config file ``path`` with command-line overrides
    such as ``--config.train.lr=1e-4`` applied, locked against new fields.

    A bad override (unknown field, value of the wrong type) raises a
    one-line ``ValueError`` naming the field.
    """
    from absl import flags
    from ml_collections import config_flags

    path = str(path)
    # config_flags defers a missing file to the first use of the config; fail here instead.
    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    for arg in overrides:
        if not arg.startswith(OVERRIDE_PREFIXES):
            raise ValueError(f"expected a --config.FIELD=VALUE override, got {arg!r}")
    argv = ["rag-jax", f"--config={path}", *overrides]
    # A private FlagValues: nothing leaks into absl's global FLAGS, and each call
    # may load a different file. config_flags finds the overrides in sys_argv.
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
    )
    try:
        fv(argv)
    except flags.Error as e:  # a value of the wrong type, a missing value: absl names the flag
        raise ValueError(str(e)) from None
    except (AttributeError, KeyError):
        # config_flags reports an unknown field by its last component only; find the whole path.
        cfg = load_config_module(path).get_config()
        unknown = next((p for p in map(_override_path, overrides) if not _has_field(cfg, p)), None)
        if unknown is None:
            raise
        raise ValueError(f"--config.{unknown}: no such field in {path}") from None
    return holder.value
