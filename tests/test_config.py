"""Config loading, overrides and validation: every bad value is an error naming its key."""

import ast
import os
import textwrap

import ml_collections
import pytest

from vdit import config as cfglib
from vdit.data import shapes_captions
from vdit.data.synthetic import COLORS
from vdit.models import attention, dit_block
from vdit.parallel import mesh

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.data = dict(frames=17, height=64, width=96, caption_dropout=0.1)
            c.model = dict(patch_size=(1, 2, 2), attention="xla", remat="none", dtype="float32")
            c.vae = dict(dim_mult=[1, 2, 4, 4])
            c.train = dict(steps=10, lr=1e-3, name="run", resume=True)
            c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
            return c
    """))
    return str(path)


def test_loads_and_overrides(config_file):
    c = cfglib.load_config(config_file, ["--config.train.steps=100", "train.lr=2e-4",
                                         "--config.train.name=big", "--config.train.resume=False",
                                         "--config.data.frames=5", "--config.train.lr=1"])
    assert c.train.steps == 100 and c.train.name == "big" and c.train.resume is False
    assert c.data.frames == 5 and c.train.lr == 1.0 and isinstance(c.train.lr, float)


def test_unknown_key_is_named(config_file):
    with pytest.raises(cfglib.ConfigError, match=r"train\.stepz"):
        cfglib.load_config(config_file, ["--config.train.stepz=3"])
    with pytest.raises(cfglib.ConfigError, match=r"trian"):
        cfglib.load_config(config_file, ["--config.trian.steps=3"])


def test_wrong_type_is_named(config_file):
    with pytest.raises(cfglib.ConfigError, match=r"train\.steps.*'many'.*int"):
        cfglib.load_config(config_file, ["--config.train.steps=many"])
    with pytest.raises(cfglib.ConfigError, match=r"train\.resume"):
        cfglib.load_config(config_file, ["--config.train.resume=3"])


def test_missing_equals(config_file):
    with pytest.raises(cfglib.ConfigError, match="no '='"):
        cfglib.load_config(config_file, ["--config.train.steps"])


@pytest.mark.parametrize("frames", [2, 4, 16, 0])
def test_frames_must_be_1_plus_4k(config_file, frames):
    with pytest.raises(cfglib.ConfigError, match=r"data\.frames.*1\+4k"):
        cfglib.load_config(config_file, [f"--config.data.frames={frames}"])


@pytest.mark.parametrize("key,value", [("height", 72), ("width", 100)])
def test_size_must_divide_stride(config_file, key, value):
    # stride = VAE 8 (dim_mult of 4 stages) x patch 2 = 16
    with pytest.raises(cfglib.ConfigError, match=rf"data\.{key}.*{value}.*multiple of 16"):
        cfglib.load_config(config_file, [f"--config.data.{key}={value}"])


def test_choices_and_mesh(config_file):
    with pytest.raises(cfglib.ConfigError, match=r"model\.attention.*'flash'.*xla"):
        cfglib.load_config(config_file, ["--config.model.attention=flash"])
    with pytest.raises(cfglib.ConfigError, match=r"mesh.*-1"):
        cfglib.load_config(config_file, ["--config.mesh.fsdp=-1"])
    with pytest.raises(cfglib.ConfigError, match=r"mesh\.tensor"):
        cfglib.load_config(config_file, ["--config.mesh.tensor=0"])
    # multi-slice axes (launch/README) on any config's mesh; only the known axes
    assert cfglib.load_config(config_file, ["--config.mesh.dcn_data=2"]).mesh.dcn_data == 2
    with pytest.raises(cfglib.ConfigError, match=r"unknown config key 'mesh.dcn_batch'"):
        cfglib.load_config(config_file, ["--config.mesh.dcn_batch=2"])


def test_optimizer_values_out_of_range_are_named():
    config = cfglib.load_config(os.path.join(CONFIG_DIR, "shapes_dit.py"))
    for key, value, message in (("train.ema_decay", 1.5, "expected a number in \\[0, 1\\]"),
                                ("optim.grad_accum", 0, "expected a whole number >= 1")):
        bad = cfglib.load_config(os.path.join(CONFIG_DIR, "shapes_dit.py"))
        section, leaf = key.split(".")
        bad[section][leaf] = value
        with pytest.raises(cfglib.ConfigError, match=f"'{key}' = {value}: {message}"):
            cfglib.validate(bad)
    cfglib.validate(config)


def test_missing_file_and_bad_module(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        cfglib.load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(cfglib.ConfigError, match="no get_config"):
        cfglib.load_config(str(bad))


def test_every_shipped_config_validates():
    names = [n for n in os.listdir(CONFIG_DIR) if n.endswith(".py") and not n.startswith("_")]
    for name in sorted(set(names) - {"common.py"}):  # common.py: default sections, no recipe
        c = cfglib.load_config(os.path.join(CONFIG_DIR, name))
        assert isinstance(c, ml_collections.ConfigDict), name


def test_recipes_encode_video_files_at_their_training_rate():
    """Every recipe that encodes samples video files at the fps its model trains at (a 30 fps
    source's consecutive frames would teach slowed-down motion), and the keys `vdit encode` reads
    are in the recipe, so a command line can set them."""
    names = [n for n in os.listdir(CONFIG_DIR) if n.endswith(".py") and n != "common.py"]
    for name in sorted(names):
        c = cfglib.load_config(os.path.join(CONFIG_DIR, name))
        if "encode" in c:
            assert c.encode.fps == c.data.fps, name
            c = cfglib.load_config(os.path.join(CONFIG_DIR, name), [
                "--config.encode.fps=24.0", "--config.encode.extensions=['.mp4']",
                "--config.encode.decode_threads=2", "--config.encode.caption_key=recaption"])
            assert (c.encode.fps, list(c.encode.extensions)) == (24.0, [".mp4"]), name
            assert c.encode.caption_key == "recaption", name


def test_named_choices_are_defined_once_and_implemented():
    """The config check's names are the ones the code implements (one definition each)."""
    assert set(dit_block._REMAT) == set(cfglib.REMAT_POLICIES)
    assert set(cfglib.ATTENTION_BACKENDS) <= set(attention.BACKENDS)
    assert mesh.MESH_AXES is cfglib.MESH_AXES


def test_recipes_import_no_package_code():
    """A recipe is data: configs/*.py import ml_collections and their neighbours, never vdit."""
    for name in sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".py")):
        tree = ast.parse(open(os.path.join(CONFIG_DIR, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name == "ml_collections" for a in node.names), (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module == "__future__", (name, node.module)


def test_a_config_derives_from_its_neighbours_in_any_folder(tmp_path):
    (tmp_path / "base_recipe.py").write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict(dict(mesh=dict(data=-1, fsdp=1, tensor=1,
                                                            sequence=1), train=dict(steps=10)))
    """))
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        from . import base_recipe
        def get_config():
            config = base_recipe.get_config()
            config.train.steps = 20
            return config
    """))
    config = cfglib.load_config(str(tmp_path / "mine.py"), ["--config.mesh.fsdp=2"])
    assert config.train.steps == 20 and config.mesh.fsdp == 2
    assert cfglib.load_config(str(tmp_path / "base_recipe.py")).train.steps == 10  # fresh dicts
    assert cfglib.recipe_module("common").mesh().to_dict() == dict(data=-1, fsdp=1, tensor=1,
                                                                   sequence=1)


def test_shapes_recipe_vocabulary_is_the_worlds():
    """configs/shapes_dit.py spells out the shapes world's caption words (it imports no vdit
    code); they must be exactly the captions' vocabulary, in order (ids are list positions)."""
    vocab = cfglib.recipe("shapes_dit").text.vocab
    assert list(vocab) == shapes_captions.vocabulary(list(COLORS))


def test_token_stride_counts_a_wan22_vae_pixel_patch():
    """Wan2.2's VAE folds 2x2 pixels into channels before its 8x coder: TI2V-5B tokens are 32
    pixels a side, not 16 (`vdit plan` counted 4x the tokens; 720 rows passed the size check)."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "wan2_2_ti2v_5b.py")
    config = cfglib.load_config(recipe)
    assert cfglib.spatial_stride(config) == 32
    assert cfglib.spatial_stride(cfglib.load_config(recipe.replace("wan2_2_ti2v_5b",
                                                                    "wan2_1_t2v_1_3b"))) == 16
    with pytest.raises(cfglib.ConfigError, match=r"'data.height' = 720: must be a positive "
                                                 r"multiple of 32"):
        cfglib.load_config(recipe, ["--config.data.height=720"])
