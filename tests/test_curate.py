"""Curation stages on videos with known content: shot boundaries, motion, quality scores,
captions, the clip record format and config checks."""

import json
import logging
import os

import curate_testing as ct
import cv2
import numpy as np
import pytest

from vdit.config import ConfigError, load_config
from vdit.curate import captions, cuts, motion, pipeline, records, scores
from vdit.curate.decode import Segment
from vdit.curate.learned import build_learned_scorers
from vdit.curate.settings import check_curate_config, default_config_path


@pytest.fixture(scope="module")
def cfg():
    return load_config(default_config_path()).curate


@pytest.mark.parametrize("fps", [24.0, 12.0])
def test_cuts_find_hard_cut_fade_and_dissolve(cfg, fps):
    video, truth = ct.shot_sequence(fps)
    found = cuts.detect_boundaries(video, fps, cfg.cuts)
    assert [b.kind for b in found] == ["cut", "fade", "dissolve"], found
    errors = {b.kind: b.frame - truth[b.kind] for b in found}
    print(f"fps {fps}: boundary errors in frames {errors}; {found}")
    assert all(abs(e) <= 2 for e in errors.values())
    # The fade's dark frames and ramps and the blended frames belong to no clip.
    clips = cuts.split_clips(len(video), found, fps)
    assert clips[0] == (0, 33) and clips[1][0] == 33 and clips[-1][1] == len(video)
    fade, dissolve = found[1], found[2]
    assert fade.start <= 64 and fade.end >= 68 and dissolve.start <= 92 and dissolve.end >= 97
    for start, end in clips:
        assert end <= fade.start or start >= fade.end


def test_cuts_ignore_continuous_motion(cfg):
    for px in (0.5, 2.0):  # pans of 0.125 and 0.5 frame heights per second at 24 fps
        assert cuts.detect_boundaries(ct.pan(px, frames=72), 24.0, cfg.cuts) == []
    fast = ct.scenes(3, 49, 24.0, 96, 128)
    assert all(cuts.detect_boundaries(v, 24.0, cfg.cuts) == [] for v in fast)


def test_cuts_bad_input(cfg):
    with pytest.raises(ValueError, match=r"uint8 frames \[T, H, W, 3\], got float32"):
        cuts.detect_boundaries(np.zeros((4, 8, 8, 3), np.float32), 24.0, cfg.cuts)
    with pytest.raises(ValueError, match="fps > 0, got 0"):
        cuts.detect_boundaries(np.zeros((4, 8, 8, 3), np.uint8), 0.0, cfg.cuts)
    assert cuts.detect_boundaries(np.zeros((1, 8, 8, 3), np.uint8), 24.0, cfg.cuts) == []


def test_split_clips_ranges_and_max_length():
    b = [cuts.Boundary(10, "cut", 10, 10), cuts.Boundary(30, "fade", 27, 33)]
    assert cuts.split_clips(50, b, 10.0) == [(0, 10), (10, 27), (33, 50)]
    # 17 frames at 10 fps split into parts of <= 0.8 s (8 frames): 3 parts.
    assert cuts.split_clips(50, b, 10.0, max_clip_seconds=0.8)[2:5] == [(10, 16), (16, 21),
                                                                         (21, 27)]
    assert cuts.split_clips(5, [], 10.0) == [(0, 5)]


def test_motion_matches_pan_speed_and_thresholds(cfg):
    fps, height = 24.0, 96
    measured = {}
    for px in (0.0, 0.25, 1.0, 2.0, 3.0):
        truth = px * fps / height  # frame heights (the short side) per second
        measured[truth] = motion.clip_motion(ct.pan(px, height=height), fps, cfg.motion)["motion"]
    print("motion, true -> measured (short sides / s):",
          {round(k, 4): round(v, 4) for k, v in measured.items()})
    for truth, value in measured.items():
        assert value == pytest.approx(truth, rel=0.08, abs=0.002)
    reasons = {t: motion.motion_reason({"motion": v}, cfg.motion) for t, v in measured.items()}
    assert reasons == {0.0: "static", 0.0625: "", 0.25: "", 0.5: "", 0.75: ""}
    # Resolution independent: the same pan (in frame heights) at twice the size scores the same.
    big = motion.clip_motion(ct.pan(4.0, height=192, width=256), fps, cfg.motion)["motion"]
    assert big == pytest.approx(measured[0.5], rel=0.05)


