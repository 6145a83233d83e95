"""Real-world video files as `vdit encode` and `vdit curate` meet them: variable frame rates,
anamorphic pixels, an audio file's cover art, linked folders, byte-order marks, captions of the
wrong type, unreadable sidecars. Both readers must agree on what a file shows and when."""

import io
import json
import logging
import os
from fractions import Fraction

import av
import curate_testing as ct
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vdit.config import load_config
from vdit.curate import captions, cuts, run
from vdit.curate.decode import iter_segments
from vdit.curate.pipeline import VideoItem
from vdit.curate.settings import default_config_path
from vdit.data import video_files, video_io
from vdit.data.clip_decode import VideoReader
from vdit.data.counter_video import frame_number, write_counter_video

DECODE = ml_collections.ConfigDict(dict(short_side=0, max_segment_seconds=300.0, default_fps=24.0))


def _write(path, frames, times=None, fps=24, sar=None):
    """An h264 file of uint8 frames [T, H, W, 3]; `times` (seconds) makes its frame rate
    variable; `sar` stores the pixels that many times narrower than shown."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p"
        if sar:
            stream.codec_context.sample_aspect_ratio = Fraction(sar)
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for k, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(1000 * times[k]), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_curate_times_variable_frame_rate_frames_by_their_timestamps(tmp_path):
    """A phone video: 24 frames at 5 fps (0-4.8 s), then 24 at 30 fps. The average rate (8.1 fps)
    put the second shot at 2.97-5.93 s and gave it the first shot's caption."""
    red, blue = ct.scenes(2, 24, 12.0)
    red = (red * np.array([1.0, 0.35, 0.35])).astype(np.uint8)
    blue = (blue * np.array([0.35, 0.35, 1.0])).astype(np.uint8)
    times = np.r_[np.arange(24) * 0.2, 4.8 + np.arange(24) / 30]
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "phone.mp4", np.concatenate([red, blue]), times, fps=30)
    (folder / "phone.json").write_text(json.dumps({"captions": [
        {"start": 0, "end": 4.8, "caption": "a red scene"},
        {"start": 4.8, "end": 5.6, "caption": "a blue scene"}]}))
    config = load_config(default_config_path(), ["--config.curate.output.progress=False",
                                                  "--config.curate.cuts.min_clip_seconds=0.5"])
    run.curate(config, str(folder), str(tmp_path / "out"))
    with open(tmp_path / "out" / "clips.jsonl") as f:
        lines = sorted((json.loads(line) for line in f), key=lambda line: line["start_frame"])
    assert [(x["start_frame"], x["end_frame"]) for x in lines] == [(0, 24), (24, 48)]
    assert [x["caption"] for x in lines] == ["a red scene", "a blue scene"]
    assert [x["fps"] for x in lines] == pytest.approx([5.0, 30.0], rel=0.01)
    assert [x["seconds"] for x in lines] == pytest.approx([4.8, 0.8], abs=0.01)
    assert all(x["kept"] for x in lines)


def test_long_variable_rate_shots_split_into_equal_durations():
    """curate.cuts.max_clip_seconds on the phone video's timestamps: its 4.8 s shot at 5 fps in
    three 1.6 s clips; its 0.8 s shot at 30 fps whole (the average rate split it in two 0.4 s
    halves, both dropped as too short, and cut the first shot into 2.4 s clips over the limit)."""
    times = np.r_[np.arange(24) * 0.2, 4.8 + np.arange(25) / 30]
    boundary = [cuts.Boundary(24, "cut", 24, 24)]
    ranges = cuts.split_clips(48, boundary, 48 / 5.6, 2.0, times)
    assert ranges == [(0, 8), (8, 16), (16, 24), (24, 48)]
    assert cuts.split_clips(48, boundary, 48 / 5.6, 2.0) == [(0, 12), (12, 24), (24, 36), (36, 48)]


