"""`vdit encode`: pixel clips -> latent shards (VAE posterior mean, normalised) + caption token ids.

Each example gets a (frames, height, width) drawn deterministically from `encode.shapes` (images
are T = 1), is rendered or cropped to it, and is encoded in batches of one shape (one compiled VAE
call per shape bucket). Shards are written atomically and a rerun skips finished shards, so an
interrupted encode resumes. Latents are stored normalised, z' = (z - mean) / std, with the per-channel
statistics in `stats.json` beside the shards (from `vae.latents_mean/std`, or measured on the first
clips when `encode.normalize` is "measure").

Config section `encode`: vae_workdir, shapes, shape_weights, num_examples, num_shards, batch_size,
normalize ("config" | "measure"), stats_from (a latents folder whose statistics to reuse instead,
e.g. a previous stage's), seed, i2v_condition (default False: also store each clip's first-frame
image-to-video condition as `cond_latents`, see `vdit/data/conditions.py`).
A config whose DiT has an image branch (`model.image_dim`, Wan2.1 I2V) also stores each clip's
first-frame CLIP tokens (`first_frame_clip_tokens`, see `vdit/data/encode_images.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vdit import runs
from vdit.data import conditions, encode_images, sources
from vdit.data.synthetic import SyntheticShapes
from vdit.models.text import text_encoder_from_config
from vdit.models.vae import normalize_latents
from vdit.models.vae_config import vae_from_config
from vdit.runs.checkpoint import load_params
from vdit.runs.run_kind import check_kind

log = logging.getLogger(__name__)
STATS_FILE = runs.STATS_FILE
TOKENIZER_KEY = "tokenizer"  # stats.json: fingerprint of the tokenizer behind the shards' ids


def sample_shape(index: int, shapes, weights, seed: int) -> tuple[int, int, int]:
    """The (frames, height, width) of example `index`: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index, 7])
    p = np.asarray(weights, np.float64) if weights else np.ones(len(shapes))
    if len(p) != len(shapes):
        raise ValueError(f"config key 'encode.shape_weights' has {len(p)} entries for "
                         f"{len(shapes)} shapes")
    return tuple(int(v) for v in shapes[int(rng.choice(len(shapes), p=p / p.sum()))])


def load_stats(folder: str) -> dict:
    path = runs.stats_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"no {STATS_FILE} in {str(folder)!r}: run `vdit encode` first")
    return json.loads(path.read_text())


def _measure_stats(encode_fn, data, cfg, shapes) -> dict:
    """Per-channel mean/std of the posterior mean over the first `batch_size` clips per shape."""
    zs = []
    for frames, height, width in shapes:
        video = np.stack([data.render(i, frames, height, width)["video"]
                          for i in range(cfg.batch_size)])
        z = np.asarray(encode_fn(jnp.asarray(video)))
        zs.append(z.reshape(-1, z.shape[-1]))
    return channel_stats(zs)


def channel_stats(latents) -> dict:
    """{"mean", "std"} per channel over a list of latent arrays [..., C]."""
    z = np.concatenate([np.reshape(x, (-1, x.shape[-1])) for x in latents])
    return {"mean": z.mean(0).tolist(), "std": (z.std(0) + 1e-6).tolist()}


def vae_encoder(config, params=None):
    """video [B, T, H, W, 3] -> posterior mean [B, T', H', W', C], jitted (one compile per shape).
    `params` default to the EMA weights of `encode.vae_workdir`."""
    vae = vae_from_config(config.vae)
    if params is None:
        params, saved = load_params(config.encode.vae_workdir)
        check_kind(params, saved, "vae", config.encode.vae_workdir,
                   "config key 'encode.vae_workdir' =")
    # Parameters are an argument, not a closure: closed-over weights become constants that XLA
    # tries to fold into every convolution.
    encode_jit = jax.jit(lambda p, v: vae.apply({"params": p}, v, method="encode")[0])
    return lambda v: encode_jit(params, v)


