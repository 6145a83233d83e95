"""`vdit <command>`: the one command line. Each command parses its flags and calls one function.

Config overrides are given as `--config.a.b=value` after the command's own flags, to the commands
that load a recipe (cli_checks.CONFIG_COMMANDS); the others read a run's saved config and refuse
--config and any override rather than ignore it. Commands that are not built yet say so and exit
with status 2; nothing prints fake output. Flags and input files are checked before any model
loads (vdit/cli_checks.py); every failure goes through one error path (vdit/cli_errors.py): one
or two lines, a non-zero exit, the traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import sys

from vdit import cli_checks, cli_errors, runs

# command -> (help, issue that builds it). A command is "built" once _handler() can import it.
COMMANDS = {
    "train-vae": ("train the causal video VAE", 3),
    "encode": ("encode a data source into latent + text-embedding shards", 6),
    "train": ("train the diffusion transformer (resumes from --workdir)", 7),
    "distill": ("distill a trained run into a few-step student (resumes from --workdir)", 26),
    "sample": ("generate videos: text-to-video, image-to-video, video-to-video", 8),
    "curate": ("cut, score, filter and caption raw videos into clip shards", 10),
    "eval": ("evaluate samples: `vdit eval shapes` scores prompt adherence", 2),
    "convert": ("convert Wan2.1 diffusers weights to and from vdit", 4),
    "plan": ("print per-device memory for a config and mesh before launching", 9),
    "export": ("write a run's complete weights (LoRA merged) as a standalone vdit run", 7),
    "serve": ("a local web page for generation over one loaded model", 22),
}


# Commands whose --workdir is a run folder they write: an error is logged in it (cli_errors).
RUN_COMMANDS = ("train-vae", "encode", "train", "distill")


class NotBuiltError(RuntimeError):
    """A command exists in the design but is not implemented in this version."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdit", description="vdit: train and run video diffusion transformers in JAX.",
        epilog="Override any config value with --config.KEY=VALUE, e.g. --config.train.steps=100 "
               f"({', '.join(cli_checks.CONFIG_COMMANDS)}).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true",
                       help="print the traceback of an error (also: VDIT_DEBUG=1)")
        _add_flags(name, p)
    return parser


def _add_config_flags(p: argparse.ArgumentParser, workdir_required: bool = True) -> None:
    p.add_argument("--config", help="path to a configs/*.py file")
    p.add_argument("--workdir", required=workdir_required, help="run folder (checkpoints, logs)")


