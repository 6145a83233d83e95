"""Stage recipes and `train.init_from`: every stage config loads and validates, later stages start
from the previous stage's weights, and init_from refuses weights that do not fit."""

import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from train_testing import IMAGES, VIDEOS, tiny_config, train_tiny, write_shards

from vdit.config import load_config, spatial_stride
from vdit.data import encode
from vdit.diffusion import flow
from vdit.runs import checkpoint
from vdit.train import init_from, loop, optim, run_params
from vdit.train.state import create_sharded, create_state, unbox

CHAINS = {"wan": ["stage1_image", "stage2_video", "stage3_hq"],
          "shapes": ["shapes_stage1_image", "shapes_stage2_video", "shapes_stage3_hq"]}
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _tokens(shape, config) -> int:
    frames, height, width = shape
    stride = spatial_stride(config)
    return (1 + (frames - 1) // 4) * (height // stride) * (width // stride)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_stage_configs_load_validate_and_chain(chain):
    configs = [load_config(os.path.join(CONFIGS, f"{name}.py")) for name in CHAINS[chain]]
    assert all(shape[0] == 1 for shape in configs[0].encode.shapes)  # stage 1: images only
    assert any(shape[0] > 1 for shape in configs[1].encode.shapes)
    assert any(shape[0] == 1 for shape in configs[1].encode.shapes)  # stage 2 keeps images
    assert max(s[1] * s[2] for s in configs[2].encode.shapes) > max(
        s[1] * s[2] for s in configs[1].encode.shapes)  # stage 3: higher resolution
    for previous, config in zip(CHAINS[chain], configs[1:]):
        assert config.train.init_from == f"runs/{previous}"
    for config in configs:
        shapes = lambda c: {k: v for k, v in c.model.to_dict().items() if k != "remat"}
        assert shapes(config) == shapes(configs[0])  # init_from needs the same tensors
        assert config.text.to_dict() == configs[0].text.to_dict()
        assert not config.lora.enabled
        for shape in config.encode.shapes:
            assert _tokens(shape, config) <= config.data.tokens_per_row, shape


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(CONFIGS) if f.startswith("shapes_") and f != "shapes_vae.py"))
def test_shapes_recipes_sample_at_their_training_shift(name):
    """The sampler's flow_shift is the resolution shift the recipe trains a clip of the sample's
    size at (Wan's recipes keep Wan's published sampling shifts instead)."""
    config = load_config(os.path.join(CONFIGS, f"{name}.py"))
    scheduler = config.sample.scheduler
    if "flow_shift" not in scheduler:
        pytest.skip(f"{scheduler['_class_name']} has no flow_shift")
    size = (config.sample.frames, config.sample.height, config.sample.width)
    trained = float(flow.resolution_shift(_tokens(size, config), config.flow))
    assert scheduler.flow_shift == pytest.approx(trained, abs=0.01)


def test_init_from_paths(tmp_path):
    (tmp_path / "run" / "checkpoints" / "7").mkdir(parents=True)
    run = str(tmp_path / "run")
    assert init_from.resolve(run) == (run, None)
    assert init_from.resolve(os.path.join(run, "checkpoints", "7")) == (run, 7)
    with pytest.raises(FileNotFoundError, match=r"step folder .*/checkpoints/9"):
        init_from.resolve(os.path.join(run, "checkpoints", "9"))
    nowhere = str(tmp_path / "nowhere")
    config = tiny_config("shapes_stage2_video", nowhere, f"--config.train.init_from={nowhere}")
    with pytest.raises(FileNotFoundError, match=r"'train\.init_from' = .*nowhere.*no checkpoints/"):
        init_from.source_weights(config)
    config.train.init_from_weights = "best"
    with pytest.raises(ValueError, match=r"'train\.init_from_weights' = 'best'"):
        init_from.checked(config)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    images = write_shards(str(root / "images"), IMAGES)
    videos = write_shards(str(root / "videos"), VIDEOS, seed=1)
    workdir = str(root / "stage1")
    history = train_tiny("shapes_stage1_image", workdir, images, 2)
    return {"root": root, "workdir": workdir, "videos": videos, "history": history}


