"""The Grain input pipeline: clips -> spacetime tokens -> rows packed to a fixed token budget.

Order (MaxText's): source -> shuffle + repeat -> this process's slice -> iterator -> tokens ->
first-fit packing -> batch -> (prefetch). Each packed row follows DESIGN.md section 3:
  tokens [S, D_in], positions [S, 3] (t, h, w), segment_ids [S] (0 = padding),
  text [L] token ids or [L, D_txt] embeddings, text_segment_ids [L], text_positions [L].
Segment k of the video tokens and segment k of the text belong to the same clip.
Optional (see `vdit/data/conditions.py`): `cond_tokens [S, pt*ph*pw*(tf + z)]` (image-to-video
condition, packed like the tokens), `micro_<name> [max_segments]` (column k-1 is segment k's
fps / motion value, 0 for absent segments) and, for a DiT with an image branch, `image_context
[max_segments * N, image_dim]` with `image_segment_ids [max_segments * N]` (each clip's N
first-frame CLIP tokens under its segment id, 0 = padding; see `vdit/data/image_tokens.py`).

Config section `data` (the keys read here): tokens_per_row, text_per_row, rows_per_batch (global,
over all processes), max_segments (clips per row), pack_bins, shuffle_seed, caption_dropout,
num_workers (0 = in-process), prefetch, and optionally read_threads / read_buffer (Grain's
`ReadOptions`: threads reading records ahead of the packer, and how many they keep; Grain's
defaults when absent).
"""

from __future__ import annotations

import functools
import signal

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.data import conditions, image_tokens
from vdit.models import patches

BATCH_AXES = ("data", "fsdp")


def clip_tokens(record: dict, patch_size, text_per_row: int, condition: bool = False,
                micro=(), cond_key: str = conditions.COND_KEY,
                image: tuple[int, int] | None = None) -> dict:
    """One decoded clip -> its tokens, (t, h, w) positions and text (trimmed to the row budget);
    with `condition` its I2V condition tokens (from record key `cond_key`), a [1] value per
    name of `micro`, and with `image` = (N, image_dim) its first-frame CLIP tokens [N, image_dim]."""
    latents = np.asarray(record["latents"], np.float32)
    tokens, positions = patches.patchify(latents, patch_size)
    text = np.asarray(record["text"])[:text_per_row]
    out = {"tokens": tokens, "positions": positions.astype(np.int32), "text": text}
    if condition:
        out[conditions.COND_TOKENS] = conditions.cond_tokens(record, latents.shape, patch_size,
                                                             cond_key)
    for name in micro:
        out[conditions.MICRO_PREFIX + name] = conditions.micro_value(record, name)
    if image is not None:
        out[image_tokens.IMAGE_CONTEXT] = image_tokens.record_tokens(record, image)
    return out


def record_check(patch_size, channels: int, text_dim: int | None):
    """A check of one decoded record against the model, for `sources.SkippingSource`: latents
    `[T', H', W', channels]` with T', H', W' positive multiples of the patch, and at least one
    text token, ids `[L]` (text_dim None) or embeddings `[L, text_dim]`. A record that fails is
    skipped and counted rather than stopping the pipeline or being packed wrong (an empty text
    would leave its segment's cross-attention no key of its own)."""
    def check(record: dict) -> None:
        shape = np.shape(record["latents"])
        if shape[-1] != channels:
            raise ValueError(f"latents of shape {shape}: the model takes {channels} channels")
        if any(n < 1 or n % p for n, p in zip(shape[:3], patch_size)):
            raise ValueError(f"latents of shape {shape}: T', H', W' must be positive multiples "
                             f"of the patch {tuple(patch_size)}")
        text = np.asarray(record["text"])
        ids = text_dim is None
        want = "token ids [L]" if ids else f"embeddings [L, {text_dim}]"
        if (text.ndim != (1 if ids else 2) or len(text) < 1 or (not ids and text.shape[1] != text_dim)
                or text.dtype.kind not in ("iu" if ids else "f")):
            raise ValueError(f"text of shape {text.shape} ({text.dtype}): expected {want}, at "
                             "least one token")
    return check


def check_budget(num_tokens: int, tokens_per_row: int, where: str) -> None:
    """An example that cannot fit a row is an error naming its shape, never a silent drop."""
    if num_tokens > tokens_per_row:
        raise ValueError(f"{where} has {num_tokens} tokens but config key 'data.tokens_per_row' is "
                         f"{tokens_per_row}; raise the budget or drop that shape")


def _rename(row: dict, extra=()) -> dict:
    images = ({image_tokens.IMAGE_SEGMENT_IDS: row[image_tokens.IMAGE_CONTEXT + "_segment_ids"]}
              if image_tokens.IMAGE_CONTEXT in extra else {})
    return {k: row[k] for k in extra} | images | {
        "tokens": row["tokens"],
        "positions": row["positions"],
        "segment_ids": row["tokens_segment_ids"],
        "text": row["text"],
        "text_segment_ids": row["text_segment_ids"],
        "text_positions": row["text_positions"],
    }


