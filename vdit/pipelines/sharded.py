"""Sampling on a device mesh (`vdit sample --mesh fsdp=4,tensor=2`, `vdit serve --mesh ...`).

`on_mesh(gen, mesh)` places a Generator's weights on `mesh` as training shards them: the DiT (and a
Wan2.2 second expert `dit_2`), text encoder and CLIP image encoder by their parameters' logical
axis names under `DIT_RULES` (ZeRO-3: `embed` over fsdp, `heads`/`mlp`/`vocab` over tensor), the
VAE replicated. The returned `MeshGenerator` runs text encoding, sampling and the VAE under the
mesh and the logical rules, so the modules' activation constraints apply; a call's batch goes
over data (+fsdp) when it divides, else its inputs are replicated; inside the DiT, classifier-free
guidance's doubled batch (cond + uncond rows, one call) goes over them when it divides (a batch of
1 on data=2 still splits its 2 rows). Arrays are built from host copies with
`jax.make_array_from_callback`, so the mesh may span several processes (jax.distributed);
results come back replicated (readable on every process) and `is_writer()` says which process
writes files. `load_on_mesh` loads a model onto the host first (the CPU device), so a model
larger than one accelerator's memory never lands whole on one.
Results equal one device's up to float rounding (float32: ~1e-6); bfloat16 operands round
differently once heads (tensor) or tokens (sequence) are split, as they do in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.config import MESH_AXES
from vdit.parallel.mesh import logical_rules, logical_to_mesh_spec, make_mesh, undivided
from vdit.pipelines.generate import Generator

FLAG = "--mesh"
BATCH_AXES = (("data", "fsdp"), ("data",), ())  # tried in order: the first that divides a batch
# What each model's logically named axes are, for errors naming the dimension a mesh cannot split.
DIMENSIONS = {
    "the DiT": {"heads": "attention heads (num_attention_heads)", "mlp": "ffn_dim",
                "embed": "width (num_attention_heads x attention_head_dim)"},
    "the text encoder": {"heads": "attention heads (num_heads)", "mlp": "d_ff",
                         "embed": "width (d_model)", "vocab": "vocab_size"},
    "the CLIP image encoder": {"heads": "attention heads (num_attention_heads)",
                               "mlp": "intermediate_size", "embed": "width (hidden_size)"},
}


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=4,tensor=2" -> {"fsdp": 4, "tensor": 2}; one size may be -1 (the rest of the
    devices). Errors name --mesh, the value and what is wrong."""
    sizes: dict[str, int] = {}
    for part in str(text).split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise ValueError(f"{FLAG} {text!r}: expected AXIS=SIZE[,AXIS=SIZE...] over the axes "
                             f"{', '.join(MESH_AXES)}, e.g. fsdp=4,tensor=2")
        if name not in MESH_AXES:
            raise ValueError(f"{FLAG} {text!r}: unknown axis {name!r}; the axes are "
                             f"{', '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"{FLAG} {text!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"{FLAG} {text!r}: {name}={value!r} is not a whole number") from None
        if size == 0 or size < -1:
            raise ValueError(f"{FLAG} {text!r}: {name}={size}; a size is >= 1, or -1 for the "
                             "rest of the devices")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"{FLAG} {text!r}: only one axis may be -1 (the rest of the devices)")
    return sizes


def mesh_from_flag(text: str | None, devices=None) -> Mesh | None:
    """The mesh `--mesh text` asks for over all (or the given) devices; None without the flag."""
    if text is None:
        return None
    sizes = parse_mesh(text)
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values() and len(devices) % known:
        raise ValueError(f"{FLAG} {text}: the fixed sizes multiply to {known}, which does not "
                         f"divide the {len(devices)} devices")
    if -1 not in sizes.values() and known != len(devices):
        raise ValueError(f"{FLAG} {text}: the sizes multiply to {known}, but there are "
                         f"{len(devices)} devices; make them multiply to {len(devices)} (or give "
                         "one axis -1: the rest)")
    return make_mesh(sizes, devices)


def describe(mesh: Mesh) -> str:
    """The --mesh value of `mesh` ("fsdp=4,tensor=2")."""
    return ",".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES if mesh.shape[a] > 1) or "data=1"


