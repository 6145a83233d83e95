"""Video files and frame helpers: mp4 round trip, gif, grid PNG, errors, resize/crop, sampling,
upright images and videos."""

import av
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vdit.curate.decode import iter_segments
from vdit.data import video_io
from vdit.data.clip_decode import VideoReader
from vdit.data.synthetic import SyntheticShapes


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def clip():
    return SyntheticShapes(frames=17, height=64, width=96, fps=8).render(2)["video"]


def test_mp4_round_trip(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    video_io.write_mp4(path, clip, fps=8)
    frames, fps = video_io.load_video(path)
    assert frames.shape == (17, 64, 96, 3) and frames.dtype == np.uint8 and fps == 8.0
    psnr = _psnr(frames, video_io.to_uint8(clip))
    print(f"mp4 round trip PSNR {psnr:.1f} dB")
    assert psnr > 30
    as_float = video_io.read_video(path, as_float=True)
    assert as_float.dtype == np.float32 and -1 <= as_float.min() and as_float.max() <= 1
    np.testing.assert_allclose(as_float, video_io.to_float(frames))


def test_mp4_fractional_fps_and_uint8_input(tmp_path, clip):
    path = tmp_path / "ntsc.mp4"
    video_io.write_video(path, video_io.to_uint8(clip[:5]), fps=29.97)
    frames, fps = video_io.load_video(path)
    assert frames.shape[0] == 5 and fps == pytest.approx(29.97, abs=0.01)


def test_mp4_needs_even_size(tmp_path):
    with pytest.raises(ValueError, match="even height and width, got 33x64"):
        video_io.write_mp4(tmp_path / "odd.mp4", np.zeros((3, 33, 64, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="expected a video \\[T, H, W, 3\\]"):
        video_io.write_mp4(tmp_path / "bad.mp4", np.zeros((32, 32, 3), np.uint8), fps=8)


def test_gif_write(tmp_path, clip):
    path = tmp_path / "clip.gif"
    video_io.write_video(path, clip[:9], fps=8)
    with Image.open(path) as im:
        assert im.size == (96, 64) and im.n_frames == 9
    frames = video_io.read_video(path)
    assert frames.shape == (9, 64, 96, 3)
    assert _psnr(frames, video_io.to_uint8(clip[:9])) > 25


def test_unsupported_suffix(tmp_path, clip):
    with pytest.raises(ValueError, match="unsupported suffix '.avi'"):
        video_io.write_video(tmp_path / "x.avi", clip, fps=8)


def test_grid_png(tmp_path, clip):
    path = tmp_path / "grid.png"
    batch = np.stack([clip, -clip])
    video_io.write_grid_png(path, batch, max_frames=4, pad=2)
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape == (2 * (64 + 2) + 2, 4 * (96 + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2:66, 2:98], video_io.to_uint8(clip[0]))
    np.testing.assert_array_equal(grid[2:66, -98:-2], video_io.to_uint8(clip[-1]))
    mixed = video_io.grid_image([clip[:1], clip[:5, :32, :48]], max_frames=8)
    assert mixed.shape == (2 * (64 + 2) + 2, 5 * (96 + 2) + 2, 3)
    with pytest.raises(ValueError, match="at least one video"):
        video_io.grid_image([])


def test_corrupt_and_missing_files(tmp_path, clip):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00junk" * 200)
    with pytest.raises(video_io.VideoReadError, match="garbage.mp4"):
        video_io.read_video(garbage)
    good = tmp_path / "good.mp4"
    video_io.write_mp4(good, clip, fps=8)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(video_io.VideoReadError, match="truncated.mp4"):
        video_io.read_video(truncated)
    with pytest.raises(video_io.VideoReadError, match="missing.mp4: file not found"):
        video_io.read_video(tmp_path / "missing.mp4")
    assert issubclass(video_io.VideoReadError, OSError)


def test_resize_and_crop(clip):
    small = video_io.resize_video(clip, 32, 48)
    assert small.shape == (17, 32, 48, 3) and small.dtype == np.float32
    big = video_io.resize_video(video_io.to_uint8(clip), 128, 192)
    assert big.shape == (17, 128, 192, 3) and big.dtype == np.uint8
    crop = video_io.center_crop(clip, 64, 64)
    np.testing.assert_array_equal(crop, clip[:, :, 16:80])
    square = video_io.resize_and_crop(clip, 32, 32)  # 64x96 -> 32x48 -> center 32x32
    np.testing.assert_allclose(square, video_io.center_crop(small, 32, 32))
    assert video_io.resize_and_crop(clip, 128, 64).shape == (17, 128, 64, 3)
    with pytest.raises(ValueError, match="crop 80x64 does not fit in frames of 64x96"):
        video_io.center_crop(clip, 80, 64)


def test_frame_sampling():
    idx = video_io.sample_indices(num_source=90, source_fps=30, frames=9, target_fps=8)
    np.testing.assert_array_equal(idx, np.round(np.arange(9) * 30 / 8 + 1e-6).astype(int))
    late = video_io.sample_indices(90, 30, 5, 10, start_time=1.0)
    np.testing.assert_array_equal(late, [30, 33, 36, 39, 42])
    video = np.arange(90)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    frames = video[video_io.sample_indices(len(video), 30, 5, 10, start_time=1.0)]
    np.testing.assert_array_equal(frames[:, 0, 0, 0], late)
    assert video_io.max_start_time(90, 30, 17, 8) == pytest.approx(89 / 30 - 2)
    with pytest.raises(ValueError, match="too short for 17 frames at 8 fps"):
        video_io.sample_indices(30, 30, 17, 8)
    with pytest.raises(ValueError, match="fps must be > 0"):
        video_io.sample_indices(30, 0, 5, 8)


def test_images_come_upright_by_their_exif_orientation(tmp_path):
    """A phone photo stored landscape with Orientation 6 (rotate 90 degrees clockwise to view)."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :8] = 255  # the left edge of the stored frame becomes the top when viewed
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    with Image.open(tmp_path / "photo.png") as img:
        pixels = video_io.image_rgb(img)
    assert pixels.shape == (32, 16, 3)
    assert pixels[:8].min() == 255 and pixels[8:].max() == 0


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_videos_come_upright_by_their_display_rotation(tmp_path, degrees):
    """A phone video stored landscape with a display rotation comes out as players show it, from
    every decoder: whole-file load, the clip reader of `vdit encode`, curation's segments."""
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :16] = 255  # a bright left edge, stored
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        stream.set_display_rotation(degrees)  # counterclockwise, as frame.rotation reads it
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    shown = np.rot90(stored, degrees // 90)
    loaded = video_io.load_video(path)[0]
    assert loaded.shape == (3, *shown.shape)
    assert np.abs(loaded.astype(int) - shown).max() < 40
    # Shrunk as decoded (`vdit sample --video` on a 4K phone clip): half size still covers
    # half the shown size, in the upright orientation; only the first frames read.
    h, w = shown.shape[:2]
    small = video_io.load_video(path, first=2, cover=(h // 2, w // 2))[0]
    halved = shown.reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))
    assert small.shape == (2, h // 2, w // 2, 3) and np.abs(small - halved).max() < 40
    assert video_io.load_video(path, cover=(2 * h, w))[0].shape == loaded.shape  # never enlarged
    with VideoReader(path) as reader:
        crop = reader.read([0, 2], *shown.shape[:2])
    assert np.abs(crop.astype(int) - shown).max() < 40
    segments = iter_segments(path, ml_collections.ConfigDict(
        dict(max_segment_seconds=10, short_side=0, default_fps=8)))
    assert np.abs(next(segments).frames.astype(int) - shown).max() < 40


@pytest.mark.parametrize("pixels, want", [
    (np.full((4, 6), 32768, np.uint16), 128),  # 16-bit grey: scaled, not clipped to white
    (np.full((4, 6), 200, np.uint16), 1),
    (np.full((4, 6), 0.5, np.float32), 128),  # float grey in [0, 1]
])
def test_deep_grey_images_are_scaled_to_8_bits(tmp_path, pixels, want):
    path = tmp_path / "grey.tiff"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as img:
        rgb = video_io.image_rgb(img)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert np.all(rgb == want), rgb[0, 0]


def test_mp4_writes_are_deterministic(tmp_path, clip):
    """The same frames give the same file (a threaded x264 encode did not: the judge reads the
    files, so `make demo`'s table moved between identical runs)."""
    for i in range(3):
        video_io.write_mp4(tmp_path / f"{i}.mp4", clip, fps=8)
    data = [(tmp_path / f"{i}.mp4").read_bytes() for i in range(3)]
    assert data[0] == data[1] == data[2]
