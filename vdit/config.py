"""Config loading, command-line overrides and start-up validation.

A config is a Python file in `configs/` whose `get_config()` returns an `ml_collections.ConfigDict`.
Overrides come as `--config.a.b=value` (or `a.b=value`); values are parsed as Python literals and
must keep the type of the key they replace. `validate()` checks the whole config once at start-up
and names the offending key, its value and what is allowed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence

import ml_collections

OVERRIDE_PREFIX = "--config."
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "splash", "block_sparse")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attn")
TEXT_KINDS = ("byte", "word", "umt5")
DTYPES = ("float32", "bfloat16", "float16")


# The config sections each command reads; a recipe lacking one is refused at start-up.
COMMAND_SECTIONS = {
    "train": ("model", "text", "data", "flow", "optim", "train", "checkpoint", "mesh"),
    "distill": ("distill", "data", "flow", "optim", "train", "checkpoint", "mesh", "sample"),
    "encode": ("encode", "vae", "text", "data", "train"),
    "train-vae": ("vae", "vae_train", "data", "optim", "train", "checkpoint", "mesh"),
    "plan": ("model", "text"),  # the rest a plan fills from configs/common.py
}


class ConfigError(ValueError):
    """A config key has a value that cannot work; the message names key, value and what is allowed."""


def require_sections(config: ml_collections.ConfigDict, command: str, name: str = "the config"):
    """Raises ConfigError naming the sections `vdit <command>` needs that `config` lacks."""
    missing = [s for s in COMMAND_SECTIONS.get(command, ()) if s not in config]
    if missing:
        raise ConfigError(f"{name} has no {', '.join(repr(s) for s in missing)} section"
                          f"{'s' if len(missing) > 1 else ''}, which `vdit {command}` needs "
                          f"(it has {sorted(config.keys())}); derive the recipe from one that "
                          "has them (see configs/)")


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from the file at `path`, applies overrides, validates, returns it."""
    config = _call_get_config(path)
    apply_overrides(config, overrides)
    validate(config)
    return config


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def recipe(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the built-in recipe `configs/<name>.py` (for code and user configs outside
    configs/; recipes there derive from each other by relative import, `from . import NAME`)."""
    return _call_get_config(os.path.join(CONFIG_DIR, f"{name}.py"))


def recipe_module(name: str):
    """The module `configs/<name>.py`, e.g. "common", the default sections every recipe starts
    from (`vdit plan` and `vdit convert` fill a missing section from it)."""
    return importlib.import_module(f"{_folder_package(CONFIG_DIR)}.{name}")


def _folder_package(folder: str) -> str:
    """The name of a package whose modules are the Python files of `folder`, so a config file there
    imports its siblings relatively (`from . import common`) whatever folder it lives in. Registered
    in sys.modules once per folder, as importing a package would."""
    folder = os.path.abspath(folder)
    name = "vdit_configs_" + hashlib.sha1(folder.encode()).hexdigest()[:12]
    if name not in sys.modules:
        package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(
            name, None, is_package=True))
        package.__path__ = [folder]
        sys.modules[name] = package
    return name


def _call_get_config(path: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    stem = os.path.splitext(os.path.basename(path))[0]
    # Executed afresh on every load (an edited file is read again); its siblings import as modules.
    spec = importlib.util.spec_from_file_location(
        f"{_folder_package(os.path.dirname(path))}.{stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file (expected configs/*.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r} has a syntax error at line {e.lineno}: "
                          f"{e.msg}") from e
    except Exception as e:  # noqa: BLE001 - any failure inside the user's file names the file
        raise ConfigError(f"config file {path!r} failed to load ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    try:
        config = module.get_config()
    except Exception as e:  # noqa: BLE001 - as above: the message names the file
        raise ConfigError(f"get_config() in {path!r} failed ({type(e).__name__}: {e})") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path!r} returned {type(config).__name__}, "
                          "expected ml_collections.ConfigDict")
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `a.b=value` overrides in place (a leading `--config.` is accepted and stripped)."""
    for item in overrides:
        text = item[len(OVERRIDE_PREFIX):] if item.startswith(OVERRIDE_PREFIX) else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} has no '=': expected --config.KEY=VALUE")
        key, raw = text.split("=", 1)
        set_value(config, key.strip(), parse_value(raw))