def test_motion_static_moving_extreme_sides_of_thresholds(cfg):
    fps = 24.0
    # A still shot with sensor-like noise (sigma 2 of 255), at 192x256 so the flow sees it
    # downscaled 3x as it would a real (>= 360p) video; the noise floor rises at lower sizes.
    still = np.repeat(ct.texture(1, 192, 256)[None], 24, axis=0)
    noisy = np.clip(still + np.random.default_rng(0).normal(0, 2, still.shape), 0, 255)
    static = motion.clip_motion(noisy.astype(np.uint8), fps, cfg.motion)
    moving = motion.clip_motion(ct.pan(1.0), fps, cfg.motion)
    extreme = motion.clip_motion(ct.pan(5.0), fps, cfg.motion)  # 1.25 frame heights / s
    print(f"motion: static {static['motion']:.4f} < {cfg.motion.min_motion} <= moving "
          f"{moving['motion']:.4f} <= {cfg.motion.max_motion} < extreme {extreme['motion']:.4f}")
    assert motion.motion_reason(static, cfg.motion) == "static"
    assert motion.motion_reason(moving, cfg.motion) == ""
    assert motion.motion_reason(extreme, cfg.motion) == "extreme_motion"
    assert motion.clip_motion(still[:1], fps, cfg.motion)["motion"] == 0.0


def test_sharpness_falls_with_blur(cfg):
    video = np.repeat(ct.texture(2, 144, 256)[None], 3, axis=0)
    values = []
    for sigma in (0, 0.7, 1.5, 3.0):
        blurred = np.stack([cv2.GaussianBlur(f, (0, 0), sigma) if sigma else f for f in video])
        values.append(scores.clip_scores(blurred, cfg.scores)["sharpness"])
    print("sharpness for blur sigma 0, 0.7, 1.5, 3:", [round(v, 2) for v in values])
    assert all(a > 1.3 * b for a, b in zip(values, values[1:]))
    assert "blurry" not in scores.quality_reasons(
        scores.clip_scores(video, cfg.scores), cfg.scores)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 3.0) for f in video])
    assert "blurry" in scores.quality_reasons(scores.clip_scores(blurred, cfg.scores), cfg.scores)


def test_letterbox_and_pillarbox_detected_and_cropped(cfg):
    content = ct.pan(1.0, frames=8, height=96, width=128)
    boxed = np.zeros((8, 128, 160, 3), np.uint8)
    boxed[:, 16:112, 16:144] = content  # 16-row bars top/bottom, 16-column bars left/right
    plain, found = scores.clip_scores(content, cfg.scores), scores.clip_scores(boxed, cfg.scores)
    print(f"letterbox: box {found['box']}, border {found['border']:.3f}")
    assert found["box"] == [16, 16, 16, 16] and plain["box"] == [0, 0, 0, 0]
    assert found["border"] == pytest.approx(1 - 96 * 128 / (128 * 160))
    # Scores are measured inside the box: the bars do not darken or sharpen the clip.
    assert found["brightness"] == pytest.approx(plain["brightness"], abs=1e-6)
    assert found["sharpness"] == pytest.approx(plain["sharpness"], rel=1e-6)
    np.testing.assert_array_equal(pipeline.output_frames(boxed, found["box"], cfg.output),
                                  content)
    bars = boxed.copy()
    bars[:, 16:112, 16:144] = 0
    bars[:, 60:68, 70:90] = 200  # a small lit patch: the bars cover > max_border of the frame
    heavy = scores.clip_scores(bars, cfg.scores)
    assert heavy["border"] > cfg.scores.max_border
    assert scores.quality_reasons(heavy, cfg.scores)[0] == "black_border"
    assert scores.clip_scores(np.zeros((2, 32, 32, 3), np.uint8), cfg.scores)["border"] == 0.0


