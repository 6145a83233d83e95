"""`vdit encode` over video files: a folder or jsonl manifest -> latent shards (same records as
`encode_synthetic`: normalised VAE posterior mean, caption token ids, caption, meta).

`encode.source` is a folder, a manifest or a TFDS dataset ("tfds:NAME[/CONFIG][:SPLIT]", read by
`vdit/data/tfds_source.py`). Every entry of it is encoded once (`encode.num_examples` applies to the synthetic
source only), entry i going to shard i // ceil(N / count), count = max(encode.num_shards,
--num-shards) (at most one shard per entry). `--shard i --num-shards n` (as `vdit curate` takes
them) makes this process worker i of n: it writes shards i, i + n, ... and nothing else, so n
processes (SLURM array tasks, TPU VM workers) split the work without talking to each other; a
rerun of any worker skips its finished shards, and the shards of all workers are merged by
name (see `vdit/data/encode_summary.py`). Within a shard, clips are grouped
by the shape drawn for them (`VideoClipSource.shape`) and encoded in batches padded to
`encode.batch_size`, so the VAE compiles once per shape bucket. Videos that cannot be read
(missing, corrupt), are too short for their shape, whose manifest frame range passes their end,
or fail otherwise are skipped and counted by reason, never fatal. Manifest lines with `kept`
false (e.g. clips `vdit curate` dropped) are not entries at all: they are counted as `filtered`.
`encode_summary.json` beside the shards keeps each finished shard's counts, skipped files, the
fingerprint of the latent stats it was normalised with and that of its inputs
(`shard_fingerprint`: its entries' keys, frame ranges, captions, crop boxes and drawn shapes, and
encode.fps), so a rerun (which skips finished shards) still reports the whole run, shards
normalised differently are an error, and so is a rerun whose source or settings would put other
clips in a finished shard (a grown manifest, other shapes or seed): encode that into a new folder.

Config section `encode` (keys read here): source, video_root (optional: the folder a manifest's
relative paths resolve against, e.g. curate's input), caption_key (optional, default "caption":
the manifest key holding each clip's caption, e.g. curate's "recaption"), shapes, shape_weights,
seed, fps (0 = every source frame), extensions, num_shards, batch_size, decode_threads, normalize,
vae_workdir, i2v_condition (also store `cond_latents`, as `encode_synthetic` does). A DiT with an
image branch (`model.image_dim`) also gets each clip's first-frame CLIP tokens
(`vdit/data/encode_images.py`). Record meta: the manifest line's other keys (e.g. a curated
"motion", in frame short sides per second), then index, file, source_frames, source_fps, fps (of
the clip), first_frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vdit import runs
from vdit.config import check_shapes, spatial_stride
from vdit.data import encode_images, sources, tfds_source
from vdit.data import encode_summary as summary
from vdit.data.encode import (
    channel_stats,
    latent_record,
    owned_shards,
    record_extras_fn,
    resolve_stats,
    stats_id,
    vae_encoder,
)
from vdit.data.video_files import ClipTooShortError, FrameRangeError, VideoClipSource
from vdit.data.video_io import VideoReadError
from vdit.models.text import text_encoder_from_config

log = logging.getLogger(__name__)
SUMMARY_FILE = summary.SUMMARY_FILE


def check_encode_shapes(config) -> None:
    """Frames 1+4k and sizes that the VAE and the DiT patches divide, named by config key."""
    check_shapes("encode.shapes", config.encode.shapes, spatial_stride(config))


def clip_source(cfg) -> VideoClipSource | tfds_source.TfdsClipSource:
    """The pixel-clip source `encode.source` names: a TFDS dataset ("tfds:..."), else files."""
    if tfds_source.is_tfds(cfg.source):
        return tfds_source.TfdsClipSource.from_config(cfg)
    return VideoClipSource.from_config(cfg)


def encode_videos(config, out_dir: str, vae_params=None, shard: int = 0,
                  num_shards: int = 1, image_loader: encode_images.ImageLoader | None = None
                  ) -> dict:
    """Encodes `config.encode.source` into shards under `out_dir`; `vae_params` default to the
    EMA weights of `encode.vae_workdir`. Worker `shard` of `num_shards` writes its
    `owned_shards`; `image_loader` reads an image-branch DiT's CLIP folders
    (`encode_images.load_encoder`). Returns {"paths", "records", "skipped", "skipped_by_reason",
    "skipped_files"} over this worker's shards, this run's and earlier runs', "filtered"
    (manifest lines with `kept` false), "shards" (the run's shard count) and "complete" (every
    worker's shards are finished and merged into encode_summary.json)."""
    cfg = config.encode
    check_encode_shapes(config)
    source = clip_source(cfg)
    count = max(1, min(max(int(cfg.num_shards), num_shards), len(source)))
    owned = owned_shards(count, shard, num_shards)
    summary.check_layout(out_dir, count)
    per_shard = -(-len(source) // count)
    names = [sources.SHARD_PATTERN.format(index=i, count=count) for i in range(count)]
    shard_indices = {i: range(i * per_shard, min(len(source), (i + 1) * per_shard)) for i in owned}
    fingerprints = {names[i]: shard_fingerprint(source, shard_indices[i], cfg) for i in owned}
    done = summary.read_done(out_dir)
    summary.check_fingerprints(out_dir, done,  # before any costly setup
                               {names[i]: (fingerprints[names[i]], len(shard_indices[i]))
                                for i in owned})
    image_fn = encode_images.encode_fn(config, image_loader)  # a missing tower fails first
    _, tokenizer = text_encoder_from_config(config.text)
    encode_fn = vae_encoder(config, vae_params)
    # Every worker measures the same clips (the source's first), and all use stats.json's.
    mean, std = resolve_stats(config, out_dir, lambda: _measure_stats(encode_fn, source, cfg),
                              tokenizer)
    stats = stats_id(mean, std)
    condition_fn = record_extras_fn(config, encode_fn, mean, std, image_fn)
    mine_file = summary.summary_file(shard, num_shards)
    mine = {names[i]: done[names[i]] for i in owned if names[i] in done}
    paths = []
    for index in tqdm(owned, desc=f"encode {shard}/{num_shards}",
                      disable=not config.train.progress):
        path = str(runs.user_path(out_dir) / names[index])
        paths.append(path)
        if runs.user_path(path).exists() and names[index] in done:
            continue  # finished by an earlier run
        records, skipped = _encode_shard(shard_indices[index], source, cfg, encode_fn, tokenizer,
                                         mean, std, condition_fn)
        # The summary entry goes first: a crash before the shard's rename re-encodes the shard
        # and rewrites its entry, so the counts never miss a finished shard.
        mine[names[index]] = {"records": len(records), "skipped": skipped, "stats": stats,
                              "fingerprint": fingerprints[names[index]]}
        summary.write(out_dir, mine_file, mine)
        sources.write_shard(path, records)
    summary.check_stats([runs.user_path(p).name for p in paths], mine, stats, out_dir)
    complete = summary.merge_if_complete(out_dir, names, stats)
    return {**summary.totals(paths, mine, source.filtered), "shards": count,
            "complete": complete}


def shard_fingerprint(source, indices, cfg) -> str:
    """A short hash of what a shard of `indices` holds: each entry's index, key, frame range,
    caption, crop box and drawn shape (so encode.shapes, shape_weights and seed), and
    encode.fps and the TFDS feature keys (a tfds: source's entries carry no caption). A finished
    shard whose fingerprint differs was encoded from other inputs."""
    items = []
    for i in indices:
        entry = source.entries[i]
        items.append([i, entry.key, list(entry.frames) if entry.frames else None, entry.caption,
                      dataclasses.astuple(entry.crop) if entry.crop else None,
                      list(source.shape(i))])
    text = json.dumps([float(cfg.get("fps", 0.0)), cfg.get("tfds_video_key", ""),
                       cfg.get("tfds_caption_key", "caption"), items])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load(source: VideoClipSource, index: int, skipped: list) -> dict | None:
    """Clip `index`, or None with the reason appended to `skipped` (never raises)."""
    try:
        return source[index]
    except Exception as e:  # noqa: BLE001 - any failing video is skipped and counted, never fatal
        reason = ("unreadable" if isinstance(e, VideoReadError)
                  else "too_short" if isinstance(e, ClipTooShortError)
                  else "frame_range" if isinstance(e, FrameRangeError) else "error")
        entry = source.entries[index]
        skipped.append({"file": entry.key, "index": index, "reason": reason,
                        "error": f"{type(e).__name__}: {e}"})
        log.warning("encode: skipping video %s (%s: %s)", entry.file, reason, e)
        return None


def _padded(videos: list, batch_size: int) -> jnp.ndarray:
    """Same-shape clips as one batch of `batch_size` (the last clip repeated), so each shape
    bucket compiles once; callers keep the first len(videos) outputs."""
    return jnp.asarray(np.stack(videos + [videos[-1]] * (batch_size - len(videos))))


def _encode_shard(indices, source, cfg, encode_fn, tokenizer, mean, std,
                  condition_fn=None) -> tuple[list, list]:
    """(records in index order, skipped entries) of the clips `indices`; `condition_fn` (video
    -> {record key: [B, ...]}, `encode.record_extras_fn`) adds `cond_latents` and first-frame
    CLIP tokens like encode.py."""
    buckets = defaultdict(list)
    for i in indices:
        buckets[source.shape(i)].append(i)
    records, skipped = {}, []
    threads = max(1, int(cfg.get("decode_threads", 4)))
    with ThreadPoolExecutor(threads) as pool:
        for members in buckets.values():
            for start in range(0, len(members), cfg.batch_size):
                chunk = members[start:start + cfg.batch_size]
                loaded = pool.map(lambda i: _load(source, i, skipped), chunk)
                clips = {i: c for i, c in zip(chunk, loaded, strict=True) if c is not None}
                if not clips:
                    continue
                video = _padded([c["video"] for c in clips.values()], cfg.batch_size)
                z = np.asarray(encode_fn(video))
                cond = None if condition_fn is None else condition_fn(video)
                ids, mask = tokenizer([c["caption"] for c in clips.values()])
                for j, (i, clip) in enumerate(clips.items()):
                    records[i] = latent_record(z[j], ids[j], mask[j], clip["caption"],
                                               clip["meta"], mean, std)
                    for key, value in (cond or {}).items():
                        records[i][key] = value[j]
    skipped.sort(key=lambda s: s["index"])
    return [records[i] for i in indices if i in records], skipped


def _measure_stats(encode_fn, source, cfg) -> dict:
    """Per-channel mean/std of the posterior mean over the first `batch_size` readable videos
    at each configured shape (videos too short for a shape are passed over, not counted)."""
    zs = []
    for shape in cfg.shapes:
        videos = []
        for i in range(len(source)):
            if len(videos) == cfg.batch_size:
                break
            try:
                videos.append(source.clip(i, tuple(shape))["video"])
            except Exception:  # noqa: BLE001, S112 - counted where the main pass meets it
                continue
        if videos:
            zs.append(np.asarray(encode_fn(_padded(videos, cfg.batch_size)))[:len(videos)])
    if not zs:
        raise ValueError(f"config key 'encode.source' = {cfg.source!r}: no video could be read "
                         "at any of 'encode.shapes' to measure latent statistics")
    return channel_stats(zs)