def _fresh_state(config):
    """The state and frozen weights `train` creates before init_from, and their shardings."""
    mesh_rules = (loop.mesh_from_config(config.mesh), loop.logical_rules("dit"))
    dit, text_model, _ = run_params.build_models(config)
    boxed = lambda r: run_params.init_params(dit, text_model, config, r)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    rng = jax.random.key(config.train.seed)
    state, shardings = create_state(lambda r: run_params.split_trainable(config, boxed(r))[0], tx, rng,
                                    *mesh_rules)
    frozen, frozen_shardings = create_sharded(lambda r: run_params.split_trainable(config, boxed(r))[1],
                                              rng, *mesh_rules)
    return state, shardings, frozen, frozen_shardings


def test_init_from_places_the_source_weights_exactly(stage1):
    config = tiny_config("shapes_stage2_video", stage1["videos"], "--config.train.seed=1",
                         "--config.text.trainable=False",
                         f"--config.train.init_from={stage1['workdir']}")
    source, _ = init_from.run_weights(stage1["workdir"], "params")
    state, shardings, frozen, frozen_shardings = _fresh_state(config)
    before = jax.device_get(state.params)
    assert not np.allclose(before["dit"]["proj_out"]["kernel"], source["dit"]["proj_out"]["kernel"])
    resumed, resumed_frozen = init_from.apply(config, state, shardings, frozen, frozen_shardings,
                                              resuming=True)
    # Resuming: the checkpoint wins for trainable weights; frozen ones still come from the source.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), before)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed_frozen), {"text": source["text"]})
    state, frozen = init_from.apply(config, state, shardings, frozen, frozen_shardings, False)
    for tree in (state.params, state.ema):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), {"dit": source["dit"]})
    assert int(state.step) == 0
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, state.params,
                                            shardings.params)))


