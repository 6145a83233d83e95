"""The synthetic shapes world: determinism, shapes, motion, captions, vocabularies, errors."""

import time

import ml_collections
import numpy as np
import pytest

from vdit.data import shapes_captions as caps
from vdit.data import shapes_render
from vdit.data.synthetic import COLORS, DIRECTIONS, SHAPES, SyntheticShapes
from vdit.eval.shapes_detect import rgb_hue_chroma


def _color_mask(video, color):
    """[T, H, W] pixels within a small distance of a palette color."""
    rgb = (video + 1.0) * 127.5
    return np.abs(rgb - np.asarray(COLORS[color], np.float32)).max(-1) < 40


def _centroids(mask):
    ys, xs = np.mgrid[0:mask.shape[1], 0:mask.shape[2]]
    area = mask.sum((1, 2))
    return np.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], -1)


def test_example_contents():
    ds = SyntheticShapes(frames=9, height=32, width=48, fps=8, num_examples=50)
    assert len(ds) == 50
    ex = ds[7]
    video = ex["video"]
    assert video.shape == (9, 32, 48, 3) and video.dtype == np.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert ex["fps"] == 8.0 and isinstance(ex["caption"], str)
    assert 1 <= len(ex["objects"]) <= 2
    for obj in ex["objects"]:
        assert set(obj) == {"shape", "color", "direction"}
        assert obj["shape"] in SHAPES and obj["color"] in COLORS and obj["direction"] in DIRECTIONS
    colors = [o["color"] for o in ex["objects"]]
    assert len(set(colors)) == len(colors)


def test_deterministic_and_seeded():
    a, b = SyntheticShapes(seed=3), SyntheticShapes(seed=3)
    np.testing.assert_array_equal(a[11]["video"], b[11]["video"])
    assert a[11]["caption"] == b[11]["caption"]
    c = SyntheticShapes(seed=4)
    assert not np.array_equal(a[11]["video"], c[11]["video"])
    # The caption split changes wording only, never pixels.
    d = SyntheticShapes(seed=3, caption_split="heldout")
    np.testing.assert_array_equal(a[11]["video"], d[11]["video"])


def test_main_object_is_largest_and_first():
    ds = SyntheticShapes(frames=1, height=64, width=64, max_objects=2)
    seen_two = 0
    for i in range(40):
        ex = ds[i]
        if len(ex["objects"]) < 2:
            continue
        seen_two += 1
        main, other = (_color_mask(ex["video"], o["color"]).sum() for o in ex["objects"])
        assert main > other, (i, ex["objects"])
    assert seen_two > 5


@pytest.mark.parametrize("frames,height,width", [(5, 32, 32), (17, 64, 96), (9, 96, 32),
                                                 (5, 16, 80)])
def test_motion_visible_at_every_size(frames, height, width):
    ds = SyntheticShapes(frames=frames, height=height, width=width, max_objects=1)
    checked = 0
    for i in range(30):
        ex = ds[i]
        obj = ex["objects"][0]
        cents = _centroids(_color_mask(ex["video"], obj["color"]))
        dx, dy = cents[-1] - cents[0]
        if obj["direction"] == "still":
            assert max(abs(dx), abs(dy)) < 0.3
            continue
        checked += 1
        along, across = (dx, dy) if obj["direction"] in ("left", "right") else (dy, dx)
        along *= 1 if obj["direction"] in ("right", "down") else -1
        # Slowest default: 0.15 short sides/s over (T-1)/8 s; the mask centroid is +-0.5 px.
        assert along >= 0.15 * min(height, width) * (frames - 1) / 8 - 0.6, (i, obj, dx, dy)
        assert abs(across) < 0.5, (i, obj, dx, dy)
    assert checked > 10


def test_displacement_scales_with_duration_and_fps():
    """Speed is in frame fractions per second: 4x the duration, ~4x the displacement."""
    short = SyntheticShapes(frames=5, height=64, width=64, max_objects=1, speed_range=(0.2, 0.2))
    long = SyntheticShapes(frames=17, height=64, width=64, max_objects=1, speed_range=(0.2, 0.2),
                           size_range=(0.12, 0.12))
    for i in range(20):
        obj = short.objects(i)[0]
        if obj["direction"] == "still":
            continue
        d5 = np.abs(np.diff(_centroids(_color_mask(short[i]["video"], obj["color"]))[[0, -1]],
                            axis=0)).max()
        d17 = np.abs(np.diff(_centroids(_color_mask(long[i]["video"], obj["color"]))[[0, -1]],
                             axis=0)).max()
        assert d5 == pytest.approx(0.2 * 64 * 4 / 8, abs=1.0)
        assert d17 == pytest.approx(0.2 * 64 * 16 / 8, abs=1.0)


def test_render_at_other_size_keeps_scene():
    ds = SyntheticShapes(frames=17, height=64, width=64)
    for i in range(10):
        small = ds.render(i, 9, 32, 48)
        assert small["video"].shape == (9, 32, 48, 3)
        assert small["objects"] == ds[i]["objects"]


def test_single_frame_is_still_image():
    ds = SyntheticShapes(frames=1, height=32, width=32)
    for i in range(20):
        ex = ds[i]
        assert ex["video"].shape == (1, 32, 32, 3)
        assert all(o["direction"] == "still" for o in ex["objects"])


def test_generation_is_fast():
    ds = SyntheticShapes(frames=17, height=64, width=64)
    ds[0]
    start = time.perf_counter()
    for i in range(20):
        ds[i]
    per_clip = (time.perf_counter() - start) / 20
    assert per_clip < 0.05, per_clip  # a few ms on one core


