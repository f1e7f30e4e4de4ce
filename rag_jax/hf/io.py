"""Reading and writing HuggingFace checkpoint directories, and a declarative,
strict key map between HF state-dict keys and flax parameter paths.

Every model converter (``hf_bert``, ``hf_bart``, ``hf_rag``) is a list of
``Rule``s; ``import_params`` fails on any HF key that no rule consumes, any
flax parameter no rule fills, and any shape mismatch, naming the key and file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory cannot be converted; the message says why."""


# ---------------------------------------------------------------------------
# Directory I/O
# ---------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: no config.json in checkpoint directory {path}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(file)))
    except Exception as e:  # safetensors raises its own error types
        if "bfloat16" in str(e).lower() or "bf16" in str(e).lower():
            return _load_safetensors_via_torch(file)
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e


def _load_safetensors_via_torch(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: F401
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(f"{file}: bfloat16 tensors need torch installed to read") from e
    return {k: v.float().numpy() for k, v in load_file(str(file)).items()}


def _load_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{file}: reading pytorch_model.bin needs torch (pip install 'rag_jax[test]'); "
            "or convert the directory to model.safetensors"
        ) from e
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _load_sharded(path: Path, index_name: str, loader) -> dict[str, np.ndarray]:
    index_file = path / index_name
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_file}: not a valid shard index ({e})") from e
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = path / shard
        if not shard_file.is_file():
            raise CheckpointError(f"{index_file}: shard {shard} is missing")
        out.update(loader(shard_file))
    missing = set(weight_map) - set(out)
    if missing:
        raise CheckpointError(f"{index_file}: keys listed but not found in shards: {sorted(missing)[:5]}")
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory as numpy arrays (float32 for floats)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if (path / SAFE_WEIGHTS).is_file():
        state = _load_safetensors(path / SAFE_WEIGHTS)
    elif (path / SAFE_INDEX).is_file():
        state = _load_sharded(path, SAFE_INDEX, _load_safetensors)
    elif (path / TORCH_WEIGHTS).is_file():
        state = _load_torch_bin(path / TORCH_WEIGHTS)
    elif (path / TORCH_INDEX).is_file():
        state = _load_sharded(path, TORCH_INDEX, _load_torch_bin)
    else:
        raise CheckpointError(
            f"{path}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or {TORCH_INDEX})"
        )
    return {
        k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in state.items()
    }


def weights_file(path: str | os.PathLike) -> str:
    """Which weights file of ``path`` is read (for error messages)."""
    path = Path(path)
    for name in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX):
        if (path / name).is_file():
            return str(path / name)
    return str(path)


