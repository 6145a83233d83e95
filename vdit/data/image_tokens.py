"""CLIP image tokens of each clip's first frame, for DiTs with an image branch (Wan2.1 I2V): the
shard record key, its shape, and how the Grain pipeline reads it.

Record key `first_frame_clip_tokens` (written by `vdit encode`, `vdit/data/encode_images.py`):
float32 `[N, image_dim]`, N = 1 + (image_size / patch_size)^2 (class token, then patch tokens;
257 x 1280 for Wan2.1's CLIP ViT-H/14 at 224 px): the penultimate hidden layer of the run's CLIP
vision tower on the clip's first pixel frame, preprocessed as diffusers' WanImageToVideoPipeline
does (CLIPImageProcessor). Packed rows (`vdit/data/pipeline.py`) carry the tokens of their clips
one after another: `image_context [max_segments * N, image_dim]` and `image_segment_ids
[max_segments * N]` (the clip's segment id, 0 = padding), the layout `vdit train`'s step takes.
"""

from __future__ import annotations

import numpy as np

RECORD_KEY = "first_frame_clip_tokens"  # shard record key, float32 [N, image_dim]
IMAGE_CONTEXT, IMAGE_SEGMENT_IDS = "image_context", "image_segment_ids"  # packed batch keys


def tokens_per_image(encoder_cfg) -> int:
    """N = 1 + (image_size / patch_size)^2 of a CLIP vision config (transformers' names)."""
    size, patch = int(encoder_cfg["image_size"]), int(encoder_cfg["patch_size"])
    return 1 + (size // patch) ** 2


def record_tokens(record: dict, shape: tuple[int, int]) -> np.ndarray:
    """A record's first-frame CLIP tokens, float32 `shape` = [N, image_dim]; a record without
    them, or with another tower's shape, is an error naming the key and the fix."""
    if RECORD_KEY not in record:
        raise ValueError(f"a latent record has no {RECORD_KEY!r} (has {sorted(record)}) but the "
                         "DiT has an image branch (config.model.image_dim) that reads each clip's "
                         "first-frame CLIP tokens: encode the shards with `vdit encode` and this "
                         "config (its image_encoder section)")
    tokens = np.asarray(record[RECORD_KEY], np.float32)
    if tokens.shape != tuple(shape):
        raise ValueError(f"latent record key {RECORD_KEY!r} has shape {tokens.shape}; config "
                         f"expects [N, image_dim] = {list(shape)} (N from config.image_encoder "
                         "image_size / patch_size, image_dim from config.model.image_dim): the "
                         "shards were encoded with another CLIP tower; encode them again")
    return tokens
