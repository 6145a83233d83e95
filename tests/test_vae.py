"""WanVAE against diffusers' AutoencoderKLWan on random weights, chunked vs whole-clip processing,
spatial tiling, input/config errors, and gradients through a jitted loss."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from vae_reference import (
    CONFIGS,
    FAST_COMPILE,
    decode,
    encode,
    from_torch,
    reference_vae,
    rel_err,
    state_tensors,
    to_torch,
)

from vdit.convert.wan_vae import params_from_torch, params_to_torch
from vdit.models.vae import (
    WanVAE,
    denormalize_latents,
    init_params,
    kl_divergence,
    normalize_latents,
    sample_posterior,
)
from vdit.models.vae_config import diffusers_config, vae_from_config
from vdit.parallel.mesh import logical_rules, make_mesh

TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    """name -> (diffusers reference, our module, our params converted from the reference)."""
    out = {}
    for name in CONFIGS:
        ref = reference_vae(name)
        vae = vae_from_config(dict(ref.config))
        out[name] = (ref, vae, params_from_torch(vae, state_tensors(ref), name))
    return out


# Non-square frames, a multiple of each layout's spatial factor.
SIZES = {"wan": (16, 24), "custom": (16, 24), "wan22": (32, 48)}


# Every clip length on Wan's layout; the first-chunk-only and longer cases on the others
# (each case compiles encode and decode: keep the list short).
@pytest.mark.parametrize("name, frames", [("wan", 1), ("wan", 5), ("wan", 9), ("wan", 17),
                                          ("custom", 1), ("custom", 17),
                                          ("wan22", 1), ("wan22", 9)])
def test_encode_and_decode_match_diffusers(models, name, frames):
    ref, vae, params = models[name]
    rng = np.random.default_rng(frames)
    video = rng.uniform(-1, 1, (2, frames, *SIZES[name], 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(to_torch(video)).latent_dist
    mean, logvar = encode(vae, params, video)
    assert rel_err(mean, from_torch(dist.mean)) < TOL
    assert rel_err(logvar, from_torch(dist.logvar)) < TOL

    latents = rng.standard_normal(mean.shape).astype(np.float32)
    with torch.no_grad():
        want = from_torch(ref.decode(to_torch(latents)).sample)
    got = decode(vae, params, latents)
    assert got.shape == (2, frames, *SIZES[name], 3)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("name", ["wan", "wan22"])
def test_chunked_equals_whole_clip(models, name):
    """Chunked (scan, per-frame 2D conv taps) against whole-clip (one call, native 3D convs)."""
    _, vae, params = models[name]
    whole_vae = vae.clone(conv_impl="native")
    rng = np.random.default_rng(0)
    # shapes as above: the chunked runs reuse those compilations
    video = rng.uniform(-1, 1, (2, 9, *SIZES[name], 3)).astype(np.float32)
    chunked, whole = encode(vae, params, video, True), encode(whole_vae, params, video, False)
    for a, b in zip(chunked, whole):
        assert rel_err(a, b) < 1e-5
    latents = rng.standard_normal(chunked[0].shape).astype(np.float32)
    assert rel_err(decode(vae, params, latents, True),
                   decode(whole_vae, params, latents, False)) < 1e-5


# One row of tiles (stride = tile in height), overlapping columns: 16x40 frames -> 4 tiles.
TILES = dict(tile_sample_min_height=16, tile_sample_stride_height=16,
             tile_sample_min_width=16, tile_sample_stride_width=12)


def _local_weights(params):
    """Spatially local weights: 3x3 conv taps only at the centre, attention output off. Tiles
    then see what the whole frame sees except near their edges."""
    def fix(path, x):
        names = [p.key for p in path]
        if names[-1] == "kernel" and x.ndim == 5 and x.shape[1] == 3:
            x = np.zeros_like(x) + np.pad(x[:, 1:2, 1:2], ((0, 0), (1, 1), (1, 1), (0, 0),
                                                            (0, 0)))
        if "proj" in names:
            x = np.zeros_like(x)
        return x
    return jax.tree_util.tree_map_with_path(fix, params)


def _run_reference(ref, video, tiles):
    if tiles:
        ref.enable_tiling(**tiles)
    try:
        with torch.no_grad():
            dist = ref.encode(to_torch(video)).latent_dist
            return dist, from_torch(ref.decode(dist.mean).sample)
    finally:
        ref.use_tiling = False


def test_tiling_matches_diffusers_and_stays_close_to_untiled(models):
    ref, vae, params = models["custom"]
    tiled = vae.clone(use_tiling=True, **TILES)
    # one frame: tiling is spatial, and each distinct tile shape compiles the whole coder
    video = np.random.default_rng(1).uniform(-1, 1, (1, 1, 16, 40, 3)).astype(np.float32)
    dist, want = _run_reference(ref, video, TILES)
    mean, logvar = encode(tiled, params, video)
    assert rel_err(mean, from_torch(dist.mean)) < TOL
    assert rel_err(logvar, from_torch(dist.logvar)) < TOL
    assert rel_err(decode(tiled, params, mean), want) < TOL

    # with local weights, tiled output is close to the untiled one (diffusers' untiled run)
    local = _local_weights(params)
    local_ref = reference_vae("custom")
    local_ref.load_state_dict({k: torch.from_numpy(v) for k, v in
                               params_to_torch(vae, local).items()})
    dist, want = _run_reference(local_ref, video, None)
    mean, _ = encode(tiled, local, video)
    assert rel_err(mean, from_torch(dist.mean)) < 0.1
    assert rel_err(decode(tiled, local, from_torch(dist.mean)), want) < 0.1


def test_wan22_tiling_matches_diffusers(models):
    """Wan2.2 tiles: encode tiles are cut from the patched frames, decode tiles sized by the full
    16x factor (diffusers' conventions); two overlapping columns of tiles each way."""
    ref, vae, params = models["wan22"]
    tiles = dict(tile_sample_min_height=32, tile_sample_stride_height=32,
                 tile_sample_min_width=32, tile_sample_stride_width=16)
    tiled = vae.clone(use_tiling=True, **tiles)
    video = np.random.default_rng(1).uniform(-1, 1, (1, 1, 32, 64, 3)).astype(np.float32)
    dist, want = _run_reference(ref, video, tiles)
    mean, logvar = encode(tiled, params, video)
    assert rel_err(mean, from_torch(dist.mean)) < TOL
    assert rel_err(logvar, from_torch(dist.logvar)) < TOL
    assert rel_err(decode(tiled, params, from_torch(dist.mean)), want) < TOL


def _shape_of(vae, method, shape, dtype=jnp.float32):
    params = jax.eval_shape(lambda v: vae.init(jax.random.key(0), v),
                            jax.ShapeDtypeStruct((1, 1, 8, 8, 3), jnp.float32))["params"]
    return jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method=method),
                          flax.core.meta.unbox(params), jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("method, shape, message, dtype", [
    ("encode", (1, 6, 16, 16, 3), "1 \\+ 4k frames .* nearest valid: 5 or 9", jnp.float32),
    ("encode", (1, 5, 12, 16, 3), "multiple of the VAE's spatial factor 8", jnp.float32),
    ("encode", (1, 5, 16, 16, 4), "in_channels=3", jnp.float32),
    ("encode", (5, 16, 16, 3), r"\[B, T, H, W, C\]", jnp.float32),
    ("encode", (1, 5, 16, 16, 3), r"float pixels in \[-1, 1\], got dtype uint8", jnp.uint8),
    ("decode", (1, 2, 2, 2, 5), "z_dim=4", jnp.float32),
])
def test_bad_inputs_are_named(method, shape, message, dtype):
    vae = vae_from_config(CONFIGS["wan"])
    with pytest.raises(ValueError, match=message):
        _shape_of(vae, method, shape, dtype)


