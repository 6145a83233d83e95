"""`vdit train --dry-run`: every Wan-size recipe builds its model, mesh and abstract sharded state
and compiles its real train step on the 8-device fake CPU mesh, at the recipe's own batch shapes
(CPU compile time hardly depends on them: ~15-50 s a recipe on 2 cores, mostly the 40-layer scan
and the frozen 24-layer UMT5), without allocating or reading any weights; a missing section and
a step that does not fit `--hbm-gb` are errors that say what and by how much."""

import json
import os
import re
import textwrap

import pytest

from vdit import cli, plan
from vdit.config import load_config
from vdit.models.dit import build_dit
from vdit.parallel.mesh import logical_rules
from vdit.plan import weights as plan_weights
from vdit.train.dry_run import GIB, dry_run

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
WAN_RECIPES = ["wan2_1_t2v_1_3b", "wan2_1_t2v_14b", "wan2_1_i2v_14b", "stage1_image",
               "stage2_video", "stage3_hq", "wan2_2_t2v_a14b"]
# Wan2.2 recipes without their own dry run here (each costs ~20 s): config and v5p plan checks.
WAN22_RECIPES = {"wan2_2_ti2v_5b": (4.9e9, 5.1e9, 48), "wan2_2_t2v_a14b": (14.2e9, 14.4e9, 16),
                 "wan2_2_i2v_a14b": (14.2e9, 14.4e9, 36)}


def _plan_weights(config):
    """(trainable, frozen) abstract weights as `vdit plan` counts them."""
    return plan_weights.abstract_weights(plan_weights.training_config(config),
                                         build_dit(config.model))


@pytest.mark.slow
@pytest.mark.parametrize("name", WAN_RECIPES)
def test_wan_recipe_dry_run(name):
    config = load_config(os.path.join(CONFIGS, f"{name}.py"))
    report = dry_run(config)
    # The counts agree with the weights `vdit plan` counts.
    trainable, frozen = _plan_weights(config)
    assert report["params"] == plan_weights.param_count(trainable)
    assert report["frozen_params"] == plan_weights.param_count(frozen) > 5e9  # UMT5-XXL, frozen
    assert report["devices"] == 8 and report["mesh"]["fsdp"] == 8
    assert report["tokens_per_row"] == config.data.tokens_per_row
    assert report["data_overrides"] == []
    # Params, EMA and two Adam moments in float32, sharded over the 8 fsdp devices, at least.
    assert report["compiled_bytes_per_device"] >= 16 * report["params"] / 8
    # Forward + backward matmuls: at least 6 FLOPs per parameter per (padded) token.
    tokens = config.data.rows_per_batch * config.data.tokens_per_row
    assert report["flops_per_step"] >= 6 * report["params"] * tokens
    # The frozen low-noise expert is not read by a high-noise step, but it is held on the devices.
    unread = report["unread_input_bytes_per_device"]
    if "experts" in config:
        assert unread >= 4 * 14.2e9 / 8 and report["compiled_bytes_per_device"] >= unread
    else:
        assert unread < 0.01 * report["compiled_bytes_per_device"]
    if name == "wan2_1_i2v_14b":  # the image branch: per-block k/v projections of CLIP tokens
        assert report["params"] > 16e9 and config.model.in_channels == 36


@pytest.mark.parametrize("name", sorted(WAN22_RECIPES))
def test_wan22_recipe_loads_and_plans_on_v5p(name):
    """Published sizes; the analytic parameter/optimizer bytes on a v5p-64 slice (32 chips,
    sequence 4) leave room for activations in 95 GiB (the full plan adds a proxy compile)."""
    low, high, channels = WAN22_RECIPES[name]
    config = plan_weights.training_config(load_config(os.path.join(CONFIGS, f"{name}.py"),
                                              ["--config.mesh.sequence=4"]))
    dit = build_dit(config.model)
    assert dit.in_channels == channels and dit.out_channels == config.vae.z_dim
    sizes, counts = plan_weights.analytic_bytes(config, dit, plan.mesh_sizes(config, 32),
                                        logical_rules("dit"))
    assert low < counts["trainable"] < high
    assert sum(sizes.values()) < 0.5 * 95 * GIB
    stride = config.vae.scale_factor_spatial * dit.patch_size[1]
    assert config.data.height % stride == 0 and config.data.width % stride == 0
    if "a14b" in name:
        assert 0 < config.experts.boundary_ratio < 1 and "guidance_2" in config.sample
    else:
        assert config.vae.is_residual and config.sample.expand_timesteps


