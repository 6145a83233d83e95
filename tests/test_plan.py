"""`vdit plan`: per-device memory from abstract shapes. The analytic bytes equal the compiled train
step's argument bytes and the total its memory_analysis() on a mesh that exists here; Wan2.1 14B at
720p x 81 frames plans for 256 devices without allocating the model."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from vdit import plan
from vdit.config import load_config
from vdit.data import pipeline
from vdit.models.dit import build_dit
from vdit.parallel.mesh import logical_rules, make_mesh
from vdit.plan import proxy
from vdit.plan import weights as plan_weights
from vdit.train import experts, loop, optim, run_params
from vdit.train.state import abstract_sharded, abstract_state
from vdit.train.step import make_train_step

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
WAN14B = os.path.join(CONFIGS, "wan2_1_t2v_14b.py")
TINY = ["--config.model.num_layers=4", "--config.model.num_attention_heads=2",
        "--config.model.attention_head_dim=8", "--config.model.ffn_dim=32",
        "--config.model.text_dim=16", "--config.model.freq_dim=16", "--config.text.d_model=16",
        "--config.text.d_kv=8", "--config.text.d_ff=32", "--config.text.num_layers=1",
        "--config.text.num_heads=2", "--config.text.max_length=32",
        "--config.text.trainable=False", "--config.data.text_format=embeddings",
        "--config.data.tokens_per_row=64",
        "--config.data.text_per_row=32", "--config.data.rows_per_batch=8",
        "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.sequence=2"]
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled_step_memory(config):
    """memory_analysis() of the trainer's step (its shardings, donated state) on 8 devices."""
    mesh = make_mesh({k: v for k, v in config.mesh.items() if k != "rules"})
    rules = logical_rules("dit")
    dit, text_model, _ = run_params.build_models(config)
    boxed = lambda r: run_params.init_params(dit, text_model, config, r)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    trainable = lambda r: run_params.split_trainable(config, boxed(r))[0]
    frozen = lambda r: run_params.split_trainable(config, boxed(r))[1]
    # Abstract state and frozen weights, with the trainer's own shardings.
    state, sh = abstract_state(jax.eval_shape(trainable, jax.random.key(0)), tx,
                               jax.random.key(0), mesh, rules)
    fixed, fsh = abstract_sharded(frozen, jax.random.key(0), mesh, rules)
    step = make_train_step(experts.make_loss(dit, text_model, config), tx, config.train.ema_decay)
    jitted = jax.jit(step, in_shardings=(sh, fsh, pipeline.batch_sharding(mesh)),
                     out_shardings=(sh, None), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jitted.lower(state, fixed, loop.batch_spec(config, dit, dit.text_dim))
    return lowered.compile(compiler_options=FAST).memory_analysis()


@pytest.mark.parametrize("recipe, extra", [
    ("shapes_dit.py", []),
    # two experts trained on half the rows each (the proxy differentiated one over all rows),
    # micro-conditioning values in the batch (the plan's own batch lacked them: a KeyError, as
    # for Wan2.1 I2V's image tokens)
    ("shapes_moe.py", ["--config.experts.train=both",
                       "--config.model.micro_conditioning=['fps']"]),
])
def test_plan_matches_the_compiled_step(recipe, extra):
    config = load_config(os.path.join(CONFIGS, recipe), TINY + extra)
    # Both sides use the fused-kernel stand-in, so the comparison checks the method itself
    # (sharding arithmetic, proxy mesh, layer extrapolation, update ratio), not the CPU kernel.
    config.model.attention = "memory_proxy"
    problem = plan.Problem(rows=8, tokens=64, text_len=32)
    got = plan.plan_memory(config, 8, problem)
    real = _compiled_step_memory(config)
    analytic = sum(got.bytes[k] for k in ("parameters", "ema", "optimizer", "frozen weights",
                                          "batch"))
    assert analytic == pytest.approx(real.argument_size_in_bytes, rel=5e-3)
    want = real.argument_size_in_bytes + real.temp_size_in_bytes
    assert got.total == pytest.approx(want, rel=0.05), (got.bytes, want)
    assert got.proxy["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}


def test_wan14b_720p_on_256_devices(capsys):
    # README's plan line (tests/test_docs.py runs it too; the proxies compile once per session)
    rc = plan.main(["--config", WAN14B, "--devices", "256", "--rows", "64", "--frames", "81",
                    "--size", "720x1280", "--hbm-gb", "95", "--config.mesh.sequence=4", "--json"])
    assert rc == 0
    text, line = capsys.readouterr().out.rsplit("\n", 2)[-3:-1]
    result = json.loads(line)
    print(text)
    assert result["problem"]["tokens"] == 21 * 45 * 80  # 81 frames -> 21 latent, 720/16 x 1280/16
    assert result["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1, "sequence": 4}
    assert 14.0e9 < result["counts"]["trainable"] < 14.5e9
    per_device = result["counts"]["trainable"] * 4 / 64
    assert per_device < result["bytes"]["parameters"] < 1.15 * per_device  # + replicated norms
    assert result["bytes"]["optimizer"] == pytest.approx(2 * result["bytes"]["parameters"],
                                                         rel=1e-3)
    assert 5 * 2 ** 30 < result["bytes"]["activations"] < 90 * 2 ** 30
    assert result["fits"] is (result["total"] <= 95 * 2 ** 30)


def test_analytic_bytes_scale_with_the_mesh():
    config = plan_weights.training_config(load_config(WAN14B))
    dit = build_dit(config.model)
    rules = logical_rules("dit")
    small, counts = plan_weights.analytic_bytes(config, dit, plan.mesh_sizes(config, 64), rules)
    big, _ = plan_weights.analytic_bytes(config, dit, plan.mesh_sizes(config, 1024), rules)
    replicated = (16 * big["parameters"] - small["parameters"]) / 15  # bytes no axis splits
    assert 0 < replicated < 0.01 * counts["trainable"] * 4
    assert plan.tokens_per_row(config, 81, 480, 832) == 21 * 30 * 52
    assert plan.tokens_per_row(config, 1, 720, 1280) == 45 * 80


@pytest.mark.parametrize("argv,message", [
    (["--frames", "80", "--size", "720x1280"], "frames must be 1\\+4k"),
    (["--frames", "81", "--size", "720x1000"], "multiple of 16"),
    (["--frames", "81"], "give both --frames and --size"),
    (["--size", "720by1280", "--frames", "81"], "expected HEIGHTxWIDTH"),
    (["--tokens", "1000", "--rows", "3"], "rows_per_batch = 3 does not divide over data x fsdp"),
    (["--tokens", "1001", "--config.mesh.sequence=8"], "1001 tokens per row do not divide"),
    (["--tokens", "1024", "--config.mesh.sequence=16"], "only 8 devices are here"),
    (["--tokens", "1024", "--proxy-layers", "3,2"], "two increasing positive counts"),
    (["--tokens", "0"], "--tokens 0: expected a count >= 1"),
    (["--tokens", "1024", "--rows", "-8"], "--rows -8: expected a count >= 1"),
    (["--tokens", "1024", "--frames", "81", "--size", "720x1280"], "not both"),
    (["--config.data.rows_per_batch=12"], "rows_per_batch = 12 does not divide over data x "
                                           "fsdp = 256"),
])
def test_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        plan.main(["--config", WAN14B, "--devices", "256", "--config.data.rows_per_batch=256",
                   *argv])


def test_verdict_line():
    fake = plan.MemoryPlan(8, {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1},
                           plan.Problem(8, 64, 32), {"parameters": 3 * 2 ** 30,
                                                     "activations": 2 ** 30}, {"trainable": 1,
                                                                               "frozen": 0},
                           {"mesh": {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1},
                            "rows": 8, "temp": {}, "per_layer": 0.0, "update_ratio": 1.0})
    assert "does NOT fit in 2 GiB per device (200% used)" in plan.format_plan(fake, "x", 2)
    assert "fits in 8 GiB per device (50% used)" in plan.format_plan(fake, "x", 8)
    assert np.isclose(fake.total, 4 * 2 ** 30)


def test_a_recipe_without_a_text_section_is_refused(tmp_path):
    """The plan builds the weights the trainer builds, the text encoder among them."""
    path = tmp_path / "no_text.py"
    path.write_text("from vdit.config import recipe\n\n\ndef get_config():\n"
                    "    config = recipe('shapes_dit')\n    del config['text']\n    return config\n")
    with pytest.raises(ValueError, match="no 'text' section, which `vdit plan` needs"):
        plan.main(["--config", str(path), "--tokens", "64"])


def test_a_distill_recipe_is_said_to_be_planned_as_plain_training(capsys):
    assert plan.main(["--config", os.path.join(CONFIGS, "shapes_distill.py"), "--devices", "8",
                      *TINY]) == 0
    assert "note: a distill recipe is planned as training its student" in capsys.readouterr().out


def test_the_proxy_device_error_names_the_flag_that_fixes_it():
    with pytest.raises(ValueError, match=r"pass --proxy-devices N \(N >= tensor x sequence = 16"):
        proxy.proxy_mesh_sizes({"data": 1, "fsdp": 1, "tensor": 4, "sequence": 4}, 8)


def test_one_divisibility_error_names_the_dit_and_the_text_encoder():
    """The frozen text encoder and the trainable DiT are checked together, so the error lists both
    trees' failing parts (it named only the first tree checked)."""
    with pytest.raises(ValueError, match="does not divide the model") as error:
        plan.main(["--config", os.path.join(CONFIGS, "shapes_dit.py"), "--devices", "16", *TINY,
                   "--config.data.text_format=ids", "--config.mesh.sequence=1",
                   "--config.mesh.tensor=4"])
    assert "['dit']" in str(error.value) and "['text']" in str(error.value), error.value
