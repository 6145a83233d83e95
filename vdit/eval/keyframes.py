"""Image-conditioned checks of a model trained on the synthetic shapes world.

`image_to_video_check`: held-out clips' first frames (+ their captions) -> generated videos; the
judge reads the main object of each, scored against the clip's own object (the first frame fixes
its color and shape, the caption its direction).
`interpolation_check`: held-out clips of an object moving left or right; only their first and last
frames are given (keyframe interpolation); the judge must read the clip's direction from the
generated in-between frames.
Both return `vdit.eval.shapes.score` dicts plus the videos, so callers can write them out.
"""

from __future__ import annotations

import numpy as np

from vdit.eval.shapes import judge_video, score

HORIZONTAL = ("left", "right")


def _held_out(world, count: int, frames: int, skip: int, want=None) -> list[int]:
    """Indices from the end of the world (never trained on), skipping the last `skip`."""
    picked, i = [], len(world) - 1 - skip
    while len(picked) < count and i >= 0:
        if want is None or world.prompt_record(i, frames)["direction"] in want:
            picked.append(i)
        i -= 1
    return picked


def _generate(gen, world, indices, frames, height, width, seed, batch, last: bool):
    videos, targets = [], []
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        clips = np.stack([world.render(i, frames, height, width)["video"] for i in chunk])
        records = [world.prompt_record(i, frames) for i in chunk]
        context, mask = gen.encode_text([r["prompt"] for r in records])
        neg, neg_mask = gen.encode_text([""] * len(chunk))
        noise = gen.noise(seed + start, len(chunk), frames, height, width)
        out = gen.image_to_video(clips[:, 0], context, neg, noise, context_mask=mask,
                                 negative_mask=neg_mask, last_image=clips[:, -1] if last else None)
        videos.extend(np.asarray(out))
        targets.extend(records)
    return videos, targets


def image_to_video_check(gen, world, count: int, frames: int, height: int, width: int,
                         seed: int = 0, batch: int = 8, skip: int = 0) -> tuple[dict, list]:
    """Judge scores of `count` image-to-video samples from held-out first frames."""
    indices = _held_out(world, count, frames, skip)
    videos, targets = _generate(gen, world, indices, frames, height, width, seed, batch, False)
    return score([judge_video(v) for v in videos], targets), videos


def interpolation_check(gen, world, count: int, frames: int, height: int, width: int,
                        seed: int = 0, batch: int = 8, skip: int = 0) -> tuple[dict, list]:
    """Judge scores of `count` keyframe interpolations of objects moving left or right."""
    indices = _held_out(world, count, frames, skip, want=HORIZONTAL)
    videos, targets = _generate(gen, world, indices, frames, height, width, seed, batch, True)
    return score([judge_video(v) for v in videos], targets), videos
