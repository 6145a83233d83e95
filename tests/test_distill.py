"""`vdit distill`: a few steps on a tiny teacher run are finite and the student's loss falls (the
recipe's "window" target, and the "discrete" one runs); a stopped and resumed distillation equals
an uninterrupted one; the window target follows the teacher's solver on the student's grid; the
jvp's consistency target equals a finite difference; the student's sampler makes exactly `steps`
DiT calls without a CFG pass, and the student run's Generator uses it; a LoRA student through
the Wan recipe (real Wan modules, tiny sizes, the jvp target) distils, checkpoints only its adapter
and exports it as one."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file
from train_testing import TINY, VIDEOS, tiny_config, train_tiny, write_shards, write_vae_run

from vdit import cli
from vdit.config import load_config
from vdit.diffusion import flow
from vdit.diffusion.samplers import make_sampler
from vdit.diffusion.samplers_consistency import ConsistencySampler, consistency_times
from vdit.distill import objective
from vdit.distill.setup import distill, prepare
from vdit.pipelines.generate import Generator
from vdit.runs import checkpoint
from vdit.train import conditioning, run_params
from vdit.train.state import unbox

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _student_config(name: str, teacher: str, *extra: str):
    return load_config(os.path.join(CONFIGS, f"{name}.py"),
                       TINY + [f"--config.distill.teacher={teacher}", *extra])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    latents = write_shards(str(root / "latents"), VIDEOS)
    with open(os.path.join(latents, "stats.json"), "w") as f:
        json.dump({"mean": [0.0] * 8, "std": [1.0] * 8}, f)
    vae = str(root / "vae")
    write_vae_run(vae, tiny_config("shapes_dit", latents))
    run = str(root / "teacher")
    train_tiny("shapes_dit", run, latents, 2, f"--config.encode.vae_workdir={vae}")
    return {"root": root, "run": run, "latents": latents}


# tangent_warmup long: the first steps are (almost) pure guidance distillation, a fixed target
GUIDED = ("--config.distill.tangent_warmup=1000", "--config.optim.lr=1e-3")


def test_distill_is_finite_falls_and_resumes_exactly(teacher):
    root = teacher["root"]
    whole = distill(_student_config("shapes_distill", teacher["run"], *GUIDED), str(root / "a"),
                    stop_after=4)
    losses = [h["loss"] for h in whole]
    assert [h["step"] for h in whole] == [1, 2, 3, 4] and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses

    config = _student_config("shapes_distill", teacher["run"], *GUIDED)
    first = distill(config, str(root / "b"), stop_after=2)
    rest = distill(config, str(root / "b"), stop_after=2)  # resumes from step 2's checkpoint
    assert [h["step"] for h in first + rest] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in first + rest], losses, rtol=1e-5)
    a, _ = checkpoint.load_params(str(root / "a"), "params")
    b, saved = checkpoint.load_params(str(root / "b"), "params")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert set(a) == {"dit"}  # the teacher copy is frozen: never trained nor checkpointed
    # the teacher pinned at the step it had when the student started
    teacher_step = os.path.join(teacher["run"], "checkpoints",
                                str(checkpoint.latest_step(teacher["run"])))
    assert saved["train"]["init_from"] == teacher_step and saved["sample"]["guidance"] == 1.0


def test_discrete_consistency_method_trains(teacher):
    """The bootstrapped LCM-style target ("discrete", one teacher Euler step back) still runs."""
    history = distill(_student_config("shapes_distill", teacher["run"], *GUIDED,
                                      "--config.distill.method=discrete"),
                      str(teacher["root"] / "discrete"), stop_after=2)
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)


def test_student_starts_as_the_teacher_and_samples_in_steps_without_cfg(teacher, monkeypatch):
    root = teacher["root"]
    student = str(root / "a")  # from the test above, or made here when run alone
    if not os.path.isdir(os.path.join(student, "checkpoints")):
        distill(_student_config("shapes_distill", teacher["run"], *GUIDED), student, stop_after=4)
    gen = Generator.from_workdir(student)
    assert isinstance(gen.sampler, ConsistencySampler)
    assert gen.defaults["steps"] == 4 and gen.defaults["guidance"] == 1.0
    batches = []
    apply = type(gen.dit).apply

    def counted(self, *args, **kwargs):
        batches.append(int(args[1].shape[0]))
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(type(gen.dit), "apply", counted)
    with jax.disable_jit():  # the loop runs in Python, one DiT call per step is visible
        gen.generate(["a red circle moving right"], frames=5, height=16, width=16)
    assert batches == [1, 1, 1, 1]  # 4 calls of the prompt's batch alone: no unconditional rows
    # (`vdit sample --workdir STUDENT` itself runs in tests/test_docs.py's README walkthrough)


def test_consistency_target_is_the_derivative_along_the_teacher_flow(teacher):
    """The jvp's dF/dt (tangents v along x and 1 along t, through the DiT and its 1000 t
    timestep scale) equals a central finite difference of the DiT along the same direction."""
    config = prepare(_student_config("shapes_distill", teacher["run"]))
    dit, text_model, _ = run_params.build_models(config)
    params = unbox(run_params.init_params(dit, text_model, config, jax.random.key(0)))["dit"]
    dit = objective.forward_mode_model(dit)  # the objective's jvp model: float32 matmuls
    assert dit.matmul_dtype is None
    s, rng = 8, np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, s, dit.token_out_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    t = jnp.full((1, 1), 0.6)
    pos = jnp.zeros((1, s, 3), jnp.int32).at[0, :, 2].set(jnp.arange(s))
    seg, ctx = jnp.ones((1, s), jnp.int32), jnp.asarray(rng.normal(size=(1, 4, dit.text_dim)))
    batch = {"positions": pos, "segment_ids": seg}

    def f(x, t):
        x_in = conditioning.model_input(dit, x, batch, jax.random.key(0), 0.0, 1)
        return dit.apply({"params": params}, x_in, pos, seg, t * 1000.0, ctx.astype(jnp.float32),
                         jnp.ones((1, 4), jnp.int32), method="packed")

    _, tangent = jax.jvp(f, (x, t), (v, jnp.ones_like(t)))
    h = 1e-4
    fd = (f(x + h * v, t + h) - f(x - h * v, t - h)) / (2 * h)
    np.testing.assert_allclose(tangent, fd, rtol=2e-2, atol=2e-2 * float(jnp.abs(fd).max()))
    assert float(objective.tangent_ramp(50, 100)) == 0.5 and float(objective.tangent_ramp(7, 0)) == 1


def test_consistency_sampler_calls_once_per_step_and_is_exact_for_an_exact_model():
    sampler = make_sampler({"_class_name": "ConsistencySampler", "flow_shift": 2.0, "gamma": 1.0})
    np.testing.assert_allclose(consistency_times(4, 1.0), [1.0, 0.75, 0.5, 0.25])
    x0 = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 4, 4, 8)), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(2).normal(size=x0.shape), jnp.float32)
    calls = []

    def exact(x, timesteps, target):  # the true average velocity to `target` from any x_t
        if not isinstance(timesteps, jax.core.Tracer):  # a type-checking trace is not a call
            calls.append((x.shape[0], float(timesteps[0])))
        t = (timesteps / 1000.0).reshape(-1, 1, 1, 1, 1)
        return (x - target) / t

    with jax.disable_jit():
        out = sampler.sample(exact, noise, 4, x0)
    assert [c[0] for c in calls] == [3] * 4  # batch 3 every call: no doubled CFG batch
    np.testing.assert_allclose([c[1] / 1000 for c in calls], consistency_times(4, 2.0), rtol=1e-6)
    np.testing.assert_allclose(out, x0, atol=1e-5)
    deterministic = ConsistencySampler(2.0, 0.0).sample(exact, noise, 2, x0)
    np.testing.assert_allclose(deterministic, x0, atol=1e-5)
    # per-sample re-noising: a sample's result does not depend on its batch
    noisy = lambda x, ts, target: 0.5 * (x - target) / (ts / 1000.0).reshape(-1, 1, 1, 1, 1)
    both = sampler.sample(noisy, noise, 3, x0)
    alone = sampler.sample(noisy, noise[1:2], 3, x0[1:2])
    np.testing.assert_allclose(both[1:2], alone, atol=1e-5)
    with pytest.raises(ValueError, match="gamma=2"):
        make_sampler({"_class_name": "ConsistencySampler", "gamma": 2})


def test_window_target_follows_the_teacher_solver_on_the_student_grid():
    """The "window" method's grid: every substeps-th point is the student sampler's grid; the
    teacher's solve runs its Euler steps on the fine grid, and the student's rollout its own on
    the coarse grid, per segment, each segment in its own window."""
    config = ml_collections.ConfigDict({
        "sample": {"steps": 4, "scheduler": {"_class_name": "ConsistencySampler",
                                             "flow_shift": 2.0, "gamma": 0.0}},
        "distill": {"teacher_substeps": 3}})
    fine = objective.window_grid(config)
    np.testing.assert_allclose(fine[::3], np.append(consistency_times(4, 2.0), 0.0), rtol=1e-6)
    assert fine.shape == (13,) and np.all(np.diff(np.asarray(fine)) < 0)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    velocity = lambda x, t: jnp.sin(x) * (1.0 + flow.per_token(t, seg)[..., None])
    first = jnp.asarray([[0, 6], [9, 0]], jnp.int32)  # windows 0 and 2; 3 (and unused 0)
    x_end = objective.teacher_solve(velocity, x0, first, fine, 3, seg)
    want = np.asarray(x0)
    for k in range(3):  # the same Euler steps, written per token
        t = np.asarray(flow.per_token(fine[first + k], seg))[..., None]
        t_next = np.asarray(flow.per_token(fine[first + k + 1], seg))[..., None]
        want = want - (t - t_next) * np.sin(want) * (1.0 + t)
    np.testing.assert_allclose(x_end, want, rtol=1e-5, atol=1e-6)
    # window_start "student": the student's own Euler steps on the coarse grid, from noise to
    # each segment's window start (window 0: the noise itself)
    start = objective.student_rollout(velocity, x0, first, fine, 3, seg)
    coarse = np.asarray(fine[::3])
    for row, segment, window in ((0, 1, 0), (0, 2, 2), (1, 1, 3)):
        tokens = np.asarray(seg[row]) == segment
        want = np.asarray(x0[row][tokens])
        for j in range(window):
            want = want - (coarse[j] - coarse[j + 1]) * np.sin(want) * (1.0 + coarse[j])
        np.testing.assert_allclose(start[row][tokens], want, rtol=1e-5, atol=1e-6)


def test_bad_distill_settings_fail_naming_the_key(teacher, tmp_path):
    with pytest.raises(ValueError, match="distill.teacher"):
        distill(_student_config("shapes_distill", ""), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="distill.teacher"):
        distill(_student_config("shapes_distill", str(tmp_path / "nowhere")), str(tmp_path / "y"))
    with pytest.raises(ValueError, match="distill.guidance"):
        prepare(_student_config("shapes_distill", teacher["run"], "--config.distill.guidance=0.0"))
    with pytest.raises(ValueError, match="distill.teacher_substeps"):
        prepare(_student_config("shapes_distill", teacher["run"],
                                "--config.distill.teacher_substeps=0"))
    with pytest.raises(ValueError, match="sample.scheduler.*gamma=0"):
        prepare(_student_config("shapes_distill", teacher["run"],
                                "--config.sample.scheduler.gamma=1.0"))
    # the teacher's latents (and model, text, VAE) unless the recipe names other latents
    assert prepare(_student_config("shapes_distill", teacher["run"])).data.latents_dir == \
        os.path.abspath(teacher["latents"])
    # a two-expert teacher (its low-noise expert was dropped silently): a checkpoint whose config
    # has an experts section is enough to be refused
    moe = load_config(os.path.join(CONFIGS, "shapes_moe.py"), TINY)
    manager = checkpoint.make_manager(str(tmp_path / "moe"), moe.checkpoint, with_data=False)
    checkpoint.save(manager, 1, {"ema": {"dit": np.zeros(1, np.float32)}}, moe)
    manager.wait_until_finished()
    with pytest.raises(ValueError, match="is a two-expert .* run; distillation takes a one-DiT"):
        prepare(_student_config("shapes_distill", str(tmp_path / "moe")))


def test_resume_against_another_teacher_names_the_distill_key(tmp_path):
    # prepare() overwrites train.init_from with distill.teacher: a hint naming the train key
    # could not work
    from vdit.train import init_from
    config = _student_config("shapes_distill", str(tmp_path / "dit/checkpoints/20"))
    config.train.init_from = config.distill.teacher
    saved = {"train": {"init_from": str(tmp_path / "dit/checkpoints/10"),
                       "init_from_weights": "ema"}}
    config.train.init_from_weights = "ema"
    with pytest.raises(ValueError, match=r"resume with --config\.distill\.teacher=.*dit/"
                                         r"checkpoints/10, or") as e:
        init_from.check_resume(saved, config)
    assert "train.init_from" not in str(e.value)


def test_lora_student_through_the_wan_recipe(tmp_path, capsys):
    """configs/wan2_1_t2v_1_3b_distill.py at tiny sizes: the real Wan modules (qk norm, bf16,
    remat), a LoRA student on the frozen teacher, jvp through them; only the adapter trains."""
    latents = write_shards(str(tmp_path / "latents"), VIDEOS)
    # the recipe's Wan text layout at the tiny text length: 32 positions per clip's caption
    wan = ("--config.model.in_channels=8", "--config.model.out_channels=8",
           "--config.data.text_pad_to=32")
    teacher = str(tmp_path / "teacher")  # random weights, written as a run (no training)
    config = tiny_config("wan2_1_t2v_1_3b", latents, *wan, "--config.train.init_from=")
    dit, text_model, _ = run_params.build_models(config)
    weights = unbox(run_params.init_params(dit, text_model, config, jax.random.key(0)))
    checkpoint.write_weights(teacher, 1, weights, weights, config)
    config = _student_config("wan2_1_t2v_1_3b_distill", teacher, *wan,
                             f"--config.data.latents_dir={latents}", "--config.lora.rank=2",
                             "--config.distill.method=continuous")
    history = distill(config, str(tmp_path / "student"), stop_after=2)
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)
    params, saved = checkpoint.load_params(str(tmp_path / "student"), "params")
    assert set(params) == {"lora"} and saved["sample"]["steps"] == 4
    assert ml_collections.ConfigDict(saved).sample.scheduler._class_name == "ConsistencySampler"
    # the student exports as an adapter for its teacher: the EMA factors, by kernel path
    out = str(tmp_path / "adapter")
    assert cli.main(["export", "--workdir", str(tmp_path / "student"), "--out", out,
                     "--adapter"]) == 0
    ema, _ = checkpoint.load_params(str(tmp_path / "student"), "ema")
    written = load_file(os.path.join(out, "adapter.safetensors"))
    want = traverse_util.flatten_dict(ema["lora"], sep="/")
    assert set(written) == set(want) and any(k.endswith("to_q/kernel/a") for k in written)
    for key, value in want.items():
        np.testing.assert_array_equal(written[key], value)
    meta = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert meta["rank"] == 2 and meta["sample"]["steps"] == 4
    assert meta["diffusers"] == {"lora": "pytorch_lora_weights.safetensors"}
    in_diffusers = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(k.endswith(".attn1.to_q.lora_A.weight") for k in in_diffusers)
    assert meta["base"].startswith(os.path.join(teacher, "checkpoints", ""))  # the pinned step
    assert meta["base_weights"] in ("params", "ema")
    # diffusers has no scheduler for the student's step grid: refused, not a folder that fails
    assert cli.main(["convert", "--from", "vdit", "--to", "diffusers", "--src",
                     str(tmp_path / "student"), "--out", str(tmp_path / "diffusers")]) == 1
    assert "few-step student" in capsys.readouterr().err
