"""The DiT training loss on a packed batch: encode text (if the batch carries token ids), draw a
time per segment, noise the tokens, predict the velocity, average the error per segment.

Trainable and frozen weights arrive as two dicts with the keys "dit" and "text"; a key is in
exactly one of them (the text encoder trains when `config.text.trainable`, else it is frozen).
Image-to-video segments (`config.train.i2v_rate`) and micro-conditioning values reach the model
through `vdit/train/conditioning.py`; the loss is always on the z output channels' velocity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit.diffusion import flow
from vdit.train import conditioning


def encode_packed_text(text_model, text_params, batch: dict) -> jax.Array:
    """Packed text -> context [B, L, D]. Token ids run through the encoder with each caption
    masked to itself; precomputed embeddings pass through unchanged."""
    text = batch["text"]
    if not jnp.issubdtype(text.dtype, jnp.integer):
        return text
    return text_model.apply({"params": text_params}, text, batch["text_segment_ids"],
                             segment_ids=batch["text_segment_ids"])


def make_dit_loss(dit, text_model, cfg):
    """loss_fn(params, frozen, batch, rng) -> (loss, aux) for `vdit.train.step.make_train_step`."""
    num_segments = int(cfg.data.max_segments)
    i2v_rate = conditioning.i2v_rate(cfg)

    def loss_fn(params, frozen, batch, rng):
        weights = {**frozen, **params}
        context = encode_packed_text(text_model, weights.get("text"), batch)
        seg = batch["segment_ids"]
        x0 = batch["tokens"]
        t_rng, n_rng = jax.random.split(rng)
        t_seg = flow.sample_segment_times(t_rng, seg, num_segments, cfg.flow)
        noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
        x_t = flow.noisy_tokens(x0, noise, flow.per_token(t_seg, seg))
        x_in = conditioning.model_input(dit, x_t, batch, jax.random.fold_in(rng, 2), i2v_rate,
                                        num_segments)
        pred = dit.apply({"params": weights["dit"]}, x_in, batch["positions"], seg,
                         t_seg * flow.NUM_TRAIN_TIMESTEPS, context, batch["text_segment_ids"],
                         method="packed", **conditioning.micro_kwargs(dit, batch),
                         **conditioning.image_kwargs(dit, batch, jax.random.fold_in(rng, 2),
                                                     i2v_rate, num_segments))
        loss, _ = flow.packed_loss(pred, flow.velocity_target(x0, noise), seg, num_segments)
        tokens = jnp.sum(seg > 0)
        return loss, {"tokens": tokens}

    return loss_fn
