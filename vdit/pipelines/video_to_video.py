"""Video-to-video on a `Generator`: restyle (SDEdit), extend a clip, interpolate between keyframes,
upscale. Every function takes a batch: videos `[B, T, H, W, 3]` in [-1, 1], text embeddings
`[B, L, D_txt]` (negative ones may be None when guidance is 1) and the sampling `noise`
`[B, T', H', W', C]`, which fixes the output's length and size (`gen.noise(seed, ...)` makes it
reproducibly).

restyle      encode the video, noise its latents to the step that `strength` picks (diffusers'
             WanVideoToVideoPipeline schedule) and sample from there: low strength keeps layout
             and motion, high strength keeps little. Wan I2V models also condition on frame 0.
extend       continue a clip from its last `context_frames` frames: the new clip starts with them.
             Models with I2V channels get them as I2V conditioning (known pixel frames in the
             condition and mask, CLIP tokens of the first of them); other models pin the frames'
             latents (`vdit/pipelines/conditioning.py`), so `context_frames` must be 1 + 4k there.
interpolate  first and last frames given (Wan first-last-frame conditioning, or pinning latent
             frame 0 and the last latent frame): `Generator.image_to_video(..., last_image=)`.
upscale      resize the frames up to cover the noise's size (bicubic) and center-crop another
             aspect, then restyle at a low strength
             so the model re-draws the detail the resize could not; decode latents first with
             `gen.decode`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vdit.data.video_io import resize_and_crop
from vdit.pipelines import conditioning as cond_lib


def _video(name: str, video, batch: int | None = None) -> jnp.ndarray:
    video = cond_lib.pixels(name, video)
    if video.ndim != 5 or video.shape[-1] != 3 or (batch is not None and video.shape[0] != batch):
        b = "B" if batch is None else f"B={batch}"
        raise ValueError(f"{name} must be a video batch [{b}, T, H, W, 3] in [-1, 1], got shape "
                         f"{tuple(video.shape)}")
    return video


def _check_size(gen, name: str, shape, noise) -> None:
    """shape = (B, T, H, W) of the video the noise must match."""
    f, tf = gen.vae.spatial_factor, gen.temporal_factor
    frames = 1 + tf * (noise.shape[1] - 1)
    want = (noise.shape[0], frames, noise.shape[2] * f, noise.shape[3] * f)
    if tuple(shape) != want:
        raise ValueError(f"{name} is [B, T, H, W] = {tuple(shape)}; the noise "
                         f"{tuple(noise.shape)} needs {want}")


def restyle(gen, video, context, negative_context, noise, strength: float = 0.7,
            steps: int | None = None, guidance: float | None = None, output: str = "video",
            **masks):
    """SDEdit: the video re-generated from its latents noised to `strength` (0 < s <= 1)."""
    noise = gen._check_noise(noise)
    video = _video("video", video, noise.shape[0])
    _check_size(gen, "video", video.shape[:4], noise)
    steps = int(gen.defaults["steps"] if steps is None else steps)
    start = gen.sampler.start_step(steps, strength)
    kw = dict(masks)
    if gen.condition_channels:
        known = cond_lib.known_pixel_frames(video.shape[1], 1)
        kw |= gen.i2v_inputs(video, known, video[:, 0])
    return gen.sample(noise, context, negative_context, steps, guidance, output,
                      start_step=start, init_latents=gen.encode_video(video), **kw)


def default_context_frames(gen) -> int:
    """1 (the I2V task) for I2V models; one latent frame past the first (1 + tf) when pinning."""
    return 1 if gen.condition_channels else 1 + gen.temporal_factor


def check_context_frames(gen, context_frames: int | None, frames: int, input_frames: int,
                         name: str = "context_frames") -> int:
    """`context_frames` (None: `default_context_frames`) checked for a new clip of `frames`
    frames from an input of `input_frames`: fewer than `frames`, at most `input_frames`, and
    1 + tf k when the model pins latent frames; returns it. The error (naming `name`) suggests
    the nearest valid count."""
    c = default_context_frames(gen) if context_frames is None else int(context_frames)
    step = 1 if gen.condition_channels else gen.temporal_factor
    valid = range(1, min(frames - 1, input_frames) + 1, step)
    if c in valid:
        return c
    rule = f"1 + {step}k (pinned latent frames), " if step > 1 else ""
    given = f"{name}={c}" + (" (the default)" if context_frames is None else "")
    fix = (f"use {name}={min(valid, key=lambda v: abs(v - c))}" if valid else
           "give the new clip more frames")
    raise ValueError(f"{given}: expected {rule}from 1 to {min(frames - 1, input_frames)} (fewer "
                     f"than the new clip's {frames} frames, at most the input's {input_frames}); "
                     f"{fix}")


def extend(gen, video, context, negative_context, noise, context_frames: int | None = None,
           steps: int | None = None, guidance: float | None = None, output: str = "video",
           **masks):
    """Continues `video` [B, T_in, H, W, 3]: a new clip of the noise's length whose first
    `context_frames` frames are the clip's last ones. Returns the whole extended video
    [B, T_in - context_frames + T_new, H, W, 3] (output="video") or the new clip's latents."""
    noise = gen._check_noise(noise)
    video = _video("video", video, noise.shape[0])
    tf = gen.temporal_factor
    frames = 1 + tf * (noise.shape[1] - 1)
    c = check_context_frames(gen, context_frames, frames, video.shape[1])
    tail = video[:, video.shape[1] - c:]
    _check_size(gen, "the extended clip", (noise.shape[0], frames) + tuple(tail.shape[2:4]),
                noise)
    kw = dict(masks)
    canvas = jnp.zeros((noise.shape[0], frames) + tail.shape[2:], jnp.float32).at[:, :c].set(tail)
    if gen.condition_channels:
        known = cond_lib.known_pixel_frames(frames, c)
        kw |= gen.i2v_inputs(canvas, known, tail[:, 0])
    else:
        # latent frames 0..n-1 of the causal VAE see only the context frames of the canvas
        n = 1 + (c - 1) // tf
        mask = cond_lib.latent_frame_mask(noise.shape[0], noise.shape[1], range(n))
        kw["pin"] = (gen.encode_video(canvas) * mask, mask)
    new = gen.sample(noise, context, negative_context, steps, guidance, output, **kw)
    if output == "latent":
        return new
    return jnp.concatenate([video[:, :video.shape[1] - c], new], axis=1)


