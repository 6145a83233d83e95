"""`vdit sample`: videos from prompts, optionally from a first image or an input video.

`run_cli(args)` takes the argparse Namespace that `vdit/cli.py` builds for `sample`. `--workdir` is
a vdit run folder (its latest checkpoint), one of its step folders (RUN/checkpoints/STEP: that
step's weights) or a diffusers Wan pipeline folder (one with model_index.json).
  text-to-video    --prompt ... (repeatable) or --prompt-file (one per line)
  image-to-video   --image first.png [--last-image last.png: keyframe interpolation]
  video-to-video   --video in.mp4 with --mode restyle (SDEdit at --strength, the default),
                   extend (continue from its last --context-frames frames) or upscale (to --size,
                   re-drawn at --strength)
Several prompts write numbered files (out_000.mp4, ...); prompt i's noise comes from seed
--seed + i whatever batch it runs in. Inputs of the wrong size are resized and center-cropped (with
a message); --frames must be 1 + 4k. `--mode`, `--last-image`, `--context-frames`,
`--negative-prompt`, `--fps`, `--motion` and `--batch-size` are read when the parser defines them
(defaults otherwise). `--fps` is the output frame rate and, for a model micro-conditioned on fps,
also its conditioning value; `--motion` (frame short sides per second) is only for a model
micro-conditioned on motion and an error for any other. `--lora PATH[:STRENGTH]` and `--lora-2`
(a Wan2.2 A14B model's low-noise expert) merge LoRA files (or a `vdit export --adapter` folder)
into the loaded DiT (vdit/convert/wan_lora.py); `--weights params` samples a vdit run's raw
weights instead of its EMA (e.g. the base a LoRA was trained on, `train.init_from_weights`);
`vdit serve` takes these too, and `--mesh fsdp=4,tensor=2` (axes data/fsdp/tensor/sequence, one
size -1 = the rest): weights sharded over that device mesh as training shards them, for a model
bigger than one chip (vdit/pipelines/sharded.py); only process 0 writes. Running out of device
memory is an error naming the clip's frames x height x width and what to make smaller.
"""

from __future__ import annotations

import math
import re
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image

from vdit import cli_errors, runs
from vdit.cli_checks import SEED_MAX
from vdit.config import check_frames
from vdit.convert import wan_lora
from vdit.convert.diffusers_folder import is_pipeline_folder, looks_like_pipeline_folder
from vdit.data import video_io
from vdit.models.tokenizers import prompt_clean
from vdit.pipelines import sharded
from vdit.pipelines import video_to_video as v2v
from vdit.pipelines.generate import Generator
from vdit.pipelines.prompt_expand import shapes_expander
from vdit.sample_flags import check_early, check_size, clip_size, model_facts, opt, parse_size, size_multiples

SUFFIXES = (".mp4", ".gif")
MODES = ("restyle", "extend", "upscale")
STRENGTH = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)",
                      re.IGNORECASE | re.ASCII)
DEFAULT_BATCH = 4  # prompts sampled together (--batch-size when the parser defines it)
DEFAULT_STRENGTH = 0.7  # --strength when not given (a parser may default it to None)


def parse_lora(spec: str, flag: str = "--lora") -> tuple[str, float]:
    """"PATH" or "PATH:STRENGTH" -> (path, strength); a suffix that is no number is part of the
    path (gs://...)."""
    path, sep, tail = spec.rpartition(":")
    if not sep or not (STRENGTH.fullmatch(tail) or tail == ""):
        return spec, 1.0
    if not path or not tail or not math.isfinite(float(tail)):
        raise ValueError(f"{flag} {spec!r}: expected PATH or PATH:STRENGTH (e.g. "
                         "style.safetensors:0.8)")
    return path, float(tail)