@pytest.mark.parametrize("change, message", [
    (dict(is_residual=True, dim_mult=[1, 3, 2, 2]), "encoder stage 1 goes 8 -> 24"),
    (dict(patch_size=2), "in_channels=3 with patch_size=2"),
    (dict(patch_size=0), "patch_size=0"),
    (dict(attn_scales=[0.5]), "attn_scales"),
    (dict(temperal_downsample=[True]), "expected 3"),
    (dict(temperal_downsample=[True, True, True]), "at most 2"),
    (dict(dropout=1.5), "dropout"),
    (dict(tile_sample_stride_width=300), "gaps"),
    (dict(tile_sample_stride_height=100), "tile_sample_stride_height=100: expected a multiple of "
                                          "the VAE's spatial factor 8"),
    (dict(tile_sample_min_width=260), "tile_sample_min_width=260"),
    (dict(dtype="int8"), "dtype"),
    (dict(conv_impl="fft"), "conv_impl"),
    (dict(frames=4), "unknown VAE config keys \\['frames'\\]"),
])
def test_bad_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        vae_from_config({**CONFIGS["wan"], **change})


def test_what_diffusers_saves_but_never_reads_is_accepted():
    """AutoencoderKLWan saves scale factors 8 and 4 whatever its stages (a 3-stage VAE compresses
    4x) and the residual encoder ignores attn_scales: both build what diffusers builds, the
    contradicting factors with a warning (vdit sizes latents by the stages)."""
    def shapes(config):
        return jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(
            lambda v: vae_from_config(config).init(jax.random.key(0), v),
            jax.ShapeDtypeStruct((1, 1, 16, 16, 3), jnp.float32)))
    with pytest.warns(UserWarning, match=r"scale_factor_spatial=8 contradicts .* compresses 4x"):
        defaults = shapes({**CONFIGS["custom"], "scale_factor_spatial": 8,
                           "scale_factor_temporal": 4})
    assert defaults == shapes(CONFIGS["custom"])
    assert shapes({**CONFIGS["wan22"], "attn_scales": [0.5]}) == shapes(CONFIGS["wan22"])