def interpolate(gen, first, last, context, negative_context, noise, steps: int | None = None,
                guidance: float | None = None, output: str = "video", **kw):
    """A clip from keyframe `first` to keyframe `last` (each [B, H, W, 3] in [-1, 1])."""
    return gen.image_to_video(first, context, negative_context, noise, steps, guidance, output,
                              last_image=last, **kw)


def resize_batch(video, height: int, width: int) -> np.ndarray:
    """[B, T, H, W, 3] float in [-1, 1] -> [B, T, height, width, 3], each video resized to cover
    the size and center-cropped (video_io's resize_and_crop): another aspect is kept, not
    stretched."""
    video = np.asarray(video, np.float32)
    return np.stack([resize_and_crop(v, height, width) for v in video])


def upscale(gen, video, context, negative_context, noise, strength: float = 0.3,
            steps: int | None = None, guidance: float | None = None, output: str = "video",
            **masks):
    """`video` [B, T, h, w, 3] resized up to cover the noise's size and center-cropped (another
    aspect is kept, not stretched), then restyled at `strength`."""
    noise = gen._check_noise(noise)
    video = _video("video", video, noise.shape[0])
    f = gen.vae.spatial_factor
    height, width = noise.shape[2] * f, noise.shape[3] * f
    if max(height / video.shape[2], width / video.shape[3]) < 1:  # covering it would shrink it
        raise ValueError(f"upscale: the video is {video.shape[2]}x{video.shape[3]}, larger than "
                         f"the target {height}x{width} the noise implies on both sides")
    up = resize_batch(video, height, width)
    return restyle(gen, up, context, negative_context, noise, strength, steps, guidance, output,
                   **masks)