def load_generator(workdir: str, loras=(), loras_2=(), weights: str | None = None,
                   dtype: str | None = None):
    """(Generator, "diffusers" | "vdit") for a pipeline folder or a vdit run folder (its `weights`,
    "ema" by default, or "params"), with the LoRA files `loras` ("PATH[:STRENGTH]", on the DiT or
    a two-expert model's high-noise one) and `loras_2` (its low-noise one) merged in; `dtype`
    (None: as loaded) the weights and compute dtype of its DiT(s) and encoders."""
    specs = []
    for flag, expert, values in (("--lora", "high", loras), ("--lora-2", "low", loras_2)):
        for spec in values:  # files checked before the (slow) model load
            path, strength = parse_lora(spec, flag)
            specs.append(((wan_lora.lora_file(path, flag, expert), strength), expert))
    if not runs.check_reachable(workdir, "--workdir").is_dir():
        raise FileNotFoundError(f"--workdir {workdir!r} does not exist")
    if is_pipeline_folder(workdir):
        if weights not in (None, "ema"):
            raise ValueError(f"--weights {weights}: {workdir} is a diffusers folder, which holds "
                             "one set of weights")
        gen, kind = Generator.from_diffusers(workdir, dtype=dtype or "float32"), "diffusers"
    elif looks_like_pipeline_folder(workdir):
        raise FileNotFoundError(f"--workdir {workdir}: a diffusers pipeline folder (it has "
                                "transformer/ and vae/) needs its model_index.json too")
    else:
        gen, kind = Generator.from_workdir(workdir, weights or "ema", dtype), "vdit"
    for (path, strength), expert in specs:
        gen = gen.with_lora(path, strength, expert, donate=True)  # the unmerged DiT is not kept
        print(f"vdit: merged LoRA {path} at strength {strength:g}"
              + (" into the low-noise expert" if expert == "low" else ""))
    return gen, kind


