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


def read_json_dict(path) -> dict:
    """A JSON file that must hold an object; errors name the path (missing, invalid, not an
    object)."""
    path = runs.user_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {os.fspath(path)}")
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{os.fspath(path)!r} holds a JSON {type(value).__name__}; expected an "
                         "object")
    return value


def read_config(folder: str) -> dict:
    """Returns the parsed `config.json` of a model folder; errors name the missing path."""
    path = runs.user_path(folder) / "config.json"
    if not runs.user_path(folder).is_dir():
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder!r} (expected {path})")
    return read_json_dict(path)


def check_class(config: Mapping, expected: str, folder: str) -> None:
    """A diffusers config.json's `_class_name`, when present, must be `expected` (e.g. a VAE
    folder given where the transformer belongs is named as such, not by its unknown keys)."""
    name = config.get("_class_name", expected)
    if name != expected:
        raise ValueError(f"{folder}/config.json: _class_name={name!r}; expected {expected!r} "
                         "(the wrong subfolder?)")


# diffusers' and transformers' single-file weight names; `name.<variant>.safetensors` files
# (e.g. fp16 copies) beside them are what from_pretrained skips without `variant=`.
STANDARD_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """Loads every tensor of a folder's safetensors files (single file or sharded with an index);
    floating tensors come as float32, others as stored (`check_names_and_shapes` refuses those
    a model uses)."""
    root = runs.user_path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    names = sorted(p.name for p in root.iterdir())
    index = [n for n in names if n.endswith(WEIGHTS_INDEX_SUFFIX)]
    if index:
        files = _index_files(root / index[0])
    else:
        files = [n for n in names if n.endswith(".safetensors")]
        files = [n for n in files if n in STANDARD_WEIGHTS] or files
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {folder!r} (found: {names}); pickled .bin files are "
            "not read, convert them to safetensors first"
        )
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for name in files:
        for key, value in load_safetensors(root / name).items():
            if key in tensors:
                raise ValueError(f"tensor {key!r} appears in both {where[key]!r} and {name!r} of "
                                 f"{folder!r}: keep one copy of the weights (variant files?)")
            tensors[key], where[key] = _to_float32(value), name
    return tensors


def _index_files(index) -> list[str]:
    """The shard files a `*.safetensors.index.json` lists; missing ones are named."""
    weight_map = read_json_dict(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{os.fspath(index)!r} has no \"weight_map\" object of tensor -> file")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(f"shards {missing} listed in {os.fspath(index)!r} are missing")
    return files


def load_safetensors(path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file; a failure (truncated or corrupt file, a dtype numpy
    has no type for) names the file."""
    try:
        # Local files are memory-mapped by load_file; a remote file is read whole (one at a time).
        return load(path.read_bytes()) if runs.is_remote(path) else load_file(str(path))
    except (AttributeError, TypeError) as e:  # e.g. float8: numpy has no such dtype
        raise ValueError(f"cannot read weights file {os.fspath(path)!r}: it holds a tensor dtype "
                         f"numpy cannot represent ({type(e).__name__}: {e}); save it as float32, "
                         "float16 or bfloat16") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; name the file
        raise ValueError(f"cannot read weights file {os.fspath(path)!r} ({type(e).__name__}: {e}): "
                         "it is truncated or not a safetensors file; download or convert it again"
                         ) from e


def _is_float(dtype) -> bool:
    # bfloat16 is an ml_dtypes type, whose numpy kind is "V" rather than "f"
    return np.dtype(dtype).kind == "f" or str(dtype) == "bfloat16"


def _to_float32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False) if _is_float(x.dtype) else x


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
    not_float = sorted(f"{k}: {got[k].dtype}" for k in set(got) & set(want)
                       if not _is_float(got[k].dtype))
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
    if not_float:
        problems.append(f"tensors that are not floating point {not_float}")
    if problems:
        raise ValueError(f"weights in {where!r} do not fit the model: " + "; ".join(problems))