def _clip_tokens(patch_size, cfg, condition: bool, micro, last_frame_rate: float,
                 image: tuple[int, int] | None):
    """clip_tokens with the condition variant drawn per clip: first and last frame known at
    `last_frame_rate`, else first frame only; a clip longer than a row is an error."""
    def fn(record: dict, rng: np.random.Generator) -> dict:
        last = condition and last_frame_rate > 0 and rng.random() < last_frame_rate
        key = conditions.COND_KEY_LAST if last else conditions.COND_KEY
        out = clip_tokens(record, patch_size, cfg.text_per_row, condition, micro, key, image)
        check_budget(len(out["tokens"]), cfg.tokens_per_row,
                     f"a clip of latent shape {tuple(np.shape(record['latents']))}")
        return out
    return fn


def _drop_caption(null_text: np.ndarray, rate: float):
    def fn(example: dict, rng: np.random.Generator) -> dict:
        if rate > 0 and rng.random() < rate:
            example = dict(example, text=np.asarray(null_text, example["text"].dtype))
        return example
    return fn


def read_options(cfg) -> grain.ReadOptions:
    """Grain's record readers from `data.read_threads` / `data.read_buffer` (Grain's defaults for
    an absent key). Threads pay off where a read waits on storage (gs://); on local shards and few
    cores they only contend with the packer and the train step for the GIL and the cores."""
    keys = {"read_threads": "num_threads", "read_buffer": "prefetch_buffer_size"}
    return grain.ReadOptions(**{name: int(cfg[key]) for key, name in keys.items() if key in cfg})


def packed_dataset(source, cfg, patch_size, null_text: np.ndarray,
                   process_index: int | None = None, process_count: int | None = None,
                   condition: bool = False, micro=(), last_frame_rate: float = 0.0,
                   image: tuple[int, int] | None = None,
                   own_share: bool = False) -> grain.IterDataset:
    """Infinite iterator of this process's packed batches: dict of [rows, S, ...] arrays.

    `source` yields records with latents/text (None for a skipped record); `null_text` is the
    empty caption that replaces a caption at rate `caption_dropout` (classifier-free guidance).
    `condition` adds `cond_tokens` (records need `cond_latents`, and `cond_latents_last` when
    `last_frame_rate` > 0); `micro` names per-segment values read from the records' meta
    (`micro_<name>`); `image` = (N, image_dim) adds `image_context` / `image_segment_ids` from the
    records' first-frame CLIP tokens (an image-branch DiT; see `vdit/data/image_tokens.py`).
    `own_share`: `source` holds only this process's shards (`sources.process_shards`), read
    whole; otherwise the process takes every `process_count`-th record of the shuffled source.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if cfg.rows_per_batch % process_count:
        raise ValueError(f"config key 'data.rows_per_batch' = {cfg.rows_per_batch} is not divisible "
                         f"by the {process_count} processes")
    ds = grain.MapDataset.source(source).shuffle(seed=cfg.shuffle_seed).repeat(None)
    if not own_share:
        ds = ds[process_index::process_count]
    ds = ds.filter(lambda r: r is not None)
    micro = tuple(micro)
    ds = ds.random_map(_clip_tokens(patch_size, cfg, condition, micro, last_frame_rate, image),
                       seed=cfg.shuffle_seed + 2)
    ds = ds.random_map(_drop_caption(null_text, cfg.caption_dropout), seed=cfg.shuffle_seed + 1)
    it = ds.to_iter_dataset(read_options(cfg))
    extra = {conditions.COND_TOKENS: cfg.tokens_per_row} if condition else {}
    extra |= {conditions.MICRO_PREFIX + name: cfg.max_segments for name in micro}
    if image is not None:  # room for every clip's tokens: a row holds at most max_segments clips
        extra[image_tokens.IMAGE_CONTEXT] = image[0] * cfg.max_segments
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": cfg.tokens_per_row, "positions": cfg.tokens_per_row,
                           "text": cfg.text_per_row, **extra},
        num_packing_bins=cfg.pack_bins, seed=cfg.shuffle_seed, shuffle_bins=True,
        max_sequences_per_bin=cfg.max_segments)
    it = it.map(functools.partial(_rename, extra=tuple(extra)))
    it = it.batch(cfg.rows_per_batch // process_count, drop_remainder=True)
    if cfg.num_workers > 0:
        # Grain's workers read absl flags, which a library caller (not an absl app) never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers),
                            worker_init_fn=_ignore_sigterm)
    elif cfg.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
    return it


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: SIGTERM is left to the training process.

    A preempted VM or a SLURM job sends SIGTERM to every process of the job, workers included;
    a worker that died of it fails the trainer's next batch before the step boundary where it
    saves and stops (vdit/train/step_loop.py). Grain stops its workers itself when the iterator
    closes (an event, then SIGKILL after a timeout), so ignoring the signal here strands none.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the data and fsdp axes; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def to_global(batch: dict, mesh: Mesh) -> dict:
    """This process's rows -> one global jax.Array per key, rows sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
