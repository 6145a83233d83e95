"""Caption embedding cache: same numbers as encoding directly, stale caches refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from text_testing import SENTENCES

from vdit.data import text_cache
from vdit.models import text
from vdit.models.tokenizers import ByteTokenizer

CFG = dict(kind="byte", max_length=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
           relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    module, tok = text.text_encoder_from_config(CFG)
    params = nn.meta.unbox(
        jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 40), jnp.int32))["params"])
    path = str(tmp_path_factory.mktemp("cache") / "captions.npz")
    captions = SENTENCES + [SENTENCES[0], ""]  # a duplicate and an empty caption
    cache = text_cache.build_text_cache(path, module, params, tok, captions, batch_size=4)
    return module, params, tok, path, cache


def test_lookup_equals_direct_encoding(built):
    module, params, tok, path, cache = built
    assert len(cache.captions) == len(SENTENCES) + 1
    loaded = text_cache.load_text_cache(path, text_cache.cache_key(module, params, tok))
    query = [SENTENCES[2], "", SENTENCES[0]]
    want = np.asarray(text.encode_prompts(module, params, tok, query))
    np.testing.assert_allclose(loaded.lookup(query), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(loaded.lookup(query), cache.lookup(query))
    with pytest.raises(KeyError, match="'a purple hexagon'"):
        loaded.lookup(["a purple hexagon"])


def test_stale_cache_is_an_error(built, tmp_path):
    module, params, tok, path, _ = built
    changed = jax.tree.map(lambda x: x, params)  # a copy of the dict structure
    changed["final_norm"]["scale"] = changed["final_norm"]["scale"].at[0].add(1e-3)
    with pytest.raises(ValueError, match="weights: cache has"):
        text_cache.load_text_cache(path, text_cache.cache_key(module, changed, tok))
    with pytest.raises(ValueError, match="tokenizer: cache has 'byte:v258:L40'"):
        text_cache.load_text_cache(path, text_cache.cache_key(module, params, ByteTokenizer(16)))
    with pytest.raises(ValueError, match="encoder: cache has"):
        text_cache.load_text_cache(
            path, text_cache.cache_key(module.clone(layer_norm_epsilon=1e-5), params, tok))
    with pytest.raises(ValueError, match="clean: cache has True, expected False"):
        text_cache.load_text_cache(path, text_cache.cache_key(module, params, tok, clean=False))


def test_bad_files_and_arguments(built, tmp_path):
    module, params, tok, _, _ = built
    key = text_cache.cache_key(module, params, tok)
    with pytest.raises(FileNotFoundError, match="does not exist; build it first"):
        text_cache.load_text_cache(str(tmp_path / "none.npz"), key)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable cache file"):
        text_cache.load_text_cache(str(junk), key)
    with pytest.raises(ValueError, match="batch_size=0"):
        text_cache.build_text_cache(str(tmp_path / "x.npz"), module, params, tok, ["a"], 0)
