"""Periodic samples during DiT training: every `train.sample_every` steps, videos for a fixed prompt
set from the current EMA weights, decoded with the run's VAE, written to
`workdir/samples/step_{step:06d}/` as `{i:02d}.mp4`, `grid.png` and `prompts.txt` (line i = video i).

Config: `train.sample_every` (0 = off); `sample.frames/height/width/steps/guidance/scheduler` as for
`vdit sample`; optional `sample.prompts` (list of strings; default: the first `sample.num_prompts`
(default 4) distinct captions of the run's latent shards) and `sample.seed` (default 0: the same
noise at every step, so the videos are comparable over training). A run without
`encode.vae_workdir` cannot decode and samples nothing (one warning at start).

With a metrics writer (the training loop's), each video also goes to TensorBoard as an animated
image `samples/{i:02d}` and, when every prompt names one shapes-world object (color, shape,
direction: the shapes recipes), the judge's accuracies `judge/color`, `judge/shape`,
`judge/direction` and `judge/all` are logged at the sample step (vdit/eval/shapes.py).

Every process runs the generation (the weights may be sharded over all of them); process 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vdit import runs
from vdit.data.sources import LatentShardSource
from vdit.data.video_io import write_grid_png, write_video
from vdit.eval.shapes import judge_video, score
from vdit.models import lora
from vdit.pipelines.generate import Generator
from vdit.pipelines.prompt_expand import shapes_expander

log = logging.getLogger(__name__)
DEFAULT_NUM_PROMPTS = 4
MAX_CAPTION_SCAN = 1000  # records read at most when collecting distinct captions


def complete_weights(config, ema: dict, frozen: dict) -> dict:
    """{"dit", "text"[, "dit_2"]} the model samples with: trainable EMA over the frozen weights,
    LoRA merged."""
    return lora.merge_all({**frozen, **ema}, config.get("lora", {}))


def sample_prompts(config, latents: str) -> list[str]:
    """`sample.prompts`, or the first `sample.num_prompts` distinct captions in `latents`."""
    given = config.sample.get("prompts", None)
    if given:
        if isinstance(given, str) or not all(isinstance(p, str) for p in given):
            raise ValueError(f"config key 'sample.prompts' = {given!r}: expected a list of strings")
        return list(given)
    count = int(config.sample.get("num_prompts", DEFAULT_NUM_PROMPTS))
    source = LatentShardSource(latents)
    captions: list[str] = []
    for i in range(min(len(source), MAX_CAPTION_SCAN)):
        caption = str(source[i].get("caption", "")).strip()
        if caption and caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                break
    if not captions:
        raise ValueError(f"train.sample_every is set but config key 'sample.prompts' is empty and "
                         f"the latent shards in {latents!r} have no captions: give sample.prompts")
    return captions


@dataclasses.dataclass
class PeriodicSamples:
    every: int
    folder: str                # workdir/samples
    prompts: list[str]
    generator: Any             # vdit.pipelines.generate.Generator (weights replaced per call)
    config: ml_collections.ConfigDict
    shape: tuple[int, int, int]  # frames, height, width
    seed: int
    fps: float

    def maybe_write(self, step: int, ema: dict, frozen: dict, writer=None) -> str | None:
        """Samples when `step` is a multiple of `every`; returns the step folder or None."""
        return self.write(step, ema, frozen, writer) if step % self.every == 0 else None

    def write(self, step: int, ema: dict, frozen: dict, writer=None) -> str:
        """`writer`: a `vdit.train.metrics.MetricsWriter` for TensorBoard videos and judge scores."""
        weights = complete_weights(self.config, ema, frozen)
        gen = dataclasses.replace(self.generator, dit_params=weights["dit"],
                                  text_params=weights["text"])
        videos = _to_host(gen.generate(self.prompts, *self.shape, seed=self.seed))
        out = runs.user_path(self.folder) / f"step_{step:06d}"
        if jax.process_index() != 0:
            return str(out)
        out.mkdir(parents=True, exist_ok=True)
        for i, video in enumerate(videos):
            with runs.staged_output(out / f"{i:02d}.mp4") as local:  # PyAV writes local files
                write_video(local, video, fps=self.fps)
        with runs.staged_output(out / "grid.png") as local:
            write_grid_png(local, videos)
        (out / "prompts.txt").write_text("\n".join(self.prompts) + "\n")
        log.info("step %d: wrote %d samples and grid.png to %s", step, len(videos), out)
        if writer is not None:
            writer.write_videos(step, {f"samples/{i:02d}": v for i, v in enumerate(videos)},
                                self.fps)
            targets = shapes_targets(self.prompts)
            if targets is not None:
                scores = score([judge_video(v) for v in videos], targets)
                writer.write(step, {f"judge/{k}": scores[k]
                                    for k in ("color", "shape", "direction", "all")})
        return str(out)


def shapes_targets(prompts: list[str]) -> list[dict] | None:
    """{color, shape, direction} of each prompt when every prompt names exactly one shapes-world
    object (what the judge can score), else None."""
    expander = shapes_expander()
    targets = []
    for prompt in prompts:
        objects = expander.parse(prompt)
        if objects is None or len(objects) != 1:
            return None
        targets.append(objects[0])
    return targets


def from_config(config, workdir: str, ema: dict, frozen: dict) -> PeriodicSamples | None:
    """The run's periodic sampler (VAE, latent statistics and prompts loaded now, so a problem
    shows before step 1), or None when `train.sample_every` is 0 or the run has no VAE."""
    every = int(config.train.get("sample_every", 0) or 0)
    if every <= 0:
        return None
    vae_workdir = config.encode.get("vae_workdir", "") if "encode" in config else ""
    if not vae_workdir:
        log.warning("train.sample_every=%d but the run has no encode.vae_workdir to decode with: "
                    "no periodic samples", every)
        return None
    if "sample" not in config:
        raise ValueError("train.sample_every is set but the config has no 'sample' section "
                         "(frames, height, width, steps, guidance, scheduler)")
    missing = [k for k in ("frames", "height", "width", "scheduler") if k not in config.sample]
    if missing:
        raise ValueError(f"train.sample_every is set but config section 'sample' lacks {missing}")
    shape = tuple(int(config.sample[k]) for k in ("frames", "height", "width"))
    generator = Generator.from_params(config, complete_weights(config, ema, frozen), workdir)
    generator.latent_shape(*shape)  # a size the VAE and patches cannot take fails here
    fps = float(config.data.get("fps", 16.0)) if "data" in config else 16.0
    return PeriodicSamples(every, str(runs.samples_dir(workdir)),
                           sample_prompts(config, runs.latents_dir(config, workdir)), generator,
                           config, shape, int(config.sample.get("seed", 0)), fps)


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