def _add_flags(name: str, p: argparse.ArgumentParser) -> None:
    from vdit.parallel.distributed import add_distributed_flags

    if name in ("train-vae", "encode", "train", "distill", "plan", "sample", "curate"):
        add_distributed_flags(p)
    if name in ("train-vae", "encode", "train", "distill"):
        _add_config_flags(p)
    if name in ("encode", "curate"):
        p.add_argument("--shard", type=int, default=0,
                       help="this worker's index in [0, --num-shards) (default 0)")
        p.add_argument("--num-shards", type=int, default=1,
                       help="workers splitting the input, each its own --shard (default 1)")
    if name in ("train", "distill"):
        p.add_argument("--dry-run", action="store_true",
                       help="build the model, mesh and abstract sharded state, compile the step "
                            "ahead of time, print one JSON line; nothing allocated or trained")
        p.add_argument("--hbm-gb", dest="hbm_gb", type=float,
                       help="with --dry-run: fail when the step needs more GiB per device")
        p.add_argument("--cpu-devices", dest="cpu_devices", type=int, default=8,
                       help="with --dry-run on CPU: fake devices to compile for (default 8)")
    elif name == "plan":
        from vdit.plan import add_plan_flags

        _add_config_flags(p, workdir_required=False)
        add_plan_flags(p)
    elif name == "sample":
        p.add_argument("--workdir", required=True, help="a vdit run or a diffusers Wan folder")
        p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
        p.add_argument("--prompt-file", help="text file, one prompt per line")
        p.add_argument("--image", help="first frame for image-to-video")
        p.add_argument("--video", help="input video for video-to-video")
        p.add_argument("--strength", type=float,
                       help="how far --video is re-drawn, in (0, 1] (default 0.7)")
        p.add_argument("--steps", type=int)
        p.add_argument("--guidance", type=float)
        p.add_argument("--guidance-2", type=float,
                       help="the low-noise expert's guidance (Wan2.2 A14B; default: the run's "
                            "sample.guidance_2 with the run's guidance, else --guidance)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--frames", type=int)
        p.add_argument("--size", help="HEIGHTxWIDTH, e.g. 64x64")
        p.add_argument("--out", default="sample.mp4", help="output .mp4 or .gif")
        p.add_argument("--expand-prompt", action="store_true")
        p.add_argument("--negative-prompt", help="what guidance steers away from")
        p.add_argument("--fps", type=float, help="output frame rate (and its micro-conditioning)")
        p.add_argument("--motion", type=float,
                       help="motion score (frame short sides/s) for a motion-conditioned model")
        p.add_argument("--batch-size", type=int, help="videos generated per call")
        p.add_argument("--last-image", help="last frame: keyframe interpolation with --image")
        p.add_argument("--mode", choices=["restyle", "extend", "upscale"],
                       help="what to do with --video (default restyle)")
        p.add_argument("--context-frames", type=int,
                       help="frames of --video kept as context when extending")
    elif name == "eval":
        p.add_argument("what", choices=["shapes"], help="which evaluation")
        p.add_argument("--videos", help="folder of videos to judge")
        p.add_argument("--prompts", help="jsonl: file, prompt, color, shape, direction per line")
        p.add_argument("--workdir", help="a DiT run to sample held-out prompts from and judge, "
                       "or a folder holding a samples.jsonl")
        # vdit.eval.shapes_samples.HELD_OUT_SAMPLES, not imported: the CLI starts light
        p.add_argument("--samples", type=int, default=128,
                       help="videos to sample from --workdir (128: the judge's score moves by "
                       "about 0.02 from sampling noise; at 32, 0.05)")
        p.add_argument("--batch-size", type=int, default=8, help="videos generated per call")
    elif name == "curate":
        _add_config_flags(p, workdir_required=False)
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
    elif name == "convert":
        p.add_argument("--from", dest="src_format", choices=["diffusers", "vdit"])
        p.add_argument("--to", dest="dst_format", choices=["diffusers", "vdit"])
        p.add_argument("--src", required=True)
        p.add_argument("--out", required=True)
    elif name == "serve":
        p.add_argument("--workdir", required=True, help="a vdit run or a diffusers Wan folder")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
        p.add_argument("--port", type=int, default=8000, help="port (0 = any free one)")
        p.add_argument("--out", help="folder for the videos (default WORKDIR/serve; RUN/serve "
                                     "for a step folder RUN/checkpoints/STEP)")
        p.add_argument("--max-pixels", type=int, default=0,
                       help="largest request, frames x height x width (default: 16x the "
                            "model's default clip)")
    elif name == "export":
        p.add_argument("--workdir", required=True, help="a run folder or checkpoint step folder")
        p.add_argument("--out", required=True, help="new run folder for the merged weights")
        p.add_argument("--adapter", action="store_true",
                       help="write only a LoRA run's adapter (safetensors + json) into --out")
    if name in ("sample", "serve"):
        p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                       help="LoRA .safetensors (diffusers or original Wan names) merged into the "
                            "DiT, or a Wan2.2 A14B model's high-noise expert (repeatable)")
        p.add_argument("--lora-2", dest="lora_2", action="append", default=[],
                       metavar="PATH[:STRENGTH]",
                       help="LoRA for a Wan2.2 A14B model's low-noise expert (repeatable)")
        p.add_argument("--weights", choices=["ema", "params"],
                       help="a vdit run's weights to sample: ema (the default) or params")
        p.add_argument("--dtype", choices=["float32", "bfloat16"],
                       help="hold the DiT, text and image encoders' weights and compute in this "
                            "dtype (bfloat16 halves their memory: Wan 14B's DiT ~28 GB instead "
                            "of ~57; the VAE stays float32). Default: a diffusers folder "
                            "float32, a vdit run its config's dtypes with float32 weights")
        p.add_argument("--mesh", metavar="AXIS=SIZE,...",
                       help="shard the weights over a device mesh of axes data/fsdp/tensor/"
                            "sequence (one size may be -1: the rest), e.g. fsdp=4,tensor=2: "
                            "for a model bigger than one chip. Default: one device")


