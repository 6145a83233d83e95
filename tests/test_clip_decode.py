"""Bounded clip decode (vdit/data/clip_decode.py): the frames asked for, found by seeking in a
video with few keyframes, resized while decoding; counts without stored frame numbers; bad files
fail naming the file; a curated content box crops black bars before the resize."""

from fractions import Fraction

import av
import ml_collections
import numpy as np
import pytest

from vdit.curate.decode import iter_segments
from vdit.curate.scores import border_box
from vdit.data import video_io
from vdit.data.clip_decode import ContentBox, ContentBoxError, VideoReader, cover_size, crop_layout
from vdit.data.counter_video import frame_number, write_counter_video
from vdit.data.video_files import ClipTooShortError, clip_indices


@pytest.fixture(scope="module")
def counter(tmp_path_factory):
    path = tmp_path_factory.mktemp("counter") / "counter.mp4"
    write_counter_video(path, 200, 24.0, 64, 96, gop=50)
    return path


@pytest.mark.parametrize("indices", [[0, 1, 2], [49, 50, 51], [120, 122, 124, 124], [199]])
def test_read_seeks_to_the_frames_asked_for(counter, indices):
    with VideoReader(counter) as reader:
        assert (reader.num_frames, reader.fps) == (200, 24.0)
        frames = reader.read(indices, 64, 96)
        assert [frame_number(f) for f in frames] == indices
        # a keyframe every 50 frames: at most the frames since the last one are decoded
        assert reader.decoded <= indices[-1] - 50 * (indices[0] // 50) + 1 + 8


def test_one_reader_reads_again_from_any_frame(counter):
    with VideoReader(counter) as reader:
        for indices in ([0, 1, 2], [0, 1], [199], [0], [120, 121], [5]):
            assert [frame_number(f) for f in reader.read(indices, 64, 96)] == indices


def test_read_resizes_while_decoding_like_a_full_decode(counter):
    full, _ = video_io.load_video(counter)
    with VideoReader(counter) as reader:
        clip = reader.read([100, 101], 24, 24)  # 64x96 covers 24x24 at 24x36, then crops
    assert clip.shape == (2, 24, 24, 3) and clip.dtype == np.uint8
    reference = video_io.resize_and_crop(full[[100, 101]], 24, 24)
    assert np.abs(clip.astype(int) - reference.astype(int)).mean() < 6
    assert cover_size(1080, 1920, 256, 256) == (256, 455)


def test_variable_frame_rate_frames_by_timestamp(tmp_path):
    """A phone-style variable frame rate (10 fps, then 30, then 10): frames are numbered by the
    rank of their timestamps (timestamp x average fps repeats and skips numbers: wrong frames, or
    'ended before frame N'), and resampling picks the frame nearest each time."""
    times = np.concatenate([np.arange(10) / 10, 1 + np.arange(60) / 30, 3 + np.arange(10) / 10])
    path = tmp_path / "vfr.mp4"
    write_counter_video(path, len(times), 20.0, 64, 96, gop=25, times=times)
    with VideoReader(path) as reader:
        assert reader.num_frames == 80
        np.testing.assert_allclose(reader.times, times, atol=1e-3)
        assert [frame_number(f) for f in reader.read([31, 32, 33], 64, 96)] == [31, 32, 33]
        idx = clip_indices(80, reader.fps, 8, 4.0, times=reader.times)  # 1.75 s of the middle
        got = [frame_number(f) for f in reader.read(idx, 64, 96)]
    wanted = (times[-1] - 1.75) / 2 + np.arange(8) / 4.0
    assert got == [int(np.abs(times - t).argmin()) for t in wanted]
    with pytest.raises(ClipTooShortError, match="lasts 3.900 s"):
        clip_indices(80, 20.0, 17, 4.0, times=times)


def test_frame_count_without_a_stored_count(tmp_path):
    path = tmp_path / "ramp.gif"
    video_io.write_gif(path, np.repeat(np.arange(0, 250, 25, dtype=np.uint8), 16 * 16 * 3)
                       .reshape(10, 16, 16, 3), fps=8.0)
    with VideoReader(path) as reader:
        assert reader.num_frames == 10
        assert reader.read([4], 16, 16)[0].mean() == pytest.approx(100, abs=3)


def test_bad_files_and_indices_fail_clearly(counter, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0" * 500)
    with pytest.raises(video_io.VideoReadError, match="broken.mp4"):
        VideoReader(broken)
    with pytest.raises(video_io.VideoReadError, match="missing.mp4: file not found"):
        VideoReader(tmp_path / "missing.mp4")
    with VideoReader(counter) as reader:
        with pytest.raises(video_io.VideoReadError, match="has 200 frames; frame 200"):
            reader.read([199, 200], 8, 8)
        with pytest.raises(ValueError, match="ascending"):
            reader.read([5, 3], 8, 8)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(counter.read_bytes()[: counter.stat().st_size // 2])
    with pytest.raises(video_io.VideoReadError, match="cut.mp4"):
        with VideoReader(cut) as reader:
            reader.read([199], 8, 8)


def test_anamorphic_pixels_are_widened_as_players_show_them(tmp_path):
    """A 64x64 stored frame with sample aspect ratio 2 is shown 64 tall x 128 wide: a square in
    the picture (stored 16 rows x 8 columns) comes out square."""
    stored = np.full((64, 64, 3), 40, np.uint8)
    stored[24:40, 28:36] = 220
    path = tmp_path / "anamorphic.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv444p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    with VideoReader(path) as reader:
        frame = reader.read([1], 32, 64)[0, :, :, 0]
    rows, cols = np.nonzero(frame > 130)
    assert np.ptp(rows) + 1 == 8 and np.ptp(cols) + 1 == 8  # 16x16 shown, halved into 32x64


def _phone_video(path, shown: np.ndarray, degrees: int) -> None:
    """Writes upright frames `shown` [T, H, W, 3] as a phone does: stored turned back, with a
    display rotation of `degrees` (counterclockwise) that players apply."""
    stored = np.rot90(shown, -(degrees // 90), axes=(1, 2))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = stored.shape[2], stored.shape[1], "yuv444p"
        if degrees:
            stream.set_display_rotation(degrees)
        for frame in stored:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("degrees, bars", [(0, (0, 0, 24, 24)), (90, (16, 16, 0, 0)),
                                           (-90, (8, 24, 4, 0))])
def test_a_curated_content_box_crops_the_bars_before_the_resize(tmp_path, degrees, bars):
    """curate measures `box` on upright frames decoded at decode.short_side (here half size)
    and records that size as the line's height/width; the reader crops those bars off the
    upright, full-size frame before it scales, whatever the display rotation."""
    top, bottom, left, right = bars
    height, width = (64, 96) if degrees == 0 else (96, 64)
    yy, xx = np.mgrid[:height, :width]
    shown = np.zeros((3, height, width, 3), np.uint8)
    shown[:, :, :, 0] = 60 + (120 * yy / height).astype(np.uint8)[None]  # red: row
    shown[:, :, :, 1] = 60 + (120 * xx / width).astype(np.uint8)[None]  # green: column
    shown[:, :, :, 2] = 200
    shown[:, :top], shown[:, height - bottom:] = 0, 0
    shown[:, :, :left], shown[:, :, width - right:] = 0, 0
    path = tmp_path / "bars.mp4"
    _phone_video(path, shown, degrees)
    segment = next(iter_segments(path, ml_collections.ConfigDict(
        dict(max_segment_seconds=10, short_side=32, default_fps=8))))
    box = border_box(segment.frames, 30.0)  # what curate's clip_scores records
    assert box == tuple(v // 2 for v in bars)
    content = ContentBox(*box, *segment.frames.shape[1:3])
    with VideoReader(path) as reader:
        clip = reader.read([1], 16, 16, content)[0]
    inside = shown[1:2, top:height - bottom, left:width - right]
    reference = video_io.resize_and_crop(inside, 16, 16)[0]
    assert np.abs(clip.astype(int) - reference).mean() < 8
    assert clip.max(axis=2).min() > 40  # no bar left: every pixel is picture
    with VideoReader(path) as reader, pytest.raises(ContentBoxError, match="another aspect"):
        reader.read([1], 16, 16, ContentBox(*box, height, height))


def test_crop_layout_centres_on_the_region():
    assert crop_layout(64, 96, 32, 32) == ((32, 48), 0, 8)  # no region: cover and centre
    # the middle half of 64x128's columns (64x64) covers 32x32 at half size: 32x64, crop at 16
    assert crop_layout(64, 128, 32, 32, (0.0, 1.0, 0.25, 0.75)) == ((32, 64), 0, 16)
    assert crop_layout(64, 128, 32, 32, (0.0, 1.0, 0.0, 0.5)) == ((32, 64), 0, 0)
