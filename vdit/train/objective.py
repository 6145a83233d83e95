"""The DiT training loss on a packed batch: encode text (if the batch carries token ids), draw a
time per segment, noise the tokens, predict the velocity, average the error per segment.

Trainable and frozen weights arrive as two dicts with the keys "dit" and "text"; a key is in
exactly one of them (the text encoder trains when `config.text.trainable`, else it is frozen).
Image-to-video segments (`config.train.i2v_rate`: Wan2.1 I2V condition channels, or Wan2.2 TI2V's
clean first frame) and micro-conditioning values reach the model through
`vdit/train/conditioning.py`; the loss is always on the z output channels' velocity. A Wan2.2 expert
trains its own DiT over its own time range (`dit_key`, `t_range`; vdit/train/experts.py). The loss
reports the segments it averages (`LOSS_WEIGHT`), which weigh it under gradient accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit.config import text_pad_to
from vdit.diffusion import flow
from vdit.train import conditioning
from vdit.train.step import LOSS_WEIGHT


def encode_packed_text(text_model, text_params, batch: dict, num_segments: int,
                       pad_to: int = 0) -> tuple[jax.Array, jax.Array]:
    """Packed text -> (context [B, L', D], context_segment_ids [B, L']) for the DiT. Token ids run
    through the encoder with each caption masked to itself; precomputed embeddings pass through.

    `pad_to` > 0 (`data.text_pad_to`) lays the context out as Wan trained it: segment k's text in
    block k of `pad_to` positions, zeros after its last token (L' = num_segments * pad_to), so its
    video's cross-attention sees the zero pads as Wan's pipeline gives them (a Wan DiT attends to
    every one of its 512 text positions). Blocks of absent segments are padding (id 0)."""
    text, ids = batch["text"], batch["text_segment_ids"]
    context = text if not jnp.issubdtype(text.dtype, jnp.integer) else text_model.apply(
        {"params": text_params}, text, ids, segment_ids=ids)
    if pad_to <= 0:
        return context, ids
    return pad_text_blocks(context, ids, num_segments, pad_to)


def pad_text_blocks(context, segment_ids, num_segments: int, pad_to: int):
    """context [B, L, D] packed (each segment's tokens contiguous, id 0 = padding) ->
    ([B, K * pad_to, D], [B, K * pad_to]): segment k's first `pad_to` tokens at the start of
    block k - 1, zeros after them; block k - 1 has id k when segment k is in the row, else 0.
    A gather along each row: rows sharded over the batch axes stay where they are (a scatter
    here made XLA all-gather the batch)."""
    member = segment_ids[:, :, None] == jnp.arange(1, num_segments + 1)  # [B, L, K]
    counts, starts = jnp.sum(member, axis=1), jnp.argmax(member, axis=1)  # [B, K]
    slot = jnp.arange(pad_to)
    real = (slot < counts[:, :, None]).reshape(segment_ids.shape[0], -1)  # [B, K * pad_to]
    source = jnp.where(real, (starts[:, :, None] + slot).reshape(real.shape), 0)
    out = jnp.where(real[..., None], jnp.take_along_axis(context, source[..., None], axis=1), 0)
    block_ids = jnp.where(counts > 0, jnp.arange(1, num_segments + 1), 0)
    return out.astype(context.dtype), jnp.repeat(block_ids, pad_to, axis=1).astype(segment_ids.dtype)


def make_dit_loss(dit, text_model, cfg, dit_key: str = "dit",
                  t_range: tuple[float, float] | None = None):
    """loss_fn(params, frozen, batch, rng) -> (loss, aux) for `vdit.train.step.make_train_step`:
    the DiT `weights[dit_key]` ("dit_2": a Wan2.2 low-noise expert) with every segment's shifted
    flow time drawn in `t_range` [lo, hi) (None: all of [0, 1); vdit/train/experts.py)."""
    num_segments = int(cfg.data.max_segments)
    terms = make_loss_terms(dit, text_model, cfg, dit_key)

    def loss_fn(params, frozen, batch, rng):
        t_rng, n_rng = jax.random.split(rng)
        t_seg = flow.sample_segment_times(t_rng, batch["segment_ids"], num_segments, cfg.flow,
                                          t_range)
        x0 = batch["tokens"]
        noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
        return terms(params, frozen, batch, t_seg, noise, jax.random.fold_in(rng, 2))

    return loss_fn


def make_loss_terms(dit, text_model, cfg, dit_key: str = "dit"):
    """terms(params, frozen, batch, t_seg [B, K], noise [B, S, D], rng) -> (loss, aux): the loss
    given each segment's flow time and the noise (`rng` draws which segments are image-to-video).

    TI2V (`conditioning.clean_first_frame`): an image-to-video segment's first latent frame is its
    clean latent at timestep 0 and takes no part in the loss, so its noise is never seen."""
    num_segments = int(cfg.data.max_segments)
    i2v_rate = conditioning.i2v_rate(cfg)
    clean_first = conditioning.clean_first_frame(cfg, dit)
    pad_to = text_pad_to(cfg)

    def terms(params, frozen, batch, t_seg, noise, rng):
        weights = {**frozen, **params}
        context, context_ids = encode_packed_text(text_model, weights.get("text"), batch,
                                                  num_segments, pad_to)
        seg = batch["segment_ids"]
        x0 = batch["tokens"]
        x_t = flow.noisy_tokens(x0, noise, flow.per_token(t_seg, seg))
        timesteps, loss_mask = t_seg * flow.NUM_TRAIN_TIMESTEPS, None
        micro = conditioning.micro_kwargs(dit, batch)
        if clean_first:
            flags = conditioning.first_frame_flags(batch, rng, i2v_rate, num_segments)
            x_in, timesteps, micro, loss_mask = conditioning.clean_first_frame_inputs(
                x0, x_t, timesteps, batch, flags, micro)
        else:
            x_in = conditioning.model_input(dit, x_t, batch, rng, i2v_rate, num_segments)
        pred = dit.apply({"params": weights[dit_key]}, x_in, batch["positions"], seg, timesteps,
                         context, context_ids, method="packed", **micro,
                         **conditioning.image_kwargs(dit, batch, rng, i2v_rate, num_segments))
        loss, _ = flow.packed_loss(pred, flow.velocity_target(x0, noise), seg, num_segments,
                                   loss_mask)
        return loss, {"tokens": jnp.sum(seg > 0),
                      LOSS_WEIGHT: flow.loss_segments(seg, num_segments, loss_mask)}

    return terms