def resolve_stats(config, out_dir: str, measure, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) [C] for normalising latents, from `out_dir/stats.json`, which is written first
    when absent: those of the latents folder `encode.stats_from` names when set (stages that
    continue a run keep its normalisation), else `measure()` when `encode.normalize` is
    "measure", else `vae.latents_mean/std`.
    A resumed encode keeps its normalisation; of sharded workers racing to write it (each measures
    the same clips), the first file written wins and every worker normalises with what is on disk.
    The file also records the fingerprint of the tokenizer whose ids the shards hold (`vdit train`
    checks it); a resumed encode with another tokenizer is refused, as its shards would mix two id
    spaces."""
    runs.user_path(out_dir).mkdir(parents=True, exist_ok=True)
    stats_path = runs.stats_path(out_dir)
    stats_from = config.encode.get("stats_from", "")
    if not stats_path.is_file():
        if stats_from:  # another encoded set's normalisation, e.g. the previous stage's
            if not runs.stats_path(stats_from).is_file():
                raise FileNotFoundError(f"config key 'encode.stats_from' = {stats_from!r}: no "
                                        f"{runs.stats_path(stats_from)} (encode that set first)")
            stats = {k: load_stats(stats_from)[k] for k in ("mean", "std")}
        elif config.encode.normalize == "measure":
            stats = measure()
        else:
            stats = {"mean": list(config.vae.latents_mean), "std": list(config.vae.latents_std)}
        stats[TOKENIZER_KEY] = tokenizer.fingerprint()
        runs.create_if_absent(stats_path, json.dumps(stats))
    stats = load_stats(out_dir)
    check_tokenizer(stats, tokenizer, out_dir, "encode into")
    if stats.get(TOKENIZER_KEY) != tokenizer.fingerprint():  # unrecorded, or another max length
        stats[TOKENIZER_KEY] = tokenizer.fingerprint()
        stats_path.write_text(json.dumps(stats))
    return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


def stats_id(mean: np.ndarray, std: np.ndarray) -> str:
    """A short fingerprint of normalisation stats: shards written with different ones differ."""
    data = np.concatenate([np.asarray(mean, np.float32), np.asarray(std, np.float32)])
    return hashlib.sha1(data.tobytes()).hexdigest()[:16]


def owned_shards(count: int, shard: int, num_shards: int) -> list[int]:
    """Output shards [0, count) that worker `shard` of `num_shards` (`--shard`/`--num-shards`)
    writes: every num_shards-th, from its own index."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} is outside [0, --num-shards {num_shards}); give "
                         "0 <= --shard < --num-shards")
    return list(range(shard, count, num_shards))


def _vocabulary(fingerprint: str) -> str:
    # A fingerprint without its max length (":L<n>"): ids stay valid when only truncation changes.
    return re.sub(r":L\d+", "", fingerprint)


def check_tokenizer(stats: dict, tokenizer, folder: str, action: str) -> None:
    """Refuses shards whose caption ids came from another tokenizer than `tokenizer` (ids from
    another vocabulary are valid integers that mean other words, or overflow the embedding).
    Shards written before fingerprints were recorded pass unchecked."""
    saved = stats.get(TOKENIZER_KEY)
    if saved is not None and _vocabulary(saved) != _vocabulary(tokenizer.fingerprint()):
        raise ValueError(
            f"cannot {action} {folder!r}: its shards hold caption token ids from tokenizer "
            f"{saved!r}, but config.text gives tokenizer {tokenizer.fingerprint()!r}; set "
            "config.text (kind, vocab, max_length) as it was for `vdit encode`, or encode again "
            "into a new folder")


def latent_record(z: np.ndarray, ids: np.ndarray, mask: np.ndarray, caption: str, meta: dict,
                  mean: np.ndarray, std: np.ndarray) -> dict:
    """One shard record: latents [T', H', W', C] normalised, caption ids trimmed to the mask."""
    n = max(1, int(np.sum(mask)))
    return {"latents": np.asarray(normalize_latents(z, mean, std)),
            "text": np.asarray(ids[:n], np.int32), "caption": caption, "meta": meta}