def test_cli_dry_run_prints_one_json_line_and_checks_hbm(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    args = ["train", "--config", os.path.join(CONFIGS, "shapes_dit.py"), "--workdir", workdir,
            "--dry-run", "--config.data.rows_per_batch=8"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    assert report["data_overrides"] == ["--config.data.rows_per_batch=8"]
    assert report["rows_per_batch"] == 8 and "fits" not in report
    assert not os.path.exists(workdir)  # nothing written
    hbm = report["compiled_bytes_per_device"] / GIB / 2
    assert cli.main(args + ["--hbm-gb", str(hbm)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fits"] is False
    over = report["compiled_bytes_per_device"] / GIB - hbm
    assert f"{over:.2f} GiB more than --hbm-gb" in captured.err
    assert cli.main(args + ["--hbm-gb", str(4 * hbm)]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    # A run with nothing frozen (the text encoder trained too) has no frozen inputs to count;
    # a pod recipe's TPU kernel compiles here as XLA attention, said in the report.
    assert cli.main(args + ["--config.text.trainable=True", "--config.model.attention=splash"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frozen_params"] == 0 and report["attention"] == "xla"
    # training for real on this machine refuses that kernel at start-up, naming the key
    args[args.index("--dry-run")] = "--config.model.attention=splash"
    assert cli.main(args) == 1
    assert "attention backend 'splash' (config.model.attention) needs a TPU" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--config.mesh.data=2", "--config.mesh.tensor=4"],  # the DiT's 6 heads over 4
     r"\['dit'\]\['blocks'\].* has 6 along 'heads' \(model.num_attention_heads\), split 4 ways "
     r"by config.mesh.tensor=4"),
    (["--config.mesh.data=1", "--config.mesh.tensor=8", "--config.model.num_attention_heads=8",
      "--config.text.num_heads=2"],  # a DiT that fits, a text encoder that does not
     r"\['text'\].* has 2 along 'heads' \(text.num_heads\), split 8 ways by config.mesh.tensor=8"),
    (["--config.data.rows_per_batch=3"], r"'data.rows_per_batch' = 3 does not divide"),
])
def test_meshes_that_do_not_divide_the_model_are_named(tmp_path, capsys, flags, message):
    args = ["train", "--config", os.path.join(CONFIGS, "shapes_dit.py"), "--workdir",
            str(tmp_path / "run"), "--dry-run", *flags]
    assert cli.main(args) == 1
    assert re.search(message, capsys.readouterr().err)


def test_missing_section_names_it_and_the_command(tmp_path, capsys):
    path = tmp_path / "bare.py"
    path.write_text(textwrap.dedent("""
        from vdit.config import recipe
        def get_config():
            config = recipe("wan2_1_t2v_14b")
            del config["optim"], config["checkpoint"], config["encode"]
            return config
    """))
    assert cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "w"),
                     "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "no 'optim', 'checkpoint' sections, which `vdit train` needs" in err
    assert cli.main(["encode", "--config", str(path), "--workdir", str(tmp_path / "w")]) == 1
    assert "no 'encode' section, which `vdit encode` needs" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_distill_recipe_dry_run_compiles_the_lora_student(tmp_path, capsys):
    """`vdit distill --dry-run` on the Wan2.1-1.3B distill recipe: the LoRA student's consistency
    step through the real Wan modules and the frozen UMT5 compiles; no teacher run is read."""
    workdir = str(tmp_path / "student")
    assert cli.main(["distill", "--config", os.path.join(CONFIGS, "wan2_1_t2v_1_3b_distill.py"),
                     "--workdir", workdir, "--dry-run", "--config.data.rows_per_batch=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = load_config(os.path.join(CONFIGS, "wan2_1_t2v_1_3b_distill.py"))
    trainable, frozen = _plan_weights(config)
    assert report["params"] == plan_weights.param_count(trainable) < 0.1e9  # rank-64 adapters only
    assert report["frozen_params"] > 1.3e9 + 5e9  # the frozen base DiT (the teacher) and UMT5
    assert report["devices"] == 8 and report["data_overrides"] == ["--config.data.rows_per_batch=8"]
    assert not os.path.exists(workdir)