def test_motion_measured_inside_the_bars(cfg):
    """Letterboxed and pillarboxed pans move as fast as the content inside the bars does (the
    still bars would dilute a whole-frame measure 2-3x, dropping slow boxed clips as static).
    The line keeps the decoded size, which its `box` refers to."""
    fps, item = 24.0, pipeline.VideoItem("v.mp4", "v.mp4")
    content = ct.pan(1.0, frames=24, height=64, width=96)
    letterbox = np.zeros((24, 112, 96, 3), np.uint8)
    letterbox[:, 24:88] = content  # 24-row bars: content 64 x 96 in a 112 x 96 frame
    pillarbox = np.zeros((24, 64, 144, 3), np.uint8)
    pillarbox[:, :, 24:120] = content  # 24-column bars: content 64 x 96 in a 64 x 144 frame
    truth = motion.clip_motion(content, fps, cfg.motion)["motion"]
    out = cfg.output.copy_and_resolve_references()
    out.short_side = 32
    c = cfg.copy_and_resolve_references()
    c.output = out
    for name, video in (("letterbox", letterbox), ("pillarbox", pillarbox)):
        segment = Segment(0, 0, video, fps, last=True)
        result = pipeline.analyse_clip(segment, item, 0, len(video), None, c)
        line = result.line
        whole = motion.clip_motion(video, fps, cfg.motion)["motion"]
        print(f"{name}: motion {line['motion']:.4f}, content alone {truth:.4f}, "
              f"whole frame {whole:.4f}")
        assert line["motion"] == pytest.approx(truth, rel=0.05) and whole < 0.7 * truth
        assert line["kept"], line["reasons"]
        assert result.frames.shape[1:3] == (32, 48)
        assert (line["height"], line["width"]) == video.shape[1:3]
    dropped = pipeline.analyse_clip(Segment(0, 0, np.zeros_like(letterbox), fps, last=True), item,
                                    0, 24, None, c).line
    assert not dropped["kept"] and (dropped["height"], dropped["width"]) == (112, 96)
    assert "times" not in dropped  # constant rate: fps tells every frame's time


def test_text_overlay_detected(cfg):
    for height, width in ((64, 96), (144, 256), (288, 512)):
        video = ct.scenes(1, 5, 8.0, height, width)[0]
        clean = scores.clip_scores(video, cfg.scores)["text"]
        texted = scores.clip_scores(ct.add_text(video), cfg.scores)["text"]
        print(f"text score {height}x{width}: clean {clean:.3f}, subtitled {texted:.3f}")
        assert clean < 0.05 < cfg.scores.max_text < texted
    textured = ct.pan(0.0, frames=3, height=144, width=256)
    assert scores.clip_scores(textured, cfg.scores)["text"] < 0.05


def test_brightness_contrast_reasons(cfg):
    base = ct.pan(0.0, frames=2)
    dark = (base * 0.05).astype(np.uint8)
    flat = np.full_like(base, 128)
    assert "dark" in scores.quality_reasons(scores.clip_scores(dark, cfg.scores), cfg.scores)
    flat_scores = scores.clip_scores(flat, cfg.scores)
    assert flat_scores["contrast"] == 0.0
    assert "low_contrast" in scores.quality_reasons(flat_scores, cfg.scores)
    assert scores.quality_reasons(scores.clip_scores(base, cfg.scores), cfg.scores) == []