def is_writer() -> bool:
    """Whether this process writes output files (process 0; every process samples)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def _host_default(on: bool):
    """Arrays created inside land on the CPU device (host memory) when `on` and one exists."""
    try:
        cpu = jax.local_devices(backend="cpu")[0] if on else None
    except RuntimeError:  # no CPU backend in this process: load as usual
        cpu = None
    with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
        yield


def load_on_mesh(mesh_text: str | None, load, *args, **kwargs):
    """`load(*args, **kwargs)` -> (Generator, kind); with `mesh_text` (--mesh) the model loads on
    the host and is placed on that mesh (`on_mesh`); without it this is `load` alone."""
    mesh = mesh_from_flag(mesh_text)
    with _host_default(mesh is not None):
        gen, kind = load(*args, **kwargs)
    return (gen, kind) if mesh is None else (on_mesh(gen, mesh), kind)


# ------------------------------------------------------------------ weights


def _dit_names(dit) -> dict:
    s, length = 4, 4
    ones = lambda n: jnp.ones((1, n), jnp.int32)
    image = ({"image_context": jnp.zeros((1, dit.pos_embed_seq_len or 1, dit.image_dim))}
             if dit.has_image_branch else {})
    return jax.eval_shape(lambda r: dit.init(
        r, jnp.zeros((1, s, dit.token_in_dim)), jnp.zeros((1, s, 3), jnp.int32), ones(s),
        jnp.zeros((1, 1)), jnp.zeros((1, length, dit.text_dim)), ones(length), method="packed",
        **image), jax.random.key(0))["params"]


def _text_names(model) -> dict:
    ids = jnp.ones((1, 4), jnp.int32)
    return jax.eval_shape(lambda r: model.init(r, ids, ids), jax.random.key(0))["params"]


def _image_names(model) -> dict:
    pixels = jnp.zeros((1, model.image_size, model.image_size, model.num_channels))
    return jax.eval_shape(lambda r: model.init(r, pixels), jax.random.key(0))["params"]


def shard_params(params, boxed, mesh: Mesh, rules, what: str):
    """`params` (host or device arrays) placed on `mesh` by the logical names of `boxed` (an
    abstract boxed init of the same module); a leaf `boxed` lacks stays replicated. A dimension
    its mesh axes do not divide is a ValueError naming --mesh and the model dimension."""
    problems = []
    for _, size, name, axes in undivided(boxed, mesh, rules):
        axes_text = "x".join(f"{a}={mesh.shape[a]}" for a in axes)
        dim = DIMENSIONS.get(what, {}).get(name, f"{name!r} axis")
        problems.append(f"{what}'s {dim} is {size}, which {axes_text} does not divide")
    if problems:
        raise ValueError(f"{FLAG} {describe(mesh)}: " + "; ".join(dict.fromkeys(problems))
                         + "; choose axis sizes that divide these")
    names = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    return traverse_util.unflatten_dict({
        key: put(x, NamedSharding(mesh, logical_to_mesh_spec(tuple(names.get(key) or ()), rules)))
        for key, x in traverse_util.flatten_dict(params).items()})


def put(x, sharding: NamedSharding) -> jax.Array:
    """One array onto `sharding` from its host copy (each process places its own shards)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def on_mesh(gen: Generator, mesh: Mesh) -> MeshGenerator:
    """`gen` with its weights placed on `mesh` (module doc); the VAE replicated."""
    rules = logical_rules("dit")
    fields = {f.name: getattr(gen, f.name) for f in dataclasses.fields(Generator)}
    fields["dit_params"] = shard_params(gen.dit_params, _dit_names(gen.dit), mesh, rules,
                                        "the DiT")
    if gen.dit_2 is not None:
        fields["dit_2_params"] = shard_params(gen.dit_2_params, _dit_names(gen.dit_2), mesh,
                                              rules, "the DiT")
    if gen.text_model is not None:
        fields["text_params"] = shard_params(gen.text_params, _text_names(gen.text_model), mesh,
                                             rules, "the text encoder")
    if gen.image_encoder is not None:
        fields["image_encoder_params"] = shard_params(
            gen.image_encoder_params, _image_names(gen.image_encoder), mesh, rules,
            "the CLIP image encoder")
    whole = NamedSharding(mesh, PartitionSpec())
    fields["vae_params"] = jax.tree.map(lambda x: put(x, whole), gen.vae_params)
    return MeshGenerator(**fields, mesh=mesh, rules=rules)


# ------------------------------------------------------------------ calls


def _identity(x):
    return x


# sample()'s keywords that carry a batch axis first (pin: a pair of such arrays)
BATCHED = ("context_mask", "negative_mask", "init_latents", "condition", "image_context",
           "first_frame", "pin")


