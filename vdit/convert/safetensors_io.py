"""Reading and writing Hugging Face model folders: config.json plus (possibly sharded) safetensors.

Shared by the per-model converters in `vdit/convert/`. Never unpickles anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

WEIGHTS_INDEX_SUFFIX = ".safetensors.index.json"


def read_config(folder: str) -> dict:
    """Returns the parsed `config.json` of a model folder; errors name the missing path."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model folder {folder!r} (expected {path})")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{path!r} is not valid JSON ({e})") from e


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """Loads every tensor of a folder's safetensors files (single file or sharded with an index)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    names = sorted(os.listdir(folder))
    index = [n for n in names if n.endswith(WEIGHTS_INDEX_SUFFIX)]
    if index:
        with open(os.path.join(folder, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {folder!r} (found: {names}); pickled .bin files are "
            "not read, convert them to safetensors first"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(folder, name)
        for key, value in _load_named(path).items():
            if key in tensors:
                raise ValueError(f"tensor {key!r} appears in more than one file of {folder!r}")
            tensors[key] = _to_float32_if_half(value)
    return tensors


def _load_named(path: str) -> dict[str, np.ndarray]:
    """load_file, with a failure (truncated or corrupt file) naming the file."""
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; name the file
        raise ValueError(f"cannot read weights file {path!r} ({type(e).__name__}: {e}): it is "
                         "truncated or not a safetensors file; download or convert it again") from e


def _to_float32_if_half(x: np.ndarray) -> np.ndarray:
    # bf16 arrives as a numpy dtype only with ml_dtypes; upcast all half types for the pytree.
    if x.dtype.kind == "f" and x.dtype.itemsize < 4 or str(x.dtype) == "bfloat16":
        return x.astype(np.float32)
    return x


def write_folder(folder: str, config: Mapping, tensors: Mapping[str, np.ndarray],
                 weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
    """Writes config.json and one safetensors file; tensors are made contiguous first."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()},
              os.path.join(folder, weights_name))


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