def test_unreached_attn_scales_build_what_diffusers_builds():
    """A 4-stage encoder has attention scales 1 .. 1/8; diffusers builds no attention for 1/16."""
    shapes = [jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(
        lambda v, c=c: vae_from_config(c).init(jax.random.key(0), v),
        jax.ShapeDtypeStruct((1, 1, 8, 8, 3), jnp.float32)))
        for c in (CONFIGS["wan"], {**CONFIGS["wan"], "attn_scales": [0.0625]})]
    assert shapes[0] == shapes[1]


def test_diffusers_config_writes_the_architectures_scale_factors():
    """diffusers' pipelines size latents by these two: they come from the stages, not defaults."""
    vae = vae_from_config({k: v for k, v in CONFIGS["custom"].items()
                           if not k.startswith("scale_factor")})
    config = diffusers_config(vae)
    assert (config["scale_factor_spatial"], config["scale_factor_temporal"]) == (4, 2)


def test_params_carry_logical_axes():
    vae = vae_from_config(CONFIGS["wan"])
    boxed = jax.eval_shape(lambda v: vae.init(jax.random.key(0), v),
                           jax.ShapeDtypeStruct((1, 1, 8, 8, 3), jnp.float32))["params"]
    specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(boxed))
    assert tuple(specs[("encoder", "conv_in", "kernel")]) == (
        None, None, None, "conv_in", "conv_out")
    assert tuple(specs[("decoder", "norm_out", "gamma")]) == ("norm",)
    assert all(spec is not None for spec in specs.values())


def test_jitted_loss_has_gradients_and_dropout():
    vae = WanVAE(base_dim=4, z_dim=2, dim_mult=(1, 2), num_res_blocks=1,
                 temperal_downsample=(True,), dropout=0.2, conv_impl="native")
    video = jax.random.uniform(jax.random.key(0), (1, 5, 8, 8, 3), minval=-1, maxval=1)
    params = flax.core.meta.unbox(init_params(vae, jax.random.key(1)))  # also tests the helper

    def loss(p, dropout_rng):
        recon, mean, logvar = vae.apply({"params": p}, video, jax.random.key(4),
                                        deterministic=False, rngs={"dropout": dropout_rng})
        return jnp.mean((recon - video) ** 2) + 1e-3 * jnp.mean(kl_divergence(mean, logvar))

    value_and_grad = jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)
    value, grads = value_and_grad(params, jax.random.key(2))
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    assert np.isfinite(float(value)) and all(np.isfinite(g).all() for g in leaves)
    assert all(np.abs(g).sum() > 0 for g in leaves)  # every parameter gets a gradient
    assert float(value_and_grad(params, jax.random.key(3))[0]) != float(value)  # dropout is on


def test_encode_on_a_sharded_batch_matches_one_device(models):
    _, vae, params = models["wan"]
    specs = flax.linen.get_partition_spec(jax.eval_shape(
        lambda v: vae.init(jax.random.key(0), v),
        jax.ShapeDtypeStruct((1, 1, 8, 8, 3), jnp.float32))["params"])
    # the shapes of the 17-frame parity case, so the single-device run reuses its compilation
    video = np.random.default_rng(3).uniform(-1, 1, (2, 17, 16, 24, 3)).astype(np.float32)
    mesh = make_mesh({"data": 1, "fsdp": 2}, jax.devices()[:2])
    rules = logical_rules("vae")
    with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
        shardings = jax.tree_util.tree_map(
            lambda spec: NamedSharding(mesh, flax.linen.logical_to_mesh_axes(spec, rules)), specs)
        sharded = encode(vae, jax.device_put(params, shardings),
                         jax.device_put(video, NamedSharding(mesh, PartitionSpec("data"))))
    alone = encode(vae, params, video)
    assert len(sharded[0].sharding.device_set) == 2
    assert rel_err(sharded[0], alone[0]) < 1e-5


def test_posterior_and_latent_normalisation():
    mean = jnp.full((2, 1, 1, 1, 3), 0.5)
    logvar = jnp.full_like(mean, np.log(4.0))
    draws = sample_posterior(jax.random.key(0), jnp.broadcast_to(mean, (2, 1, 64, 64, 3)),
                             jnp.broadcast_to(logvar, (2, 1, 64, 64, 3)))
    assert abs(float(jnp.std(draws)) - 2.0) < 0.1
    np.testing.assert_allclose(kl_divergence(jnp.zeros_like(mean), jnp.zeros_like(mean)), 0.0)
    z = jax.random.normal(jax.random.key(1), (1, 2, 3, 4, 3))
    stats = ([0.1, -0.2, 0.3], [2.0, 0.5, 1.5])
    np.testing.assert_allclose(denormalize_latents(normalize_latents(z, *stats), *stats), z,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize_latents(z, [0.0], [1.0])
    with pytest.raises(ValueError, match="latents_mean/std are None"):
        normalize_latents(z, None, None)