@dataclasses.dataclass
class MeshGenerator(Generator):
    """A Generator whose weights live on `mesh` (see `on_mesh`); same methods and results."""

    mesh: Any = None
    rules: tuple = ()

    def batch_axes(self, batch: int) -> tuple[str, ...]:
        """The mesh axes a batch of `batch` rows is split over: data+fsdp, or data, or none."""
        return next(axes for axes in BATCH_AXES
                    if batch % math.prod(self.mesh.shape[a] for a in axes) == 0)

    @contextlib.contextmanager
    def under(self, batch: int):
        """The mesh and the logical rules, `activation_batch` as `batch_axes(batch)`."""
        axes = self.batch_axes(batch)
        rules = tuple((k, (axes or None) if k == "activation_batch" else v)
                      for k, v in self.rules)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
            yield

    def place(self, x, batch: int):
        """A [batch, ...] input (host or device) onto the mesh, split as `batch_axes` says."""
        if x is None:
            return None
        if isinstance(x, (tuple, list)):
            return type(x)(self.place(v, batch) for v in x)
        axes = self.batch_axes(batch)
        return put(x, NamedSharding(self.mesh, PartitionSpec(axes or None)))

    def replicated(self, x):
        """A result on every device (so every process can read it whole)."""
        whole = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(_identity, out_shardings=whole)(x)

    def encode_text(self, prompts):
        with self.under(len(prompts)):
            return super().encode_text(prompts)

    def encode_video(self, video):
        b = np.shape(video)[0]
        with self.under(b):
            return super().encode_video(self.place(video, b))

    def decode(self, latents):
        b = np.shape(latents)[0]
        with self.under(b):
            return self.replicated(super().decode(self.place(latents, b)))

    def image_tokens(self, images):
        with self.under(np.shape(images)[0]):
            return super().image_tokens(images)

    def check_tokens(self, latent_shape) -> None:
        """`check_tokens` on this mesh and DiT (the in-call check: a server's per-request size)."""
        check_tokens(self.mesh, latent_shape, self.dit.patch_size)

    def guided_rows(self, b: int, context, negative_context, guidance: float,
                    guidance_2: float | None, context_mask=None, negative_mask=None) -> int:
        """The rows of each DiT call `sample` makes for a batch of b, given resolved scales
        (`guidance_scales`): 2b when classifier-free guidance stacks cond and uncond rows into
        one call for every expert (CFGVelocity does when the texts' shapes agree; an expert at
        guidance 1 calls on cond alone), else b."""
        scales = [guidance] + ([guidance if guidance_2 is None else float(guidance_2)]
                               if self.dit_2 is not None else [])
        text = lambda ctx, mask: (np.shape(ctx)[1:], np.shape(ctx if mask is None else mask)[1:2])
        stacked = (negative_context is not None and 1.0 not in scales
                   and text(context, context_mask) == text(negative_context, negative_mask))
        return 2 * b if stacked else b

    def sample(self, noise, context, negative_context, steps=None, guidance=None,
               output="video", *, guidance_2=None, **kwargs):
        """Generator.sample on the mesh: inputs split by `batch_axes(b)`; inside the DiT the
        activations by `batch_axes` of its calls' rows (`guided_rows`: a batch of 1 with guidance
        goes over data=2 as its 2 cond + uncond rows)."""
        b = np.shape(noise)[0]
        self.check_tokens(np.shape(noise))
        guidance, guidance_2 = self.guidance_scales(guidance, guidance_2)
        rows = self.guided_rows(b, context, negative_context, guidance, guidance_2,
                                kwargs.get("context_mask"), kwargs.get("negative_mask"))
        kwargs = {k: self.place(v, b) if k in BATCHED else v for k, v in kwargs.items()}
        noise, context, negative_context = (self.place(x, b) for x in
                                            (noise, context, negative_context))
        with self.under(rows):  # decode (inside) enters under(b) itself
            return self.replicated(super().sample(noise, context, negative_context, steps,
                                                  guidance, output, guidance_2=guidance_2,
                                                  **kwargs))


def check_tokens(mesh: Mesh, latent_shape, patch_size) -> None:
    """Sequence parallelism splits each video's tokens: their count (latents [B, T', H', W', C]
    in `patch_size` patches) must divide over the sequence axis; said in the sampling flags'
    words, before anything compiles (`vdit sample` asks before loading the weights)."""
    split = mesh.shape["sequence"]
    grid = [n // p for n, p in zip(latent_shape[1:4], patch_size)]
    if math.prod(grid) % split:
        raise ValueError(
            f"{FLAG} {describe(mesh)}: a video here is {math.prod(grid)} tokens "
            f"({'x'.join(map(str, grid))} patches of latent frames x height x width), which "
            f"sequence={split} does not divide; choose --frames / --size so that it does, or "
            "a smaller sequence size")
