"""Shared helpers for the DiT tests: tiny model configs and a numpy packer for packed rows."""

from __future__ import annotations

import ml_collections
import numpy as np

from vdit.models import patches


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    """A 2-layer DiT small enough for CPU tests (dim 24, 2 heads)."""
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
               out_channels=4, text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
               rope_max_seq_len=64, dtype="float32", attention="xla", remat="none")
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def pack_row(videos, texts, timesteps, patch_size, seq_len, text_len):
    """Packs videos `[T', H', W', C]` with their texts `[L_i, D_txt]` into one row.

    Returns numpy arrays (tokens, positions, segment_ids, timesteps `[K]`, context,
    context_segment_ids) and each video's token slice; the rest is padding (id 0).
    """
    tok, pos, seg, ctx, ctx_seg, slices = [], [], [], [], [], []
    start = 0
    for i, (video, text) in enumerate(zip(videos, texts, strict=True), start=1):
        t, p = patches.patchify(np.asarray(video), patch_size)
        tok.append(t)
        pos.append(p)
        seg.append(np.full(len(t), i, np.int32))
        slices.append(slice(start, start + len(t)))
        start += len(t)
        ctx.append(np.asarray(text))
        ctx_seg.append(np.full(len(text), i, np.int32))
    n, m = start, sum(len(c) for c in ctx)
    assert n <= seq_len and m <= text_len, (n, seq_len, m, text_len)
    pad = lambda parts, size, fill=0.0: np.concatenate(
        parts + [np.full((size - sum(len(p) for p in parts),) + parts[0].shape[1:], fill,
                         parts[0].dtype)])
    # Padding tokens get junk features and positions (they must not leak into real segments).
    tokens = pad(tok, seq_len, 7.0)
    positions = pad(pos, seq_len, 3)
    return (tokens, positions, pad(seg, seq_len, 0), np.asarray(timesteps, np.float32),
            pad(ctx, text_len, 5.0), pad(ctx_seg, text_len, 0), slices)