def test_stage_chain_starts_from_previous_stage(stage1, monkeypatch):
    lr = 3e-3  # TINY's
    workdir = str(stage1["root"] / "stage2")
    reads, reader = [], checkpoint._reader

    def counted(run, which):  # every weights read of a run's checkpoint step, by (run, step)
        manager, read = reader(run, which)
        return manager, lambda step: (reads.append((run, step)), read(step))[1]

    monkeypatch.setattr(checkpoint, "_reader", counted)
    history = train_tiny("shapes_stage2_video", workdir, stage1["videos"], 2,
                         "--config.train.seed=1", f"--config.train.init_from={stage1['workdir']}")
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    # Pinning the source's newest readable step reads it; the run then uses that read.
    assert [r for r in reads if os.path.abspath(r[0]) == os.path.abspath(stage1["workdir"])] == \
        [(os.path.abspath(stage1["workdir"]), 2)]
    monkeypatch.undo()
    start, _ = init_from.run_weights(stage1["workdir"], "params")
    after, saved = checkpoint.load_params(workdir, "params")
    assert saved["train"]["init_from"] == os.path.join(os.path.abspath(stage1["workdir"]),
                                                       "checkpoints", "2")  # pinned at start
    # Two Adam steps move each trained weight by at most ~2 lr; a fresh (seed 1) init is far away.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), after,
                                         {k: start[k] for k in after}))
    assert max(moved) < 3 * lr
    # What stage 2 does not train (the frozen text encoder) is stage 1's, not a fresh seed's.
    frozen = sorted(set(start) - set(after))
    complete, _ = init_from.run_weights(workdir, "params")
    for key in frozen:
        jax.tree.map(np.testing.assert_array_equal, complete[key], start[key])
    fresh = _fresh_state(tiny_config("shapes_stage2_video", stage1["videos"],
                                     "--config.train.seed=1"))[0].params
    gap = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - b)), fresh,
                       {k: start[k] for k in fresh})
    assert gap["dit"]["blocks"]["ffn"]["linear_1"]["kernel"] > 30 * lr
    # Resuming keeps the frozen weights it trained against: another init_from, none, other
    # weights, or the recipe's relative path read from another directory are refused by name.
    for extra, message in (([], r"train\.init_from: checkpoint '.*checkpoints/2' -> now ''"),
                           ([f"--config.train.init_from={stage1['workdir']}",
                             "--config.train.init_from_weights=ema"],
                            r"init_from_weights: checkpoint 'params' -> now 'ema'.*resume with "
                            r"--config\.train\.init_from_weights=params"),
                           (["--config.train.init_from=runs/elsewhere"],
                            r"-> now '.*runs/elsewhere'.*resume with --config\.train\.init_from=/")):
        with pytest.raises(ValueError, match=message):
            train_tiny("shapes_stage2_video", workdir, stage1["videos"], 2,
                       "--config.train.seed=1", "--config.train.init_from=", *extra)
    # a pinned step that no longer reads is named with the steps there are
    folder = os.path.join(stage1["workdir"], "checkpoints", "2")
    with pytest.raises(ValueError, match=r"checkpoints/2 cannot be read .*Expecting value.*"
                                         r"steps there: none"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(checkpoint.ocp.CheckpointManager, "restore",
                          lambda *a, **k: (_ for _ in ()).throw(ValueError("Expecting value")))
            init_from.run_weights(folder, "params")


def test_init_from_refuses_other_shapes(stage1):
    config = tiny_config("shapes_stage2_video", stage1["videos"], "--config.model.ffn_dim=64",
                         f"--config.train.init_from={stage1['workdir']}")
    dit, text_model, _ = run_params.build_models(config)
    params = jax.eval_shape(lambda r: unbox(run_params.init_params(dit, text_model, config, r)),
                            jax.random.key(0))  # the new run's (abstract) trainable weights
    with pytest.raises(ValueError, match=r"train\.init_from.*blocks/ffn/linear_1/kernel: .*"
                                         r"\(1, 16, 32\), this run needs \(1, 16, 64\)"):
        init_from.apply(config, SimpleNamespace(params=params), None, {}, None, resuming=False)


def test_later_stages_keep_stage_one_latent_normalisation(tmp_path):
    """Stages 2 and 3 encode with stage 1's latent statistics (encode.stats_from): the weights
    they start from were trained on latents normalised that way."""
    for name in CHAINS["shapes"][1:]:
        config = load_config(os.path.join(CONFIGS, f"{name}.py"))
        assert config.encode.stats_from == "runs/shapes_stage1_image/latents"
    source = tmp_path / "stage1_latents"
    source.mkdir()
    (source / "stats.json").write_text(json.dumps({"mean": [0.5, -1.0], "std": [2.0, 0.25]}))
    config.encode.stats_from = str(source)
    tokenizer = SimpleNamespace(fingerprint=lambda: "t")
    mean, std = encode.resolve_stats(config, str(tmp_path / "stage2"), lambda: pytest.fail(
        "measured although stats_from is set"), tokenizer)
    np.testing.assert_array_equal(mean, [0.5, -1.0])
    np.testing.assert_array_equal(std, [2.0, 0.25])
    config.encode.stats_from = str(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="config key 'encode.stats_from'"):
        encode.resolve_stats(config, str(tmp_path / "stage3"), lambda: None, tokenizer)


def test_init_from_warns_when_its_latents_differ(tmp_path, caplog):
    """Shapes match whatever VAE or normalisation made the latents, so a stage encoded with other
    statistics or another VAE than the run it starts from was silent."""
    source, ours = tmp_path / "stage1", tmp_path / "stage2" / "latents"
    for folder, mean in ((source / "latents", [0.5, -1.0]), (ours, [0.5, -1.0])):
        folder.mkdir(parents=True)
        (folder / "stats.json").write_text(json.dumps({"mean": mean, "std": [2.0, 0.25]}))
    config = tiny_config("shapes_stage2_video", str(ours), f"--config.train.init_from={source}",
                         f"--config.encode.vae_workdir={tmp_path / 'vae'}")
    saved = {"encode": {"vae_workdir": str(tmp_path / "vae")}, "data": {}}
    with caplog.at_level("WARNING"):
        init_from.check_latent_space(config, saved, str(ours))
    assert not caplog.records
    (ours / "stats.json").write_text(json.dumps({"mean": [0.5, -0.9], "std": [2.0, 0.25]}))
    saved["encode"]["vae_workdir"] = str(tmp_path / "other_vae")
    with caplog.at_level("WARNING"):
        init_from.check_latent_space(config, saved, str(ours))
    (record,) = caplog.records
    assert "other_vae" in record.message and "'encode.vae_workdir'" in record.message
    assert "latent mean [0.5, -1.0]" in record.message and "[0.5, -0.9]" in record.message
    assert f"--config.encode.stats_from={source / 'latents'}" in record.message