def test_segments_keep_times_only_off_the_constant_rate_grid(tmp_path):
    """Segment.times follows the timestamps across segment boundaries; a constant-rate file keeps
    the frame-count arithmetic it always had (times None)."""
    times = np.concatenate([np.arange(10) / 10, 1 + np.arange(60) / 30, 3 + np.arange(10) / 10])
    write_counter_video(tmp_path / "vfr.mp4", len(times), 20.0, 64, 96, times=times)
    cfg = ml_collections.ConfigDict(dict(DECODE, max_segment_seconds=1.0))
    segments = list(iter_segments(tmp_path / "vfr.mp4", cfg))
    assert sum(len(s.frames) for s in segments) == 80
    for s in segments:
        numbers = [frame_number(f) for f in s.frames]
        assert numbers == list(range(s.start_frame, s.start_frame + len(s.frames)))
        np.testing.assert_allclose(s.times[:-1], times[numbers], atol=1e-3)
    start, end, fps = segments[0].span(12, 15)  # frames 12-14 of the 30 fps part
    assert (start, end, fps) == pytest.approx((1 + 2 / 30, 1 + 5 / 30, 30.0), abs=2e-3)
    assert segments[-1].times[-1] == pytest.approx(3.9 + 0.1, abs=1e-3)
    write_counter_video(tmp_path / "cfr.mp4", 30, 12.0, 64, 96)
    (cfr,) = iter_segments(tmp_path / "cfr.mp4", DECODE)
    assert cfr.times is None and cfr.span(12, 24) == (1.0, 2.0, 12.0)
    # A byte budget ends segments too (300 s of 1080p decodes to ~56 GB): 64x96x3 bytes a frame,
    # 0.2 MB -> 11 frames a segment; the frames are the same, numbered on.
    budget = ml_collections.ConfigDict(dict(DECODE, max_segment_mb=0.2))
    parts = list(iter_segments(tmp_path / "cfr.mp4", budget))
    assert [len(p.frames) for p in parts] == [11, 11, 8] and parts[-1].last
    assert [frame_number(f) for p in parts for f in p.frames] == list(range(30))
    np.testing.assert_array_equal(np.concatenate([p.frames for p in parts]), cfr.frames)


def test_anamorphic_pixels_are_widened_by_every_reader(tmp_path):
    """Stored 32 wide x 64 tall with sample aspect ratio 2: shown 64 x 64. Encode widened it;
    curate stored it squeezed (and recorded width 32); a `--video` input read it squeezed."""
    shown = np.full((6, 64, 64, 3), 40, np.uint8)
    shown[:, 16:48, 16:48] = 220  # a square
    stored = shown[:, :, ::2]
    _write(tmp_path / "wide.mp4", stored, sar=2)
    (segment,) = iter_segments(tmp_path / "wide.mp4", DECODE)
    loaded, _ = video_io.load_video(tmp_path / "wide.mp4")
    with VideoReader(tmp_path / "wide.mp4") as reader:
        clip = reader.read([2], 64, 64)
    for video in (segment.frames, loaded, clip):
        assert video.shape[1:] == (64, 64, 3)
        rows, cols = np.nonzero(video[-1, :, :, 0] > 130)
        assert abs(np.ptp(rows) - np.ptp(cols)) <= 2  # still a square


def test_an_audio_file_with_cover_art_is_no_video(tmp_path):
    """Its only video stream is the attached picture: a 1-frame "video" at 90000 fps before."""
    path = tmp_path / "song.mp4"
    cover = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(cover, format="PNG")
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=16000)
        picture = container.add_stream("png")
        picture.width = picture.height = 32
        picture.pix_fmt = "rgb24"
        picture.disposition = av.stream.Disposition.attached_pic
        packet = av.Packet(cover.getvalue())
        packet.stream, packet.pts, packet.dts, packet.is_keyframe = picture, 0, 0, True
        container.mux(packet)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    message = r"song.mp4: no video stream \(only 1 attached cover picture\)"
    for read in (VideoReader, lambda p: list(iter_segments(p, DECODE)), video_io.load_video,
                 video_io.probe_video):
        with pytest.raises(video_io.VideoReadError, match=message):
            read(path)


