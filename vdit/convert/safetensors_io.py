"""Reading and writing Hugging Face model folders: config.json plus (possibly sharded) safetensors.

Shared by the per-model converters in `vdit/convert/`. Never unpickles anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load, load_file, save

from vdit import runs

WEIGHTS_INDEX_SUFFIX = ".safetensors.index.json"


def read_config(folder: str) -> dict:
    """Returns the parsed `config.json` of a model folder; errors name the missing path."""
    path = runs.user_path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder!r} (expected {path})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({e})") from e


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """Loads every tensor of a folder's safetensors files (single file or sharded with an index)."""
    root = runs.user_path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    names = sorted(p.name for p in root.iterdir())
    index = [n for n in names if n.endswith(WEIGHTS_INDEX_SUFFIX)]
    if index:
        files = sorted(set(json.loads((root / index[0]).read_text())["weight_map"].values()))
    else:
        files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {folder!r} (found: {names}); pickled .bin files are "
            "not read, convert them to safetensors first"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        for key, value in _load(root / name).items():
            if key in tensors:
                raise ValueError(f"tensor {key!r} appears in more than one file of {folder!r}")
            tensors[key] = _to_float32_if_half(value)
    return tensors


def _load(path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file; a failure (truncated or corrupt file) names the file."""
    try:
        # Local files are memory-mapped by load_file; a remote file is read whole (one at a time).
        return load(path.read_bytes()) if runs.is_remote(path) else load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; name the file
        raise ValueError(f"cannot read weights file {os.fspath(path)!r} ({type(e).__name__}: {e}): "
                         "it is truncated or not a safetensors file; download or convert it again"
                         ) from e


def _to_float32_if_half(x: np.ndarray) -> np.ndarray:
    # bf16 arrives as a numpy dtype only with ml_dtypes; upcast all half types for the pytree.
    if x.dtype.kind == "f" and x.dtype.itemsize < 4 or str(x.dtype) == "bfloat16":
        return x.astype(np.float32)
    return x


def write_folder(folder: str, config: Mapping, tensors: Mapping[str, np.ndarray],
                 weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
    """Writes config.json and one safetensors file; tensors are made contiguous first."""
    root = runs.user_path(folder)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    (root / weights_name).write_bytes(
        save({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}))


def check_names_and_shapes(got: Mapping[str, np.ndarray], want: Mapping[str, tuple],
                           where: str) -> None:
    """Raises naming every missing, unexpected or mis-shaped tensor (`want`: name -> shape)."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = sorted(
        f"{k}: got {tuple(got[k].shape)}, expected {tuple(want[k])}"
        for k in set(got) & set(want)
        if tuple(got[k].shape) != tuple(want[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if bad:
        problems.append(f"mis-shaped tensors {bad}")
    if problems:
        raise ValueError(f"weights in {where!r} do not fit the model: " + "; ".join(problems))