def record_extras_fn(config, encode_fn, mean, std, image_fn=None) -> Callable | None:
    """video [B, T, H, W, 3] -> {record key: [B, ...] numpy} of the optional per-clip arrays the
    config asks for: I2V condition latents (`conditions.encode_condition_fn`) and `image_fn`'s
    first-frame CLIP tokens (`encode_images.encode_fn`); None when it asks for none."""
    fns = [f for f in (conditions.encode_condition_fn(config, encode_fn, mean, std), image_fn)
           if f is not None]
    if not fns:
        return None
    return lambda video: {key: value for f in fns for key, value in f(video).items()}


def encode_synthetic(config, out_dir: str, shard: int = 0, num_shards: int = 1,
                     image_loader: encode_images.ImageLoader | None = None) -> list[str]:
    """Encodes the synthetic world into `encode.num_shards` shards under `out_dir`; worker `shard`
    of `num_shards` writes its `owned_shards`. Returns their paths. `image_loader` reads an
    image-branch DiT's CLIP folders (`encode_images.load_encoder`)."""
    cfg = config.encode
    owned = owned_shards(cfg.num_shards, shard, num_shards)
    image_fn = encode_images.encode_fn(config, image_loader)  # a missing tower fails before work
    _, tokenizer = text_encoder_from_config(config.text)
    data = SyntheticShapes.from_config(config.data)
    encode_fn = vae_encoder(config)
    mean, std = resolve_stats(config, out_dir,
                              lambda: _measure_stats(encode_fn, data, cfg, cfg.shapes), tokenizer)
    per_shard = -(-cfg.num_examples // cfg.num_shards)
    paths = []
    for index in tqdm(owned, desc="encode", disable=not config.train.progress):
        path = runs.user_path(out_dir) / sources.SHARD_PATTERN.format(index=index,
                                                                      count=cfg.num_shards)
        paths.append(str(path))
        if path.exists():
            continue  # finished by an earlier run
        indices = range(index * per_shard, min(cfg.num_examples, (index + 1) * per_shard))
        examples = _encode_indices(indices, data, cfg, encode_fn, tokenizer, mean, std,
                                   record_extras_fn(config, encode_fn, mean, std, image_fn))
        sources.write_shard(path, examples)
    return paths


def _encode_indices(indices, data, cfg, encode_fn, tokenizer, mean, std,
                    condition_fn=None) -> list[dict]:
    buckets = defaultdict(list)
    for i in indices:
        buckets[sample_shape(i, cfg.shapes, cfg.shape_weights, cfg.seed)].append(i)
    examples = {}
    for (frames, height, width), members in buckets.items():
        for start in range(0, len(members), cfg.batch_size):
            chunk = members[start:start + cfg.batch_size]
            clips = [data.render(i, frames, height, width) for i in chunk]
            video = jnp.asarray(_pad_batch(np.stack([c["video"] for c in clips]), cfg.batch_size))
            z = np.asarray(encode_fn(video))
            cond = None if condition_fn is None else condition_fn(video)
            ids, mask = tokenizer([c["caption"] for c in clips])
            for j, (i, clip) in enumerate(zip(chunk, clips)):
                meta = {"index": i, "objects": clip["objects"], "fps": clip["fps"],
                        "motion": clip["motion"]}
                examples[i] = latent_record(z[j], ids[j], mask[j], clip["caption"], meta, mean, std)
                for key, value in (cond or {}).items():
                    examples[i][key] = value[j]
    return [examples[i] for i in indices]


def _pad_batch(video: np.ndarray, size: int) -> np.ndarray:
    """video [n, T, H, W, 3] -> [size, T, H, W, 3] with zero clips after the n real ones: a
    bucket's last, short batch reuses the full batches' compiled encoder (each extra batch size
    costs the VAE a compile of ~2 s). Outputs past n are never read."""
    return np.concatenate([video, np.zeros((size - len(video),) + video.shape[1:], video.dtype)])