def test_folders_follow_links_and_list_missing_files(tmp_path):
    """A linked sub-folder's videos were missed by both commands (rglob does not follow links);
    curate left out a link to a missing file where encode counts it. A link cycle ends."""
    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    write_counter_video(folder / "a.mp4", 4, 8.0, 64, 96)
    write_counter_video(elsewhere / "b.MP4", 4, 8.0, 64, 96)
    os.symlink(elsewhere, folder / "more")
    os.symlink(folder, elsewhere / "loop")
    os.symlink(tmp_path / "gone.mp4", folder / "c.mp4")
    entries = video_files.list_folder(folder)
    items = run.list_inputs(str(folder), video_files.VIDEO_EXTENSIONS)
    assert [e.key for e in entries] == [i.source for i in items] == [
        "a.mp4", "c.mp4", "more/b.MP4"]
    assert "link to a missing file" in entries[1].error
    os.symlink(folder / "sub", folder / "0link")  # sorted first, but the real name wins
    (folder / "sub").mkdir()
    write_counter_video(folder / "sub" / "d.mp4", 4, 8.0, 64, 96)
    assert [i.source for i in run.list_inputs(str(folder), [".mp4"])] == [
        "a.mp4", "c.mp4", "more/b.MP4", "sub/d.mp4"]
    with pytest.raises(video_io.VideoReadError, match="c.mp4: file not found"):
        list(iter_segments(items[1].path, DECODE))


def test_captions_lose_a_byte_order_mark(tmp_path):
    """Windows editors begin UTF-8 text with U+FEFF: it began the caption, and broke a JSON
    sidecar or the first manifest line."""
    write_counter_video(tmp_path / "a.mp4", 4, 8.0, 64, 96)
    write_counter_video(tmp_path / "b.mp4", 4, 8.0, 64, 96)
    (tmp_path / "a.txt").write_text("\ufeffa dog running\n", encoding="utf-8")
    (tmp_path / "b.json").write_text('\ufeff{"caption": "a cat"}', encoding="utf-8")
    assert video_files.list_folder(tmp_path)[0].caption == "a dog running"
    assert captions.read_sidecar(tmp_path / "a.mp4") == {"caption": "a dog running"}
    assert captions.read_sidecar(tmp_path / "b.mp4") == {"caption": "a cat"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('\ufeff{"file": "a.mp4", "caption": "x"}\n', encoding="utf-8")
    assert video_files.read_manifest(manifest)[0][0].caption == "x"


@pytest.mark.parametrize("caption", [["a dog", "running"], {"en": "a dog"}, 42, False])
def test_a_manifest_caption_must_be_text(tmp_path, caption):
    """A list, an object or a number became the caption's repr ("['a dog', 'running']")."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "file": "a.mp4", "caption": caption}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl line 1: \"caption\" = .*expected a string"):
        video_files.read_manifest(manifest)
    with pytest.raises(ValueError, match=r"m.jsonl line 1: \"caption\" = .*expected a string"):
        run.list_inputs(str(manifest), video_files.VIDEO_EXTENSIONS)
    manifest.write_text(json.dumps({"path": "a.mp4", "file": "a.mp4", "caption": None}) + "\n")
    assert video_files.read_manifest(manifest)[0][0].caption == ""
    assert run.list_inputs(str(manifest), ())[0].caption is None


def test_an_unreadable_sidecar_costs_curate_its_caption_only(tmp_path, monkeypatch, caplog):
    """An I/O error reading b.txt stopped the whole curate run with nothing written."""
    def unreadable(path):
        raise OSError(5, "Input/output error", str(path).replace(".mp4", ".txt"))

    monkeypatch.setattr(captions, "read_sidecar", unreadable)
    config = load_config(default_config_path())
    item = VideoItem("b.mp4", str(tmp_path / "b.mp4"))
    with caplog.at_level(logging.WARNING):
        assert run._sidecar(item, config.curate) is None
    assert "b.txt" in caplog.text and "gets no sidecar caption" in caplog.text


def test_hdr_video_is_refused_by_every_reader(tmp_path):
    """HLG (a phone's HDR default) decodes to washed-out RGB without a tone map: every reader
    refuses it by name (curate and encode count it unreadable and go on)."""
    path = tmp_path / "hlg.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.codec_context.color_trc = 18  # ARIB STD-B67 (HLG)
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    for read in (VideoReader, lambda p: list(iter_segments(p, DECODE)), video_io.load_video,
                 video_io.probe_video):
        with pytest.raises(video_io.VideoReadError, match=r"hlg.mp4: HDR \(HLG transfer\)"):
            read(path)