def read_prompts(args) -> list[str]:
    prompts = [p for p in (args.prompt or []) if p.strip()]
    if args.prompt_file:
        path = runs.check_reachable(args.prompt_file, "--prompt-file")
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file!r} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    if not prompts:
        raise ValueError("give a prompt: --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def expand_prompts(prompts: list[str], kind: str) -> list[str]:
    """The shapes world's rule-based expander for vdit runs; diffusers models only clean."""
    expander = shapes_expander() if kind == "vdit" else prompt_clean
    if kind != "vdit":
        print("vdit sample: no prompt expander for diffusers models; prompts are only cleaned")
    out = []
    for prompt in prompts:
        out.append(expander(prompt))
        print(f"vdit sample: expanded prompt: {prompt!r} -> {out[-1]!r}")
    return out


def warn_unknown_words(tokenizer, prompts: list[str], kind: str) -> list[str]:
    """One warning per prompt with words the text encoder's vocabulary lacks (a word-level
    encoder reads them as <unk>), with the shapes expander's rewrite as a suggestion for vdit runs.
    Returns the warnings printed."""
    unknown_words = getattr(tokenizer, "unknown_words", None)
    if unknown_words is None:  # byte/subword tokenizers read any text
        return []
    warnings = []
    for i, prompt in enumerate(prompts):
        words = unknown_words(prompt)
        if not words:
            continue
        line = (f"vdit sample: warning: prompt {i} {prompt!r}: the text encoder does not know "
                f"{', '.join(repr(w) for w in words)} (read as <unk>)")
        suggestion = shapes_expander()(prompt) if kind == "vdit" else ""
        if suggestion and suggestion != prompt and not unknown_words(suggestion):
            line += f"; the prompt expander suggests {suggestion!r} (--expand-prompt)"
        print(line, file=sys.stderr)
        warnings.append(line)
    return warnings


def output_paths(out: str, count: int) -> list[str]:
    name = runs.user_path(out).name
    suffix = name[name.rfind("."):] if "." in name else ""
    stem = out[: len(out) - len(suffix)]
    if suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out {out!r}: unsupported suffix {suffix!r}; use .mp4 or .gif")
    return [out] if count == 1 else [f"{stem}_{i:03d}{suffix}" for i in range(count)]


def fit(video: np.ndarray, height: int, width: int, what: str,
        shown: tuple[int, int] | None = None) -> np.ndarray:
    """[T, H, W, 3] resized to cover height x width and center-cropped, saying so; `shown`: the
    source's size when `video` was already shrunk as it was read."""
    shown = tuple(shown or video.shape[1:3])
    if shown != (height, width):
        print(f"vdit sample: {what} is {shown[0]}x{shown[1]}; resizing and center-cropping it "
              f"to {height}x{width}")
    if video.shape[1:3] != (height, width):
        video = video_io.resize_and_crop(video, height, width)
    return video


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file -> [H, W, 3] float32 in [-1, 1] at the target size."""
    if not runs.check_reachable(path, "image").is_file():
        raise FileNotFoundError(f"image {path!r} does not exist")
    with runs.user_path(path).open("rb") as f, Image.open(f) as img:
        pixels = video_io.image_rgb(img)
    return video_io.to_float(fit(pixels[None], height, width, f"image {path}")[0])


def trim_frames(video: np.ndarray, frames: int | None, path: str) -> np.ndarray:
    """The first `frames` frames (default: the longest 1 + 4k prefix) of a [T, H, W, 3] clip."""
    usable = 1 + 4 * ((video.shape[0] - 1) // 4)
    if frames is None:
        frames = usable
        if usable < video.shape[0]:  # said as fit() says a resize: dropped frames surprise
            print(f"vdit sample: --video {path} has {video.shape[0]} frames; using the first "
                  f"{usable} (a clip is 1+4k frames; --frames chooses)")
    check_frames("--frames", frames)
    if frames > video.shape[0]:
        raise ValueError(f"video {path} has {video.shape[0]} frames; --frames={frames} needs "
                         f"more (use --frames {usable} or less)")
    return video[:frames]


def needs_image(gen) -> bool:
    """Whether `gen` is an image-to-video model (I2V channels and a CLIP image branch, or an
    image-to-video pipeline folder): it samples only from a first image (or an input video's
    first frame)."""
    return bool(gen.condition_channels and (gen.dit.has_image_branch or gen.image_only))


class OutOfMemory(ValueError):
    """Sampling ran out of device memory: names the clip's shape and what to make smaller."""
    FLAGS = {"size": "--size", "frames": "--frames", "batch": "--batch-size 1"}
    FIELDS = {"size": "size", "frames": "frames", "batch": ""}  # vdit serve: one video a job

    def __init__(self, batch: int, frames: int, height: int, width: int):
        self.shape = (batch, frames, height, width)
        super().__init__(self.message(self.FLAGS))

    def message(self, names: dict) -> str:
        batch, frames, height, width = self.shape
        videos = f"{batch} videos of " if batch > 1 else ""
        fix = f"a smaller {names['size']} or fewer {names['frames']}"
        if batch > 1 and names["batch"]:
            fix += f", or {names['batch']}"
        return (f"out of device memory sampling {videos}{frames}x{height}x{width} (frames x "
                f"height x width): try {fix}")


class SampleJob:
    """One `vdit sample` run: a loaded Generator and the resolved settings."""

    def __init__(self, gen, kind: str, args):
        self.gen, self.kind, self.args = gen, kind, args
        self.mode = opt(args, "mode", "restyle")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}; expected one of {list(MODES)}")
        d = gen.defaults
        _, self.height, self.width = clip_size(args, d)
        self.fps = float(opt(args, "fps", d.get("fps", 16.0)))
        self.video = None
        if args.video:
            # Decoded no larger than the clip needs (upscale keeps the small source it is given)
            # and, but to extend it, no longer: a minute of 4K would be ~45 GB in memory.
            self.video_size = video_io.probe_video(args.video)
            video, fps = video_io.load_video(
                args.video, first=None if self.mode == "extend" else args.frames,
                cover=None if self.mode == "upscale" else (self.height, self.width))
            self.fps = float(opt(args, "fps", fps or self.fps))
            self.video = self._input_video(video)
        micro = {"motion": opt(args, "motion")}
        if "fps" in gen.dit.micro_conditioning:
            micro["fps"] = self.fps
        self.gen = gen = gen.with_micro(**micro)
        self.frames = frames = clip_size(
            args, d, None if self.video is None else self.video.shape[0])[0]
        if args.size:  # again for a folder whose config check_early could not read
            check_size(args.size, *size_multiples(gen.vae, gen.dit))
        gen.latent_shape(frames, self.height, self.width)  # frames 1+4k, size multiples
        if needs_image(gen) and not (args.image or args.video):
            raise ValueError(f"{args.workdir} is an image-to-video model: give --image FILE "
                             "(or --video FILE)")
        self.context_frames = None
        if self.mode == "extend" and self.video is not None:
            self.context_frames = v2v.check_context_frames(
                gen, opt(args, "context_frames"), frames, self.video.shape[0], "--context-frames")

    def _input_video(self, video: np.ndarray) -> np.ndarray:
        args = self.args
        if self.mode == "extend":
            clip = video
        else:
            clip = trim_frames(video, args.frames, args.video)
        if self.mode == "upscale":  # v2v.upscale resizes it to --size, center-cropping as fit does
            if clip.shape[1] * self.width != clip.shape[2] * self.height:
                print(f"vdit sample: video {args.video} is {clip.shape[1]}x{clip.shape[2]}; "
                      f"resizing and center-cropping it to {self.height}x{self.width} (the "
                      "aspect is kept)")
            return video_io.to_float(clip)
        return video_io.to_float(fit(clip, self.height, self.width, f"video {args.video}",
                                     self.video_size))

    def run(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """A batch of prompts -> videos [B, T, H, W, 3] in [-1, 1]; prompt i uses noise drawn
        from seeds[i] alone, so a prompt's video does not depend on the batch it ran in. Running
        out of device memory raises OutOfMemory (the shape, and what to make smaller)."""
        try:
            return self._run(prompts, seeds)
        except Exception as e:
            if cli_errors.out_of_memory(e):
                raise OutOfMemory(len(prompts), self.frames, self.height, self.width) from e
            raise

    def _run(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        gen, args, b = self.gen, self.args, len(prompts)
        context, mask = gen.encode_text(prompts)
        neg, neg_mask = gen.encode_text([opt(args, "negative_prompt", "")] * b)
        text = dict(context_mask=mask, negative_mask=neg_mask)
        if opt(args, "guidance_2") is not None:
            text["guidance_2"] = args.guidance_2
        noise = jnp.concatenate([gen.noise(s, 1, self.frames, self.height, self.width)
                                 for s in seeds])
        steps, guidance = args.steps, args.guidance
        batch = lambda x: np.repeat(x[None], b, axis=0)
        strength = opt(args, "strength", DEFAULT_STRENGTH)
        if self.video is not None:
            video = batch(self.video)
            if self.mode == "extend":
                out = v2v.extend(gen, video, context, neg, noise, self.context_frames, steps,
                                 guidance, **text)
            elif self.mode == "upscale":
                out = v2v.upscale(gen, video, context, neg, noise, strength, steps, guidance,
                                  **text)
            else:
                out = v2v.restyle(gen, video, context, neg, noise, strength, steps, guidance,
                                  **text)
        elif args.image:
            first = batch(load_image(args.image, self.height, self.width))
            last_path = opt(args, "last_image")
            last = None if last_path is None else batch(load_image(last_path, self.height,
                                                                   self.width))
            out = gen.image_to_video(first, context, neg, noise, steps, guidance,
                                     last_image=last, **text)
        else:
            out = gen.text_to_video(context, neg, noise, steps, guidance, "video", **text)
        return np.asarray(out)


def run_cli(args) -> int:
    """The body of `vdit sample`; returns the exit status (errors raise ValueError and friends)."""
    prompts = read_prompts(args)
    paths = output_paths(args.out, len(prompts))
    if args.seed + len(prompts) - 1 > SEED_MAX:  # jax.random.key would wrap past 2^32 - 1
        raise ValueError(f"--seed {args.seed} with {len(prompts)} prompts: prompt i samples with "
                         f"seed --seed + i, which must stay <= {SEED_MAX}; give --seed <= "
                         f"{SEED_MAX - len(prompts) + 1}")
    if args.frames is not None:
        check_frames("--frames", args.frames)
    if args.size:
        parse_size(args.size)
    if args.image and args.video:
        raise ValueError("give --image (image-to-video) or --video (video-to-video), not both")
    check_early(args, model_facts(args.workdir))
    gen, kind = sharded.load_on_mesh(opt(args, "mesh"), load_generator, args.workdir,
                                     opt(args, "lora", []), opt(args, "lora_2", []),
                                     opt(args, "weights"), opt(args, "dtype"))
    if gen.text_model is None:
        raise ValueError(f"{args.workdir} has no text encoder (text_encoder/ + tokenizer/): "
                         "vdit sample needs one to encode prompts")
    if args.expand_prompt:
        prompts = expand_prompts(prompts, kind)
    warn_unknown_words(gen.tokenizer, prompts, kind)
    job = SampleJob(gen, kind, args)
    size = int(opt(args, "batch_size", DEFAULT_BATCH))
    for start in range(0, len(prompts), size):
        chunk = list(range(start, min(start + size, len(prompts))))
        videos = job.run([prompts[i] for i in chunk], [args.seed + i for i in chunk])
        for i, video in zip(chunk, videos if sharded.is_writer() else ()):  # process 0 writes
            path = paths[i]
            with runs.staged_output(path) as local:  # PyAV writes local files
                video_io.write_video(local, video, job.fps)
            print(f"vdit sample: wrote {runs.absolute(path)} ({video.shape[0]} frames, "
                  f"{video.shape[1]}x{video.shape[2]}, seed {args.seed + i})")
    return 0
