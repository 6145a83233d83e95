"""`vdit sample`'s flags read and checked against the model before its weights load: the clip
size (--frames, --size, else the model's settings) and a --mesh sequence split (the README
promises flags are checked first; a 14B model takes minutes to load). The model's VAE and DiT
modules are built from a vdit run's saved config or a diffusers folder's config.json files,
without weights."""

from __future__ import annotations

import ml_collections

from vdit import runs
from vdit.convert import diffusers_folder as folder_lib
from vdit.convert import run_record
from vdit.convert.diffusers_folder import is_pipeline_folder
from vdit.convert.safetensors_io import read_config
from vdit.convert.wan_dit import model_config_from_diffusers
from vdit.models.dit import build_dit
from vdit.models.vae_config import vae_from_config
from vdit.pipelines import sharded
from vdit.pipelines.generate import latent_shape
from vdit.runs import checkpoint
from vdit.train.init_from import resolve


def opt(args, name: str, default=None):
    """A flag's value, `default` when the parser lacks it or left it None (vdit serve's parser
    defines fewer flags than vdit sample's)."""
    value = getattr(args, name, None)
    return default if value is None else value


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 64x64")
    return int(parts[0]), int(parts[1])


def check_size(text: str, multiples: tuple[int, int], why: str) -> None:
    """--size HxW against the model's (height, width) `multiples`; the error names the nearest
    valid sizes."""
    height, width = parse_size(text)
    if all(s > 0 and s % m == 0 for s, m in zip((height, width), multiples)):
        return
    mh, mw = multiples
    down = f"{max(mh, height // mh * mh)}x{max(mw, width // mw * mw)}"
    up = f"{max(mh, -(-height // mh) * mh)}x{max(mw, -(-width // mw) * mw)}"
    valid = " or ".join(dict.fromkeys((down, up)))
    raise ValueError(f"--size {text}: height must be a positive multiple of {multiples[0]} and "
                     f"width of {multiples[1]} ({why}); nearest valid: {valid}")


def size_multiples(vae, dit) -> tuple[tuple[int, int], str]:
    """((height, width) pixel multiples, why) of a model: the VAE's spatial factor times the DiT's
    patch."""
    f, (_, ph, pw) = vae.spatial_factor, dit.patch_size
    patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
    return (f * ph, f * pw), f"the VAE's {f}x downsampling times the DiT's patch {patch}"


def model_facts(workdir: str):
    """(VAE, DiT, sampling defaults) of a vdit run's saved config or a diffusers folder's
    config.json files: the modules without their weights, for checking flags before the (slow)
    load; None when they do not read here (the load names what is wrong with the folder)."""
    try:
        if is_pipeline_folder(workdir):
            sub = lambda name: str(runs.user_path(workdir) / name)
            return (vae_from_config(read_config(sub("vae"))),
                    build_dit(model_config_from_diffusers(read_config(sub("transformer")))),
                    folder_lib.sampling_defaults(folder_lib.read_index(workdir)))
        config = ml_collections.ConfigDict(checkpoint.read_config(*resolve(workdir)))
        return (vae_from_config(config.vae), build_dit(config.model),
                run_record.run_defaults(config))
    except Exception:  # noqa: BLE001 - the load reports what is wrong with the folder
        return None


def check_early(args, facts) -> None:
    """--size and --frames against the model, and a --mesh sequence split against a video's
    tokens, before the weights load (the README promises flags are checked first); SampleJob and
    MeshGenerator.check_tokens check again (frames from an input video are known only then)."""
    if facts is None:
        return
    vae, dit, defaults = facts
    if args.size:
        check_size(args.size, *size_multiples(vae, dit))
    frames, height, width = clip_size(args, defaults)
    if frames is None:
        return
    shape = latent_shape(vae, dit, frames, height, width)
    mesh = opt(args, "mesh")
    if mesh is not None and sharded.parse_mesh(mesh).get("sequence", 1) > 1:
        sharded.check_tokens(sharded.mesh_from_flag(mesh), (1, *shape), dit.patch_size)


def clip_size(args, defaults: dict, video_frames: int | None = None):
    """(frames, height, width) of the clips a run samples: --frames / --size, else the length of
    the --video it restyles (`video_frames`; None while unread), else the model's settings."""
    height, width = (parse_size(args.size) if args.size else
                     (int(defaults.get("height", 64)), int(defaults.get("width", 64))))
    frames = args.frames
    if frames is None:
        restyled = args.video and opt(args, "mode", "restyle") != "extend"
        frames = video_frames if restyled else int(defaults.get("frames", 17))
    return frames, height, width