def test_vocabularies_and_palette():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert set(DIRECTIONS) == {"left", "right", "up", "down", "still"}
    assert len(COLORS) >= 6
    hue, chroma = rgb_hue_chroma(np.asarray(list(COLORS.values()), np.float32) / 255.0)
    diff = np.abs(hue[:, None] - hue[None, :])
    diff = np.minimum(diff, 360 - diff) + np.eye(len(hue)) * 360
    assert diff.min() >= 40 and chroma.min() >= 0.6


@pytest.mark.parametrize("kind", shapes_render.BACKGROUND_KINDS)
def test_backgrounds_are_muted(kind):
    rng = np.random.default_rng(0)
    for _ in range(5):
        bg = shapes_render.background(kind, rng, 48, 64, 0.2, (0.25, 0.7))
        assert bg.shape == (48, 64, 3)
        assert rgb_hue_chroma(bg)[1].max() < 0.25


def test_canonical_captions():
    obj = {"shape": "circle", "color": "red", "direction": "right"}
    assert caps.build_caption([obj]) == "a red circle moving right"
    still = {"shape": "square", "color": "blue", "direction": "still"}
    assert caps.build_caption([still]) == "a static blue square"
    assert caps.build_caption([obj, still]) == "a red circle moving right and a static blue square"
    assert caps.build_caption([obj], template=2) == "a red circle moves right"


def test_caption_variety_and_split():
    train = SyntheticShapes(frames=17, caption_split="train")
    heldout = SyntheticShapes(frames=17, caption_split="heldout")
    train_caps = {train.caption(i) for i in range(300)}
    assert len(train_caps) > 250
    assert any("circle rolls" in c or "circle rolling" in c for c in train_caps)
    assert not any(w in c.split() for c in train_caps for w in ("ball", "disc", "box"))
    assert any(c.startswith(("a static", "a stationary", "a motionless")) for c in train_caps)
    # Held-out templates never produce a training wording.
    rng = np.random.default_rng(0)
    for _ in range(200):
        objs = [{"shape": SHAPES[rng.integers(3)], "color": "green",
                 "direction": DIRECTIONS[rng.integers(5)]}]
        seen = {caps.build_caption(objs, t, np.random.default_rng(s))
                for t in caps.TRAIN_TEMPLATES for s in range(30)}
        for t in caps.HELDOUT_TEMPLATES:
            assert caps.build_caption(objs, t, rng) not in seen
    for i in range(20):  # main object described first
        ex = heldout[i]
        main = ex["objects"][0]
        assert main["color"] in ex["caption"]
        assert ex["caption"].index(main["color"]) == min(
            ex["caption"].index(o["color"]) for o in ex["objects"])


def test_heldout_wordings_reuse_the_training_lexicon():
    """Held-out captions differ in structure; their content words all occur in training."""
    from vdit.models.tokenizers import split_words

    def words(split):
        out = set()
        for t in caps.template_ids(split):
            for shape in SHAPES:
                for direction in DIRECTIONS:
                    for seed in range(40):
                        obj = {"shape": shape, "color": "red", "direction": direction}
                        rng = np.random.default_rng(seed)
                        out |= set(split_words(caps.build_caption([obj], t, rng)))
        return out

    assert words("heldout") - words("train") == {",", "clip", "of", "one", "that", "there"}


def test_word_vocabulary_covers_every_caption():
    from vdit.models.tokenizers import WordTokenizer

    tok = WordTokenizer(caps.vocabulary(list(COLORS)), 64)
    world = SyntheticShapes(frames=5, height=32, width=32, max_objects=3, caption_split="all")
    for i in range(300):
        ids, _ = tok(world.caption(i))
        assert tok.unk_id not in ids, world.caption(i)


def test_from_config():
    cfg = ml_collections.ConfigDict({"frames": 5, "height": 32, "width": 64, "fps": 12.0,
                                     "seed": 9, "num_examples": 10, "speed_range": [0.2, 0.25],
                                     "background": "plain", "max_objects": 1,
                                     "caption_split": "heldout", "batch_size": 4})
    ds = SyntheticShapes.from_config(cfg)
    assert (ds.frames, ds.height, ds.width, ds.fps, ds.seed, len(ds)) == (5, 32, 64, 12.0, 9, 10)
    assert ds.speed_range == (0.2, 0.25)
    assert ds[0]["video"].shape == (5, 32, 64, 3)
    assert all(len(ds.objects(i)) == 1 for i in range(10))


@pytest.mark.parametrize("kwargs,match", [
    ({"frames": 4}, "frames must be 1 \\+ 4k"),
    ({"height": 40}, "height must be a positive multiple of 16"),
    ({"width": 0}, "width must be a positive multiple of 16"),
    ({"background": "stars"}, "background must be one of"),
    ({"caption_split": "test"}, "caption_split must be one of"),
    ({"max_objects": 0}, "max_objects must be in"),
    ({"speed_range": (0.3, 0.1)}, "speed_range must be"),
    ({"fps": 0}, "fps must be > 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapes(**kwargs)


def test_bad_index_and_caption_inputs():
    ds = SyntheticShapes(num_examples=5)
    with pytest.raises(IndexError, match="index 5 out of range for 5 examples"):
        ds[5]
    with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
        ds.render(0, frames=6)
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        caps.build_caption([{"shape": "star", "color": "red", "direction": "up"}])
    with pytest.raises(ValueError, match="template index 99 out of range"):
        caps.build_caption([{"shape": "circle", "color": "red", "direction": "up"}], 99)
