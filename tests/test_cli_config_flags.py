"""--config and --config.KEY=VALUE: refused, naming the flag, by the commands that read a run's own
saved config (they ignored them silently); an override written with a space instead of '=' is
named with the fix. Nothing here loads a model: the checks run before argparse."""

import pytest

from vdit import cli, cli_checks


@pytest.mark.parametrize("argv,hint", [
    (["sample", "--workdir", "/nonexistent/run", "--config", "/nonexistent/cfg.py",
      "--config.sample.steps=999", "--prompt", "x", "--out", "s.mp4"], "--steps, --guidance"),
    (["sample", "--workdir", "/nonexistent/run", "--config.sample.steps=999", "--prompt", "x"],
     "--steps, --guidance"),
    (["export", "--workdir", "/nonexistent/run", "--out", "/nonexistent/out",
      "--config.train.steps=1"], "run's own saved config"),
    (["convert", "--src", "/nonexistent/a", "--out", "/nonexistent/b", "--config=c.py"],
     "comes with --src"),
    (["serve", "--workdir", "/nonexistent/run", "--config.sample.steps=3"],
     "run's own saved config"),
    (["eval", "shapes", "--prompts", "/nonexistent/p.jsonl", "--config.x=1"],
     "run's own saved config"),
])
def test_a_command_without_a_config_refuses_config_flags(argv, hint, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    flag = next(a for a in argv if a.startswith("--config")).split("=")[0]
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"vdit {argv[0]}: error: {flag}: "), err
    assert "takes no --config" in err and hint in err, err


def test_an_override_with_a_space_names_the_key_and_the_fix(capsys):
    argv = ["train", "--config", "configs/shapes_dit.py", "--workdir", "/nonexistent/w",
            "--config.train.steps", "3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("vdit train: error: --config.train.steps has no '=': give the value after "
                   "'=', no space: --config.train.steps=3"), err


@pytest.mark.parametrize("command", ["train-vae", "encode", "train", "distill", "plan", "curate"])
def test_commands_that_load_a_recipe_keep_their_config_flags(command):
    extra = {"curate": ["--input", "a", "--output", "b"]}.get(command, ["--workdir", "w"])
    argv = [command, "--config", "configs/shapes_dit.py", *extra, "--config.train.steps=3"]
    assert cli_checks.config_flag_error(argv, cli.COMMANDS) is None
    args = cli.build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    assert args.config == "configs/shapes_dit.py"