def _load(args):
    from vdit.config import load_config, require_sections

    if not args.config:
        raise ValueError("--config is required (a configs/*.py file)")
    config = load_config(args.config, args.overrides)
    require_sections(config, args.command, args.config)
    cli_checks.check_config(config, args.command)
    return config


def _train_vae(args) -> int:
    from vdit.train.vae_loop import train_vae

    result = train_vae(_load(args), args.workdir)
    print(f"vdit train-vae: held-out PSNR {result['eval_psnr']:.2f} dB; checkpoints in "
          f"{args.workdir}/checkpoints")
    return 0


def _encode(args) -> int:
    from vdit.convert.diffusers_folder import image_parts  # an I2V run's CLIP folders
    from vdit.data.encode import encode_synthetic, owned_shards
    from vdit.runs import latents_dir

    owned_shards(args.num_shards, args.shard, args.num_shards)  # bad flags fail before any load
    config = _load(args)
    out = latents_dir(config, args.workdir)
    source = config.encode.get("source", "synthetic")
    worker = f"worker {args.shard}/{args.num_shards}: " if args.num_shards > 1 else ""
    if source == "synthetic":
        paths = encode_synthetic(config, out, args.shard, args.num_shards, image_parts)
        print(f"vdit encode: {worker}{len(paths)} shards in {runs.absolute(out)}")
        return 0
    from vdit.data.encode_videos import encode_videos

    summary = encode_videos(config, out, shard=args.shard, num_shards=args.num_shards,
                            image_loader=image_parts)
    print(f"vdit encode: {worker}{summary['records']} clips in {len(summary['paths'])} shards in "
          f"{runs.absolute(out)}; skipped {summary['skipped']} videos "
          f"{summary['skipped_by_reason']} (see encode_summary.json)")
    if not summary["complete"]:
        print(f"vdit encode: {summary['shards']} shards in all; encode_summary.json is written "
              "when every worker has finished")
    return 0


def _dry_run(args, config, setup_fn=None) -> int:
    import jax

    from vdit.train import dry_run

    try:  # the CPU backend's device count; no effect on TPU/GPU
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    except RuntimeError:  # JAX already started (e.g. inside tests): its devices are kept
        pass
    return dry_run.run_cli(args, config, setup_fn)


def _train(args) -> int:
    if args.dry_run:
        return _dry_run(args, _load(args))
    from vdit.pipelines.periodic_samples import from_config as periodic_samples
    from vdit.train.loop import train

    history = train(_load(args), args.workdir, samples_fn=periodic_samples)
    if history:
        print(f"vdit train: step {history[-1]['step']}, loss {history[-1]['loss']:.4f}; "
              f"checkpoints in {args.workdir}/checkpoints")
    return 0


def _distill(args) -> int:
    from vdit.distill.setup import abstract_config, abstract_setup, distill

    if args.dry_run:
        return _dry_run(args, abstract_config(_load(args)), abstract_setup)
    history = distill(_load(args), args.workdir)
    if history:
        print(f"vdit distill: step {history[-1]['step']}, loss {history[-1]['loss']:.4f}; "
              f"checkpoints in {args.workdir}/checkpoints; sample it with `vdit sample "
              f"--workdir {args.workdir}`")
    return 0


def _eval(args) -> int:
    from vdit.eval.shapes import eval_shapes_dir, format_table

    prompts = args.prompts
    if prompts is None and args.workdir:
        prompts = _eval_samples(args)
    if prompts is None:
        raise ValueError("give --workdir RUN (a DiT run, or a folder with a samples.jsonl) or "
                         "--prompts FILE (jsonl: file, prompt, color, shape, direction)")
    print(format_table(eval_shapes_dir(args.videos, prompts)["scores"]))
    return 0