def parse_value(raw: str):
    """A Python literal if `raw` parses as one (1, 0.5, True, [1, 5], (2, 2), None), else the string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the dotted `key`; unknown keys and type changes are errors naming the key."""
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            where = ".".join(parents[:depth]) or "<top>"
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not a section of {where}; "
                              f"known: {sorted(node.keys())}")
        node = node[part]
    if leaf not in node and parents == ["mesh"] and leaf.startswith("dcn_"):
        node[leaf] = value  # multi-slice axis sizes: any config's mesh takes them (validated)
        return
    if leaf not in node:
        raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(node.keys())}")
    node[leaf] = _coerce(key, node[leaf], value)


def _coerce(key: str, old, value):
    if old is None or value is None:
        return value
    if isinstance(old, bool) or isinstance(value, bool):
        if isinstance(old, bool) and isinstance(value, bool):
            return value
    elif isinstance(old, float) and isinstance(value, int):
        return float(value)
    elif isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(old)(value)
    elif isinstance(old, type(value)) or isinstance(value, type(old)):
        return value
    raise ConfigError(f"config key {key!r}: got {value!r} ({type(value).__name__}), "
                      f"expected a {type(old).__name__} like the default {old!r}")


# ----------------------------------------------------------------------------------- validation

def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every section present; raises ConfigError on the first impossible value."""
    if "mesh" in config:
        _validate_mesh(config.mesh)
    if "model" in config:
        _check_choice(config.model, "model", "attention", ATTENTION_BACKENDS)
        _check_choice(config.model, "model", "remat", REMAT_POLICIES)
        _check_choice(config.model, "model", "dtype", DTYPES)
        _check_choice(config.model, "model", "matmul_dtype", ("",) + DTYPES)
    if "text" in config:
        _check_choice(config.text, "text", "kind", TEXT_KINDS)
    if "data" in config:
        _validate_data_shapes(config)
    _validate_counts(config)
    _validate_text_pad(config)
    ema = config.get("train", {}).get("ema_decay", None)
    if ema is not None and not 0.0 <= float(ema) <= 1.0:
        raise ConfigError(f"config key 'train.ema_decay' = {ema!r}: expected a number in [0, 1] "
                          "(the share of the old average kept each step)")


# Counts that must be at least 1: a run with steps <= 0 would do nothing and say nothing.
POSITIVE_KEYS = ("train.steps", "train.log_every", "train.max_bad_steps", "checkpoint.every",
                 "checkpoint.keep", "vae_train.steps", "vae_train.batch_size",
                 "data.rows_per_batch", "data.tokens_per_row", "data.text_per_row",
                 "data.max_segments", "optim.grad_accum")
# Counts where 0 means off (or "always").
NON_NEGATIVE_KEYS = ("checkpoint.keep_every", "checkpoint.replica_slice_min_bytes",
                     "data.text_pad_to")


def _validate_counts(config: ml_collections.ConfigDict) -> None:
    for keys, low in ((POSITIVE_KEYS, 1), (NON_NEGATIVE_KEYS, 0)):
        for key in keys:
            section, leaf = key.split(".")
            if section not in config or leaf not in config[section]:
                continue
            value = config[section][leaf]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"config key {key!r} = {value!r}: expected a whole number >= {low}")


def text_pad_to(config) -> int:
    """`data.text_pad_to` of a config (or a saved config dict): 0 when absent (packed text)."""
    return int((config.get("data", {}) or {}).get("text_pad_to", 0) or 0)


def text_masked(config) -> bool:
    """Whether the DiT sees each prompt's real tokens only (`sample.mask_text`), by default as it
    trained: packed text, masked; `data.text_pad_to` blocks (Wan's layout), every position."""
    return bool(config.get("sample", {}).get("mask_text", text_pad_to(config) == 0))


def _validate_text_pad(config: ml_collections.ConfigDict) -> None:
    """A DiT trained on zero-padded text blocks samples on prompts padded the same way
    (`text.max_length` positions, every one attended: `sample.mask_text` False)."""
    pad_to = text_pad_to(config)
    if pad_to <= 0:
        return
    max_length = config.get("text", {}).get("max_length", None)
    if max_length is not None and int(max_length) != pad_to:
        raise ConfigError(f"config key 'data.text_pad_to' = {pad_to} must equal 'text.max_length' "
                          f"= {max_length}: sampling pads each prompt to text.max_length")
    if config.get("sample", {}).get("mask_text", False):
        raise ConfigError("config key 'sample.mask_text' = True with 'data.text_pad_to' = "
                          f"{pad_to}: a DiT trained on padded text attends to the pads when "
                          "sampling too; set sample.mask_text=False or data.text_pad_to=0")


def _check_choice(section, prefix: str, key: str, allowed: Sequence[str]) -> None:
    if key in section and section[key] not in allowed:
        raise ConfigError(f"config key '{prefix}.{key}' = {section[key]!r}; allowed: {list(allowed)}")


def _validate_mesh(mesh) -> None:
    for key in mesh.keys():
        if key == "rules":
            continue
        axis = key[len("dcn_"):] if key.startswith("dcn_") else key
        if axis not in MESH_AXES:
            raise ConfigError(f"unknown config key 'mesh.{key}'; allowed axes: {list(MESH_AXES)} "
                              "(and dcn_<axis> for multi-slice)")
        value = mesh[key]
        if not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(f"config key 'mesh.{key}' = {value!r}; expected a positive int or -1")
    if sum(1 for a in MESH_AXES if mesh.get(a, 1) == -1) > 1:
        raise ConfigError(f"config 'mesh': at most one axis may be -1, got {mesh.to_dict()}")


def check_frames(key: str, frames: int) -> None:
    """Frames must be 1+4k (the VAE keeps the first frame alone, then compresses 4x in time).
    `key` names where the value came from: a config key ("data.frames"), a flag ("--frames") or
    a request field ("frames")."""
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
        lower = max(1, 1 + 4 * ((int(frames) - 1) // 4)) if isinstance(frames, int) else 1
        where = (f"{key} {frames!r}" if key.startswith("--") else
                 f"config key {key!r} = {frames!r}" if "." in key or "[" in key else
                 f"{key!r} = {frames!r}")
        raise ConfigError(f"{where}: frames must be 1+4k (1, 5, 9, 13, 17, ...); nearest valid: "
                          f"{lower} or {lower + 4}")


def spatial_stride(config: ml_collections.ConfigDict) -> int:
    """Pixels per token side: the VAE's spatial downsampling (its coder's, times the pixel patch
    a Wan2.2 VAE folds into channels first) times the DiT's spatial patch."""
    stride = 8
    if "vae" in config and "dim_mult" in config.vae:
        stride = 2 ** (len(config.vae.dim_mult) - 1) * int(config.vae.get("patch_size", None) or 1)
    if "model" in config and "patch_size" in config.model:
        stride *= int(config.model.patch_size[1])
    return stride


def check_size(key: str, size: int, stride: int) -> None:
    if not isinstance(size, int) or size <= 0 or size % stride:
        raise ConfigError(f"config key {key!r} = {size!r}: must be a positive multiple of {stride} "
                          "(the VAE's spatial downsampling times the DiT patch size)")


def _validate_data_shapes(config: ml_collections.ConfigDict) -> None:
    data, stride = config.data, spatial_stride(config)
    for key in ("frames", "height", "width"):
        if key not in data:
            continue
        values = data[key] if isinstance(data[key], (list, tuple)) else [data[key]]
        for value in values:
            if key == "frames":
                check_frames(f"data.{key}", value)
            else:
                check_size(f"data.{key}", value, stride)
    check_shapes("data.shapes", data.get("shapes", None) or (), stride)


def check_shapes(key: str, shapes, stride: int) -> None:
    """A config list of (frames, height, width): frames 1+4k, sizes the stride divides."""
    for i, shape in enumerate(shapes):
        if len(shape) != 3:
            raise ConfigError(f"config key '{key}[{i}]' = {shape!r}: expected "
                              "(frames, height, width)")
        check_frames(f"{key}[{i}].frames", shape[0])
        check_size(f"{key}[{i}].height", shape[1], stride)
        check_size(f"{key}[{i}].width", shape[2], stride)
