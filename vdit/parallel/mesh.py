"""Device meshes, logical-axis rules and multi-host start-up.

Modules name their parameter and activation axes logically (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this file maps those names onto the mesh axes
`data`, `fsdp`, `tensor`, `sequence`. The sizes come from `config.mesh` (-1 = the rest of the
devices); the rule tables below are the defaults and a config may override any entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vdit.config import MESH_AXES

# Logical name -> mesh axis (or tuple of axes, or None = replicated). MaxDiffusion-style: batch over
# data+fsdp, weights' embed dim over fsdp (ZeRO-3), heads and MLP over tensor, tokens over sequence.
DIT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_kv_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_text_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch_in", None),
    ("text_embed", None),
    ("time_embed", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("modulation", None),
)

# The VAE is convolutional and small next to the DiT: shard the batch, split output channels of
# wide convolutions over tensor, keep time/space whole (causal convs carry caches along time).
VAE_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_time", None),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_kernel", None),
    ("norm", None),
)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Fills the single -1 (if any) so the product is num_devices; errors name the mesh config."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    values = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, v in enumerate(values) if v == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {dict(zip(MESH_AXES, values))}")
    if any(v == 0 or v < -1 for v in values):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, values))}")
    known = math.prod(v for v in values if v != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                f"{dict(zip(MESH_AXES, values))} (product {known})")
        values[free[0]] = num_devices // known
    if math.prod(values) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, values))} needs {math.prod(values)} devices, "
            f"but {num_devices} are available")
    return tuple(values)


def make_mesh(sizes: dict[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes `MESH_AXES`; sizes default to data=-1."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_axis_sizes(dict(sizes or {"data": -1}), len(devices))
    # Auto axes: shardings flow from the logical constraints and jit's in/out shardings (flax
    # linen's model), not from JAX's explicit sharding-in-types mode.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_rules(kind: str, overrides: dict | None = None) -> tuple:
    """The rule table for `kind` ('dit' or 'vae'), with per-name overrides from the config."""
    table = {"dit": DIT_RULES, "vae": VAE_RULES}
    if kind not in table:
        raise ValueError(f"unknown rule table {kind!r}; expected one of {sorted(table)}")
    rules = dict(table[kind])
    for name, axes in (overrides or {}).items():
        if name not in rules:
            raise ValueError(f"config.mesh.rules: unknown logical axis {name!r}; "
                             f"known for {kind}: {sorted(rules)}")
        rules[name] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(rules.items())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_to_mesh_spec(names, rules) -> PartitionSpec:
    """Logical axis names of one array -> its PartitionSpec under `rules`.

    Unlike flax's helper this allows a logical name to repeat (a conv kernel's spatial axes) and
    never uses a mesh axis twice in one array: a later dimension whose mesh axis is taken stays
    whole. A name without a rule is an error (a rule of None replicates): a typo or a new
    parameter must not silently end up whole on every device.
    """
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {sorted(table)});"
                             " add one to the rule tables in vdit/parallel/mesh.py")
        axes = table.get(name)
        axes_t = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if not axes_t or used & set(axes_t):
            spec.append(None)
            continue
        used |= set(axes_t)
        spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
    return PartitionSpec(*spec)


def undivided(boxed, mesh: Mesh, rules) -> list[tuple[str, int, str, tuple[str, ...]]]:
    """(path, size, logical name, mesh axes) of every dimension of a boxed tree's leaves (flax
    `Partitioned`, e.g. `jax.eval_shape` of an init) that `rules` split over mesh axes whose
    sizes multiply to a number that does not divide it. Callers word the error (train names the
    config keys, sampling the --mesh flag)."""
    boxes = lambda x: isinstance(x, nn.Partitioned)
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=boxes):
        if not boxes(leaf):
            continue
        spec = logical_to_mesh_spec(leaf.names, rules)
        for size, name, axes in zip(leaf.value.shape, leaf.names, spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if size % math.prod(int(mesh.shape[a]) for a in axes):
                found.append((jax.tree_util.keystr(path), size, name, axes))
    return found


# ------------------------------------------------------------------ multi-slice (DCN) meshes

DCN_PREFIX = "dcn_"


def split_mesh_config(mesh_cfg) -> tuple[dict, dict]:
    """config.mesh -> (per-slice sizes, dcn sizes); keys `dcn_<axis>` size the slow network."""
    items = {k: v for k, v in dict(mesh_cfg).items() if k != "rules"}
    dcn = {k[len(DCN_PREFIX):]: int(v) for k, v in items.items() if k.startswith(DCN_PREFIX)}
    ici = {k: v for k, v in items.items() if not k.startswith(DCN_PREFIX)}
    unknown = sorted(set(dcn) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown dcn axes {[DCN_PREFIX + a for a in unknown]}; "
                         f"allowed: {[DCN_PREFIX + a for a in MESH_AXES]}")
    return ici, dcn


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh `config.mesh` asks for: `make_mesh`, or `make_hybrid_mesh` when dcn_* > 1."""
    ici, dcn = split_mesh_config(mesh_cfg)
    if all(v == 1 for v in dcn.values()):
        return make_mesh(ici, devices)
    return make_hybrid_mesh(ici, dcn, devices)


def make_hybrid_mesh(ici_sizes: dict[str, int], dcn_sizes: dict[str, int],
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A multi-slice mesh: axis i has size ici[i] * dcn[i], the dcn factor crossing slices.

    Slices are the devices' `slice_index` (TPU multi-slice) where it takes several values, else
    the processes (CPU, most GPU clusters). Unnamed dcn axes are 1; one may be -1 (= the rest).
    """
    devices = list(devices) if devices is not None else jax.devices()
    by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    granules = {getattr(d, "slice_index" if by_slice else "process_index") for d in devices}
    dcn = dict.fromkeys(MESH_AXES, 1) | dict(dcn_sizes)
    try:
        dcn_shape = resolve_axis_sizes(dcn, len(granules))
    except ValueError as e:
        raise ValueError(_dcn_mismatch(dcn, len(granules), by_slice, e)) from e
    ici_shape = resolve_axis_sizes(dict(ici_sizes or {"data": -1}), len(devices) // len(granules))
    array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                 process_is_granule=not by_slice)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _dcn_mismatch(dcn: dict[str, int], granules: int, by_slice: bool, error: ValueError) -> str:
    """The dcn sizes against the job's slices, in the user's keys (`dcn_data=2 needs 2 slices
    (processes), this job has 1`), not resolve_axis_sizes's generic device count."""
    named = {DCN_PREFIX + a: int(v) for a, v in dcn.items() if int(v) != 1}
    keys = ", ".join(f"{k}={v}" for k, v in named.items())
    what = "slices" if by_slice else "slices (processes)"
    known = math.prod(v for v in named.values() if v != -1)
    if any(v == 0 or v < -1 for v in named.values()) or list(named.values()).count(-1) > 1:
        return f"config.mesh.dcn_*: {error}"
    need = f"a multiple of {known}" if -1 in named.values() else str(known)
    return f"config.mesh {keys} needs {need} {what}, this job has {granules}"