def write_hf_dir(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    extra_files: Mapping[str, str | os.PathLike] | None = None,
) -> None:
    """Writes ``config.json`` + ``model.safetensors`` (+ copied files) atomically.

    The directory is assembled under a temporary name beside ``path`` and
    renamed into place, so an interrupted export never looks complete.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(arrays, str(tmp / SAFE_WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------
# Declarative key maps
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One HF key <-> one flax parameter.

    ``hf`` and ``flax`` may contain ``{i}`` (a layer index). ``kind``:
      * ``"copy"``: same values, reshaped to the target shape (biases of
        ``[heads, head_dim]`` are flat ``[heads*head_dim]`` in HF);
      * ``"linear"``: torch ``Linear.weight`` ``[out, in]``; flax kernel is its
        transpose, reshaped; ``in_dims`` says how many leading flax dims are
        input dims (2 for the attention output ``[heads, head_dim, embed]``).
    """

    hf: str
    flax: str
    kind: str = "copy"
    in_dims: int = 1


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _to_flax(value: np.ndarray, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "linear":
        if value.ndim != 2:
            raise ValueError(f"expected a 2-D Linear weight, got shape {value.shape}")
        n_in, n_out = int(np.prod(shape[: rule.in_dims])), int(np.prod(shape[rule.in_dims :]))
        if value.shape != (n_out, n_in):
            raise ValueError(f"Linear weight of shape {value.shape} does not fit kernel shape {shape}")
        return value.T.reshape(shape)
    if rule.kind != "copy":
        raise ValueError(f"unknown rule kind {rule.kind}")
    if value.ndim == len(shape) and tuple(value.shape) != tuple(shape):
        raise ValueError(f"shape {value.shape} does not fit parameter shape {shape}")
    if int(np.prod(value.shape)) != int(np.prod(shape)):
        raise ValueError(f"shape {value.shape} does not fit parameter shape {shape}")
    return value.reshape(shape)


def _to_hf(value: np.ndarray, rule: Rule) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    if rule.kind == "linear":
        n_in = int(np.prod(value.shape[: rule.in_dims]))
        return value.reshape(n_in, -1).T
    if rule.flax.endswith("bias") and value.ndim > 1:
        return value.reshape(-1)  # [heads, head_dim] biases are flat in torch
    return value


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params -> ``{"a/b/kernel": leaf}``, the paths ``Rule.flax`` names."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`."""
    return traverse_util.unflatten_dict(flat, sep="/")


def import_params(
    state: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    source: str,
    ignore: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Maps an HF state dict onto a flat ``{"a/b/kernel": array}`` dict.

    ``target_shapes`` is the flattened shape tree of the flax model; ``ignore``
    are regexes for HF keys known to carry nothing the flax model uses
    (buffers such as ``position_ids``). Everything else must match exactly.
    """
    rules = list(rules)
    ignore_res = [re.compile(p) for p in ignore]
    compiled = [(_template_regex(r.hf), r) for r in rules]
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for key, value in state.items():
        for regex, rule in compiled:
            m = regex.match(key)
            if m:
                flax_key = rule.flax.replace("{i}", m.group(1)) if m.groups() else rule.flax
                if flax_key not in target_shapes:
                    unmapped.append(f"{key} (would fill {flax_key}, which this config does not have)")
                    break
                if flax_key in out:
                    raise CheckpointError(f"{source}: two weights map onto {flax_key} (second: {key})")
                try:
                    out[flax_key] = _to_flax(value, rule, tuple(target_shapes[flax_key]))
                except ValueError as e:
                    raise CheckpointError(f"{source}: weight {key!r} -> {flax_key}: {e}") from None
                break
        else:
            if not any(p.search(key) for p in ignore_res):
                unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{source}: {len(unmapped)} unexpected weight(s) not used by the model: "
            + ", ".join(unmapped[:10])
        )
    missing = sorted(set(target_shapes) - set(out))
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} model parameter(s) missing from the checkpoint: "
            + ", ".join(missing[:10])
        )
    return out


def export_params(flat_params: Mapping[str, Any], rules: Iterable[Rule]) -> dict[str, np.ndarray]:
    """Inverse of ``import_params``: flat flax params -> HF state dict."""
    rules = list(rules)
    compiled = [(_template_regex(r.flax), r) for r in rules]
    out: dict[str, np.ndarray] = {}
    for key, value in flat_params.items():
        for regex, rule in compiled:
            m = regex.match(key)
            if m:
                hf_key = rule.hf.replace("{i}", m.group(1)) if m.groups() else rule.hf
                out[hf_key] = _to_hf(np.asarray(value), rule)
                break
        else:
            raise CheckpointError(f"no HF key for parameter {key}")
    return out


def check_config_keys(
    config: Mapping[str, Any], handled: Iterable[str], inert: Iterable[str], source: str
) -> None:
    """Rejects HF config attributes that would change the math but we ignore.

    ``handled`` are read by the converter; ``inert`` are known not to affect
    the forward pass (ids, names, generation defaults, dropout...).
    """
    known = set(handled) | set(inert)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise CheckpointError(
            f"{source}: unsupported config attribute(s) {unknown}; rag_jax does not implement "
            "them and refuses to silently ignore them"
        )


def require_value(config: Mapping[str, Any], key: str, allowed: Iterable[Any], source: str) -> None:
    """Fails if an attribute is set to a value we do not implement."""
    if key in config and config[key] not in tuple(allowed):
        raise CheckpointError(
            f"{source}: config attribute {key}={config[key]!r} is not supported "
            f"(supported: {list(allowed)})"
        )
