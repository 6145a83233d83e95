"""Command-line checks that run before any model loads: sizes, counts, input files readable and of
the right kind, outputs writable. Each failure is a ValueError naming the flag, the value and the fix.

`check_args(args)` dispatches on `args.command`; `vdit/cli.py` calls it first thing.
`check_config(config, command)` runs when the recipe is loaded: `vdit.config.validate` (mesh,
attention backend, remat policy, dtypes, shapes) has run by then; this adds the rules that live
with the code they configure (`vdit/train/config_checks.py`: init_from, LoRA, I2V conditioning,
experts; the distill section), so a bad key fails before any model, data or device work.
"""

from __future__ import annotations

import math
import os

from PIL import Image, UnidentifiedImageError

from vdit import runs
from vdit.data import video_io
from vdit.distill import setup as distill_setup
from vdit.models.dit import build_dit
from vdit.pipelines.sharded import parse_mesh
from vdit.train.config_checks import check_train_config
from vdit.train.preflight import check_workdir

SEED_MAX = 2 ** 32 - 1  # jax.random.key takes any uint32 seed; prompt i uses --seed + i


# Commands that load a recipe from --config (and take --config.KEY=VALUE overrides); the others
# read a run's own saved config, so an override given to them would be silently ignored.
CONFIG_COMMANDS = ("train-vae", "encode", "train", "distill", "plan", "curate")
# Why each other command takes no --config, and where its settings come from instead.
NO_CONFIG = {
    "sample": "reads the run's own saved config; set sampling with its flags (--steps, "
              "--guidance, --frames, --size, --fps, --seed, --negative-prompt, --weights)",
    "serve": "reads the run's own saved config (--workdir)",
    "export": "writes the run's own saved config with its weights",
    "convert": "reads the config that comes with --src",
    "eval": "reads the run's own saved config (--workdir); --samples and --batch-size set the rest",
}


def config_flag_error(argv: list[str], commands) -> str | None:
    """What is wrong with the --config flags of `argv` before argparse sees them, or None: a
    command that takes no config given one (it would be ignored), or an override without '='
    (argparse would only say "unrecognized arguments" of its value)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in commands:
        return None  # argparse names the bad command
    for i, arg in enumerate(argv):
        if command not in CONFIG_COMMANDS and (arg == "--config" or arg.startswith(
                ("--config=", "--config."))):
            return (f"{arg.split('=')[0]}: `vdit {command}` takes no --config or --config.* "
                    f"overrides; it {NO_CONFIG.get(command, 'takes no config')}")
        if arg.startswith("--config.") and "=" not in arg:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
            example = f"{arg}={value}" if value is not None else f"{arg}=VALUE"
            return f"{arg} has no '=': give the value after '=', no space: {example}"
    return None


def check_config(config, command: str) -> None:
    """Start-up checks of a loaded recipe for `vdit <command>` (module doc); ConfigError or
    ValueError naming the key."""
    if command == "distill":  # the student's init_from and LoRA base come from the teacher
        distill_setup.check_config(config)
    elif command == "train":
        check_train_config(config, build_dit(config.model))


def check_args(args) -> None:
    command = args.command
    if command in ("train-vae", "encode", "train", "distill"):
        check_workdir(args.workdir)
    if command == "sample":
        check_sample(args)
    elif command == "plan":
        check_plan(args)
    elif command == "export" and args.out:
        check_workdir(args.out, "--out")


def _at_least(flag: str, value, low, what: str = "") -> None:
    if value is not None and (not math.isfinite(value) or value < low):
        raise ValueError(f"{flag} {value!r}: expected {what or f'a number >= {low}'}")


def check_sample(args) -> None:
    """`vdit sample`'s flags and files, before the generator loads."""
    if not runs.user_path(args.workdir, "--workdir").is_dir():
        check_workdir(args.workdir)
        raise ValueError(f"--workdir {args.workdir!r} does not exist: give a trained run folder "
                         "or a diffusers pipeline folder")
    _at_least("--batch-size", getattr(args, "batch_size", None), 1, "a whole number >= 1")
    _at_least("--steps", args.steps, 1, "a whole number >= 1")
    _at_least("--frames", args.frames, 1, "1 + 4k frames (1, 5, 9, 17, ...)")
    _at_least("--guidance", args.guidance, 0, "a finite number >= 0")
    if getattr(args, "fps", None) is not None:
        video_io.check_fps(args.fps, "--fps")
    _at_least("--context-frames", getattr(args, "context_frames", None), 1, "a count >= 1")
    strength, mode = getattr(args, "strength", None), getattr(args, "mode", None)
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise ValueError(f"--strength {strength!r}: expected a number in (0, 1]")
    # flags that only shape video-to-video are refused without it (they were dropped in silence)
    if mode and not args.video:
        raise ValueError(f"--mode {mode} needs --video (the input video it works on)")
    if getattr(args, "context_frames", None) is not None and (mode or "restyle") != "extend":
        raise ValueError("--context-frames needs --mode extend (the frames of --video kept as "
                         "context)")
    if strength is not None and (not args.video or mode == "extend"):
        raise ValueError("--strength needs --video with --mode restyle or upscale (how far the "
                         "video is re-drawn)")
    if not 0 <= args.seed <= SEED_MAX:
        raise ValueError(f"--seed {args.seed}: expected 0..{SEED_MAX}")
    if getattr(args, "last_image", None) and not args.image:
        raise ValueError("--last-image needs --image (the first frame): keyframe interpolation "
                         "goes from --image to --last-image")
    if getattr(args, "last_image", None) and args.frames == 1:
        raise ValueError("--last-image with --frames 1: keyframe interpolation needs a first and "
                         "a last frame (--frames 5, 9, 13, ...)")
    for flag in ("image", "last_image"):
        path = getattr(args, flag, None)
        if path:
            check_image_file(f"--{flag.replace('_', '-')}", path)
    if args.video:
        check_video_file(args.video)
    check_prompt_file(getattr(args, "prompt_file", None))
    if getattr(args, "mesh", None) is not None:
        parse_mesh(args.mesh)  # its sizes against the devices and the model: when they load
    check_writable(args.out)


