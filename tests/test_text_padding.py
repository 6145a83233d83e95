"""`data.text_pad_to`: training a Wan DiT on text laid out as Wan's pipeline gives it (each clip's
caption zero-padded to 512 positions, every one attended), so a finetune starts from the function
Wan computes and samples the way it trained. Checked against diffusers' WanTransformer3DModel on
each clip alone with its zero-padded text, and against `encode_prompts` (what sampling feeds)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from dit_testing import pack_row
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit import config as config_lib
from vdit.convert import wan_dit
from vdit.models import patches
from vdit.models.text import encode_prompts, text_encoder_from_config
from vdit.plan.attention import attention_cost
from vdit.train import init_from
from vdit.train.objective import encode_packed_text, pad_text_blocks

# 3 heads of 8, (1, 2, 2) patches, text width 12, no cross-attention norm: not the other tests'.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=4,
           out_channels=4, text_dim=12, freq_dim=16, ffn_dim=20, num_layers=2,
           cross_attn_norm=False, eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def test_blocks_hold_each_segment_then_zeros():
    ids = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 0, 0],   # segment 3 is longer than a block
                    [1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0]], np.int32)  # segment 3 absent
    context = np.arange(1, 25, dtype=np.float32).reshape(2, 12, 1) * (ids[..., None] > 0)
    out, block_ids = pad_text_blocks(jnp.asarray(context), jnp.asarray(ids), 3, 4)
    np.testing.assert_array_equal(out[..., 0], [
        [1, 2, 3, 0, 4, 5, 0, 0, 6, 7, 8, 9],
        [13, 14, 0, 0, 15, 16, 17, 18, 0, 0, 0, 0]])
    np.testing.assert_array_equal(block_ids, [[1] * 4 + [2] * 4 + [3] * 4,
                                              [1] * 4 + [2] * 4 + [0] * 4])


def test_blocks_keep_rows_on_their_devices():
    """Rows sharded over fsdp: laying out the blocks moves no row between devices."""
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    layout = jax.jit(lambda c, i: pad_text_blocks(c, i, 4, 24), in_shardings=(rows, rows))
    compiled = layout.lower(jnp.ones((16, 64, 32)), jnp.ones((16, 64), jnp.int32)).compile()
    assert "all-gather" not in compiled.as_text() and "all-to-all" not in compiled.as_text()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    torch.manual_seed(3)
    ref = WanTransformer3DModel(**WAN).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = os.path.join(tmp_path_factory.mktemp("wan"), "transformer")
    ref.save_pretrained(folder, safe_serialization=True)
    dit, params = wan_dit.load_transformer(folder)
    return ref, dit, params


def test_packed_row_with_padded_text_matches_wan_on_each_clip(wan):
    """Two clips of other shapes and caption lengths in one row, with row padding and junk
    text after the captions: each clip's output equals Wan's on that clip alone with its
    caption zero-padded to `pad_to`. Without the blocks (masked text) it does not."""
    ref, dit, params = wan
    rng = np.random.default_rng(0)
    pad_to, segments = 9, 3
    videos = [rng.normal(size=(2, 4, 6, 4)).astype(np.float32),
              rng.normal(size=(1, 6, 2, 4)).astype(np.float32)]
    texts = [rng.normal(size=(5, 12)).astype(np.float32), rng.normal(size=(2, 12)).astype(np.float32)]
    times = np.array([640.0, 35.0], np.float32)
    tokens, positions, seg, timesteps, context, ctx_seg, slices = pack_row(
        videos, texts, times, WAN["patch_size"], 20, 10)
    batch = {"text": jnp.asarray(context[None]), "text_segment_ids": jnp.asarray(ctx_seg[None])}
    padded, padded_ids = encode_packed_text(None, None, batch, segments, pad_to)
    assert padded.shape == (1, segments * pad_to, 12)

    def run(ctx, ids):
        return np.asarray(dit.apply({"params": params}, tokens[None], positions[None], seg[None],
                                    timesteps[None], ctx, ids, method="packed"))[0]

    ours, masked = run(padded, padded_ids), run(*encode_packed_text(None, None, batch, segments))
    for video, text, t, part in zip(videos, texts, times, slices):
        full = np.zeros((1, pad_to, 12), np.float32)
        full[0, :len(text)] = text
        with torch.no_grad():
            want = ref(torch.from_numpy(video[None]).permute(0, 4, 1, 2, 3),
                       torch.tensor([t]), torch.from_numpy(full), return_dict=False)[0]
        want = patches.patchify(want.permute(0, 2, 3, 4, 1).numpy()[0], WAN["patch_size"])[0]
        rel = np.linalg.norm(ours[part] - want) / np.linalg.norm(want)
        assert rel < 1e-5, rel
        assert np.linalg.norm(masked[part] - want) / np.linalg.norm(want) > 1e-2


def test_training_context_is_what_sampling_feeds():
    """Token ids packed as the pipeline packs them, through the text encoder and the blocks, give
    each caption the rows `encode_prompts` gives it alone (real tokens, then zeros)."""
    cfg = ml_collections.ConfigDict(dict(kind="byte", max_length=16, d_model=16, d_kv=4, d_ff=24,
                                         num_layers=2, num_heads=2, dtype="float32"))
    model, tokenizer = text_encoder_from_config(cfg)
    ids, mask = tokenizer(["a red circle", "up", ""])
    params = model.init(jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                          params)
    lengths = mask.sum(1)
    text = np.concatenate([ids[i, :n] for i, n in enumerate(lengths)] + [np.zeros(3, np.int32)])
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]
                         + [np.zeros(3, np.int32)])
    batch = {"text": jnp.asarray(text[None]), "text_segment_ids": jnp.asarray(seg[None])}
    context, context_ids = encode_packed_text(model, params, batch, 4, 16)
    want = encode_prompts(model, params, tokenizer, ["a red circle", "up", ""])
    np.testing.assert_allclose(np.asarray(context)[0, :48].reshape(3, 16, 16), want,
                               rtol=1e-5, atol=1e-6)
    assert not np.asarray(context)[0, 48:].any()
    np.testing.assert_array_equal(context_ids[0], np.repeat([1, 2, 3, 0], 16))


def _config(text_pad_to=0):
    return ml_collections.ConfigDict(dict(
        data=dict(text_pad_to=text_pad_to), text=dict(kind="byte", max_length=512),
        sample=dict(steps=2)))


def test_settings_agree_or_are_named():
    config = _config(text_pad_to=512)
    config_lib.validate(config)
    assert config_lib.text_masked(config) is False and config_lib.text_masked(_config()) is True
    with pytest.raises(config_lib.ConfigError, match=r"'data.text_pad_to' = 256 must equal "
                                                     r"'text.max_length' = 512"):
        config_lib.validate(_config(text_pad_to=256))
    config.sample.mask_text = True
    with pytest.raises(config_lib.ConfigError, match="'sample.mask_text' = True"):
        config_lib.validate(config)
    with pytest.raises(config_lib.ConfigError, match="'data.text_pad_to' = -1"):
        config_lib.validate(_config(text_pad_to=-1))


def test_finetune_from_another_text_layout_is_said(caplog):
    """A converted Wan run samples on padded text; a finetune of it on packed captions warns."""
    wan_run = {"sample": {"mask_text": False}}
    config = _config(text_pad_to=512)
    config.train = ml_collections.ConfigDict(dict(init_from="runs/wan"))
    init_from.check_text_layout(config, wan_run)
    assert not caplog.records
    config.data.text_pad_to = 0
    init_from.check_text_layout(config, wan_run)
    assert "attends to every zero-padded text position, this run's DiT trains on packed " \
           "captions only (config key 'data.text_pad_to' = 0" in caplog.text


def test_resuming_on_another_text_layout_is_refused():
    """A run saved with packed captions (before its recipe set text_pad_to) does not switch."""
    from vdit.train.loop import check_resume_compatible

    saved = {"model": {}, "data": {"num_workers": 0}}  # saved before the key existed
    config = ml_collections.ConfigDict(dict(model={}, data=dict(num_workers=0, text_pad_to=512)))
    with pytest.raises(ValueError, match=r"'data.text_pad_to' = 512, but the checkpoint's DiT "
                                         r"trained on text laid out with 0 .*text_pad_to=0"):
        check_resume_compatible(saved, config)
    config.data.text_pad_to = 0
    check_resume_compatible(saved, config)


def test_plan_counts_the_padded_blocks():
    """Four clips of 256 tokens: with 512-position blocks each clip's queries cross its own 512
    text positions (GPU kernel blocks of 64 skip the rest), not 64 packed ones."""
    model = ml_collections.ConfigDict(WAN)
    packed = attention_cost(model, 1, 1024, 256, 256)["gpu"]
    padded = attention_cost(model, 1, 1024, 256, 256, pad_to=512, max_segments=4)["gpu"]
    self_attn = 4 * 256 * 256
    assert padded["tflop_block_sparse"] / packed["tflop_block_sparse"] == pytest.approx(
        (self_attn + 4 * 256 * 512) / (self_attn + 4 * 256 * 64))
    assert padded["tflop_dense"] / packed["tflop_dense"] == pytest.approx(
        (1024 * 1024 + 1024 * 2048) / (1024 * 1024 + 1024 * 256))