def _eval_samples(args) -> str:
    """The samples.jsonl to judge for --workdir: a DiT run (it has checkpoints) samples
    `--samples` held-out prompts into RUN/eval/ first; another folder must hold a samples.jsonl
    (what `make demo` writes)."""
    import ml_collections

    from vdit.eval.shapes_samples import write_samples
    from vdit.pipelines.generate import Generator
    from vdit.train.init_from import run_weights

    workdir = runs.user_path(args.workdir)
    if not runs.checkpoints_dir(workdir).is_dir():
        if runs.samples_jsonl(workdir).is_file():
            return str(runs.samples_jsonl(workdir))
        raise FileNotFoundError(f"--workdir {args.workdir!r} has neither checkpoints/ (a run to "
                                "sample) nor a samples.jsonl to judge")
    params, saved = run_weights(str(workdir), "ema")
    config = ml_collections.ConfigDict(saved)
    gen = Generator.from_params(config, params, str(workdir))
    out = runs.eval_dir(workdir)
    print(f"vdit eval: sampling {args.samples} held-out prompts into {out}")
    return write_samples(gen, config, out, args.samples, batch=args.batch_size)


def _curate(args) -> int:
    from vdit.curate.run import run_cli

    return run_cli(args)


def _sample(args) -> int:
    from vdit.sample_cli import run_cli

    return run_cli(args)


def _plan(args) -> int:
    from vdit.plan import run_cli

    return run_cli(args)


def _export(args) -> int:
    from vdit.convert.export import export_adapter, export_run

    write = export_adapter if args.adapter else export_run
    print(f"vdit export: wrote {write(args.workdir, args.out)}")
    return 0


def _convert(args) -> int:
    from vdit.convert.runs import convert

    written = convert(args.src_format, args.dst_format, args.src, args.out)
    print("vdit convert: wrote " + ", ".join(f"{k} {v}" for k, v in written.items()))
    return 0


def _serve(args) -> int:
    from vdit.serve import run_cli

    return run_cli(args)


HANDLERS = {"train-vae": _train_vae, "encode": _encode, "train": _train, "distill": _distill,
            "sample": _sample,
            "curate": _curate, "eval": _eval, "plan": _plan, "export": _export,
            "convert": _convert, "serve": _serve}


def _handler(command: str):
    """The function that runs `command`; NotBuiltError if this version lacks it."""
    if command in HANDLERS:
        return HANDLERS[command]
    issue = COMMANDS[command][1]
    raise NotBuiltError(f"`vdit {command}` is not built yet in this version of vdit "
                        f"(tracked in issue {issue}); nothing was run")


PATH_FLAGS = ("workdir", "out", "src", "input", "output", "prompts", "videos", "prompt_file",
              "image", "video", "last_image")


def check_paths(args) -> None:
    """Every path flag given: an unsupported scheme or an unreachable bucket fails here, naming
    the flag and the path, before any work starts."""
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and value:
            runs.check_reachable(value, "--" + flag.replace("_", "-"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    problem = cli_checks.config_flag_error(argv, COMMANDS)
    if problem:
        command = next(a for a in argv if not a.startswith("-"))
        print(f"vdit {command}: error: {problem}", file=sys.stderr)
        return cli_errors.EXIT_USAGE
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    # a run folder keeps a log of its errors; sample/plan/curate inputs are not written to
    workdir = args.workdir if args.command in RUN_COMMANDS else None
    try:
        handler = _handler(args.command)
        check_paths(args)
        cli_checks.check_args(args)
        if hasattr(args, "coordinator"):
            from vdit.parallel.distributed import initialize_from_args

            initialize_from_args(args, lambda e: cli_errors.report(args.command, e, False,
                                                                   workdir))
        return int(handler(args) or 0)
    except NotBuiltError as e:
        print(f"vdit: {e}", file=sys.stderr)
        return cli_errors.EXIT_USAGE
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one error path (module doc)
        return cli_errors.report(args.command, e, cli_errors.debug_requested(args), workdir)


if __name__ == "__main__":
    sys.exit(main())