def check_image_file(flag: str, path: str) -> None:
    """An image PIL can decode completely (a text file or a truncated PNG fails here)."""
    file = runs.user_path(path, flag)
    if file.is_dir():
        raise ValueError(f"{flag} {path!r} is a folder: give an image file (PNG or JPEG)")
    if not file.is_file():
        raise ValueError(f"{flag} {path!r} does not exist")
    try:
        with file.open("rb") as f, Image.open(f) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{flag} {path!r} is not a readable image ({e}); give a PNG or JPEG "
                         "file") from e


def check_video_file(path: str) -> None:
    """A file PyAV opens with a video stream and a first decodable frame."""
    try:
        video_io.probe_video(path)
    except video_io.VideoReadError as e:
        raise ValueError(f"--video {path!r}: {e}; give an .mp4 (or another format ffmpeg reads)"
                         ) from e


def check_prompt_file(path: str | None) -> None:
    """A UTF-8 text file (a binary file fails here, naming it)."""
    if not path:
        return
    file = runs.user_path(path, "--prompt-file")
    if not file.is_file():
        raise ValueError(f"--prompt-file {path!r} does not exist")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path!r} is not UTF-8 text (byte {e.start}): give a "
                         "text file with one prompt per line") from e
    if "\x00" in text:
        raise ValueError(f"--prompt-file {path!r} is a binary file: give a text file with one "
                         "prompt per line")


def check_writable(out: str, flag: str = "--out") -> None:
    """The output's folder exists (or can be made) and takes a new file; checked before sampling."""
    target = runs.absolute(out)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"{flag} {out!r} is a folder: give a file name ending in .mp4 or .gif")
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{flag} {out!r}: {os.fspath(probe)!r} is a file, so no folder can be "
                         "made under it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        test = folder / f".vdit-write-test-{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {out!r}: cannot write in {folder!r} ({e.strerror or e}); "
                         "choose a writable place") from e


def check_plan(args) -> None:
    for flag in ("devices", "frames", "tokens", "rows", "text_len", "clip_tokens",
                 "proxy_devices"):  # 0 must not read as "not given"
        _at_least("--" + flag.replace("_", "-"), getattr(args, flag, None), 1,
                  "a whole number >= 1")
    _at_least("--hbm-gb", getattr(args, "hbm_gb", None), 1e-9, "a positive size in GiB")