def test_captions_precedence_and_sidecars(tmp_path):
    video = tmp_path / "v.mp4"
    assert captions.read_sidecar(video) is None
    (tmp_path / "v.txt").write_text(" a cat \n")
    assert captions.read_sidecar(video) == {"caption": "a cat"}
    (tmp_path / "v.json").write_text(json.dumps({"captions": [
        {"start": 0.0, "end": 2.0, "caption": "first"},
        {"start": 2.0, "end": 5.0, "caption": "second"}]}))
    side = captions.read_sidecar(video)  # json wins over txt
    assert captions.original_caption(None, side, 1.5, 4.0) == ("second", "sidecar")
    assert captions.original_caption(None, side, 0.0, 1.0) == ("first", "sidecar")
    assert captions.original_caption("manifest text", side, 0, 1) == ("manifest text", "manifest")
    assert captions.original_caption(None, None, 0, 1) == ("", "")
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(ValueError, match="v.json is not valid JSON"):
        captions.read_sidecar(video)
    (tmp_path / "v.json").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="must be an object with \"caption\""):
        captions.read_sidecar(video)
    bad = {"captions": [{"start": 0}]}
    with pytest.raises(ValueError, match=r"captions\[0\]"):
        captions.original_caption(None, bad, 0, 1, where="v.json")
    # checked when read, so curate loses the captions (a warning), not the video's clips
    (tmp_path / "v.json").write_text(json.dumps({"captions": [{"start": 0, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"v.json: captions\[0\] = .*expected"):
        captions.read_sidecar(video)


def test_captioner_loading(cfg, caplog):
    c = cfg.captions.copy_and_resolve_references()
    with caplog.at_level(logging.INFO):
        assert captions.load_captioner(c) is None
    assert "no captions.captioner configured" in caplog.text
    c.captioner, c.captioner_arg = "curate_testing:make_upper_captioner", "model"
    fn = captions.load_captioner(c)
    assert captions.recaption(fn, np.zeros((3, 4, 4, 3), np.uint8), "a dog") == \
        "model: A DOG (3 frames)"
    c.captioner = "no_colon"
    with pytest.raises(ValueError, match="expected 'module:function'"):
        captions.load_captioner(c)
    c.captioner = "curate_testing:missing"
    with pytest.raises(ValueError, match="cannot be loaded"):
        captions.load_captioner(c)


def test_clip_records_round_trip_with_grain(tmp_path):
    import grain

    clips = [{"frames": np.full((t, 16, 24, 3), t, np.uint8), "caption": f"c{t}",
              "recaption": "", "fps": 12.0, "meta": {"source": f"v{t}.mp4", "motion": 0.1}}
             for t in (3, 5)]
    path = records.part_path(str(tmp_path), 0, 1, 0)
    assert records.write_clip_file(path, clips) == 2 and not os.path.exists(path + ".tmp")
    raw = grain.sources.ArrayRecordDataSource([path])
    assert len(raw) == 2
    back = records.decode_clip(raw[1])
    np.testing.assert_array_equal(back["frames"], clips[1]["frames"])
    assert back["caption"] == "c5" and back["meta"] == clips[1]["meta"] and back["fps"] == 12.0
    source = records.ClipShardSource(str(tmp_path))
    loaded = list(grain.MapDataset.source(source).map(lambda r: r["frames"].shape[0]))
    assert loaded == [3, 5]
    with pytest.raises(ValueError, match="missing keys"):
        records.encode_clip({"frames": clips[0]["frames"]})
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        records.encode_clip({**clips[0], "frames": np.zeros((2, 4, 4), np.float32)})
    with pytest.raises(FileNotFoundError, match="no clip shards"):
        records.clip_paths(str(tmp_path / "empty"))


def test_config_checks(cfg):
    check_curate_config(cfg)
    path = default_config_path()
    bad = {"--config.curate.motion.min_motion=2.0": "minimum exceeds the maximum",
           "--config.curate.scores.max_text=1.5": r"'curate.scores.max_text' = 1.5; must be in",
           "--config.curate.motion.fps=0.0": r"'curate.motion.fps' = 0.0; must be > 0",
           "--config.curate.cuts.gradual.scales_seconds=(0.1, -1.0)":
               "'curate.cuts.gradual.scales_seconds'",
           "--config.curate.cuts.gradual.min_window=0": "'curate.cuts.gradual.min_window'",
           "--config.curate.cuts.gradual.zooms=(1.0, 0.0)": "'curate.cuts.gradual.zooms'",
           "--config.curate.cuts.gradual.span_pad=-0.5": "'curate.cuts.gradual.span_pad'",
           "--config.curate.cuts.gradual.aligned_samples=0":
               "'curate.cuts.gradual.aligned_samples'",
           "--config.curate.cuts.gradual.blend_fit=1.5": "'curate.cuts.gradual.blend_fit'",
           "--config.curate.cuts.gradual.blend_gain=-0.1": "'curate.cuts.gradual.blend_gain'",
           "--config.curate.cuts.gradual.blend_change=2.0":
               "'curate.cuts.gradual.blend_change' = 2.0; must be in",
           "--config.curate.motion.poly_n=6": "Farneback supports 5 or 7"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            check_curate_config(load_config(path, [override]).curate)
    with pytest.raises(ConfigError, match="unknown config key 'curate.cuts.nope'"):
        load_config(path, ["--config.curate.cuts.nope=1"])
    with pytest.raises(ConfigError, match="'curate.cuts.gradual.scales_seconds' = \\(\\)"):
        check_curate_config(load_config(path, ["--config.curate.cuts.gradual.scales_seconds=()"])
                            .curate)


def test_learned_scorers_skipped_with_notice(cfg, caplog):
    with caplog.at_level(logging.INFO):
        assert build_learned_scorers(cfg.scores) == []
    assert "no learned scorers" in caplog.text
    c = cfg.scores.copy_and_resolve_references()
    c.aesthetic_head = "head.safetensors"
    with pytest.raises(ValueError, match="'curate.scores.clip_model' is empty"):
        build_learned_scorers(c)
    c.clip_model = "/nonexistent"
    with pytest.raises(FileNotFoundError, match="not a transformers CLIPModel folder"):
        build_learned_scorers(c)


def _tiny_clip(folder):
    """A random-weight CLIP folder (transformers) with a toy letter tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    processor.save_pretrained(folder)
    return model, processor


def test_learned_clip_and_aesthetic_scorers_match_torch(cfg, tmp_path):
    import torch
    from safetensors.torch import save_file

    model, processor = _tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2),
                               torch.nn.Linear(32, 8), torch.nn.Dropout(0.1),
                               torch.nn.Linear(8, 1)).eval()
    save_file({f"layers.{k}": v for k, v in head.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    frames = ct.scenes(1, 3, 8.0)[0]
    with torch.no_grad():
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        ids = processor(text=["a red circle"], return_tensors="pt")
        text = model.get_text_features(**ids).pooler_output[0]
        ref_clip = float((image @ (text / text.norm())).mean())
        ref_aesthetic = float(head(image).mean())
    for head_file in ("head.safetensors",):
        c = cfg.scores.copy_and_resolve_references()
        c.clip_model, c.aesthetic_head = str(tmp_path / "clip"), str(tmp_path / head_file)
        clip_score, aesthetic = build_learned_scorers(c)
        got = clip_score(frames, "a red circle"), aesthetic(frames, "a red circle")
        print(f"learned scorers ({head_file}): clip {got[0]:.6f} vs {ref_clip:.6f}, "
              f"aesthetic {got[1]:.6f} vs {ref_aesthetic:.6f}")
        assert got[0] == pytest.approx(ref_clip, rel=1e-5, abs=1e-6)
        assert got[1] == pytest.approx(ref_aesthetic, rel=1e-5, abs=1e-6)
    assert np.isnan(clip_score(frames, ""))  # no caption: nothing to compare, never dropped
    save_file({"layers.0.weight": torch.zeros(4, 16), "layers.1.weight": torch.zeros(1, 5)},
              str(tmp_path / "bad.safetensors"))
    c.aesthetic_head = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="layer widths do not chain"):
        build_learned_scorers(c)


def test_a_slowly_darkening_shot_is_not_a_fade_ramp():
    """Frames darkening toward a hard cut by more than fade_rise a frame join its transition only
    when they dim by fade_ramp_drop of the shot's luma: a fade out that never reaches black does,
    a dimming light (1 luma a frame) keeps its frames (23 of 48 were dropped). 24 frames: 1 s."""
    cut = cuts.Boundary(48, "cut", 48, 48)
    dimming = np.concatenate([150 - np.arange(48.0), np.full(48, 90.0)])
    assert cuts._with_ramps(cut, dimming, 0.5, 0.3, 24) == cut
    fading = np.concatenate([np.full(38, 150.0), 150 - 10 * np.arange(1, 11), np.full(48, 90.0)])
    widened = cuts._with_ramps(cut, fading, 0.5, 0.3, 24)
    assert (widened.start, widened.end) == (38, 48)
