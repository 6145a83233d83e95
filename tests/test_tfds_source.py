"""TFDS as a source and a sink (vdit/data/tfds_source.py), without TensorFlow and with nothing
downloaded: a tiny dataset prepared in the test, `tfds.testing.mock_data`, curated clips written
as a TFDS dataset and opened with `tfds.builder_from_directory`, and `vdit encode` over
`encode.source="tfds:..."`."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_video_files import CONFIG, TINY, vae_workdir  # noqa: F401 - vae_workdir is a fixture

from vdit.config import load_config
from vdit.curate import pipeline
from vdit.curate.decode import Segment
from vdit.curate.settings import default_config_path
from vdit.data import sources, tfds_source
from vdit.data.encode_videos import encode_videos
from vdit.data.video_files import clip_indices

CAPTIONS = ["a red circle moving right", "a blue square moving up", "green triangle", ""]


def _video(i: int, frames: int = 12) -> np.ndarray:
    ramp = np.linspace(0, 200, frames, dtype=np.float32)[:, None, None, None]
    return np.broadcast_to(ramp + 10 * i, (frames, 32, 48, 3)).astype(np.uint8)


class VditTestVideos(tfds.core.GeneratorBasedBuilder):
    """A 4-example video dataset with a `video` and a `caption` feature (registered by name)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                          encoding="zlib"),
            "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"video": _video(i), "caption": CAPTIONS[i]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    VditTestVideos(data_dir=str(folder), file_format="array_record").download_and_prepare()
    return str(folder)


def _config(source, *extra):
    config = load_config(CONFIG, TINY + list(extra))
    config.encode.source = source
    return config


def test_spec_parsing_and_errors():
    assert tfds_source.parse_spec("tfds:ucf101/ucf101_1:test") == tfds_source.TfdsSpec(
        "ucf101/ucf101_1", "test")
    assert tfds_source.parse_spec("tfds:my_videos").split == "train"
    for bad in ("tfds:", "tfds::train", "tfds:a/b/c", "tfds:a/:train", "my_videos"):
        with pytest.raises(ValueError, match="'encode.source'.*tfds:NAME"):
            tfds_source.parse_spec(bad)


def test_source_reads_video_and_caption_without_tensorflow(data_dir):
    config = _config("tfds:vdit_test_videos:train", f"--config.encode.tfds_data_dir={data_dir}")
    src = tfds_source.TfdsClipSource.from_config(config.encode)
    assert len(src) == 4 and src.video_key == "video"
    captions = []
    for i in range(4):
        clip = src[i]
        frames, height, width = src.shape(i)
        assert clip["video"].shape == (frames, height, width, 3)
        assert clip["video"].min() >= -1 and clip["video"].max() <= 1
        captions.append(clip["caption"])
        assert clip["meta"]["file"] == f"tfds:vdit_test_videos:train[{i}]"
    assert sorted(captions) == sorted(CAPTIONS)  # TFDS shuffles examples when preparing
    test = _config("tfds:vdit_test_videos:test", f"--config.encode.tfds_data_dir={data_dir}")
    assert len(tfds_source.TfdsClipSource.from_config(test.encode)) == 2
    assert "tensorflow" not in sys.modules


def test_bad_keys_and_missing_datasets_are_clear_errors(data_dir, tmp_path):
    dd = f"--config.encode.tfds_data_dir={data_dir}"
    with pytest.raises(ValueError, match="'encode.tfds_video_key' = 'clip'.*features: "
                                         r"\['caption', 'video'\]"):
        tfds_source.TfdsClipSource.from_config(
            _config("tfds:vdit_test_videos", dd, "--config.encode.tfds_video_key=clip").encode)
    with pytest.raises(ValueError, match="'encode.tfds_caption_key' = 'text'"):
        tfds_source.TfdsClipSource.from_config(
            _config("tfds:vdit_test_videos", dd, "--config.encode.tfds_caption_key=text").encode)
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'vdit_test_videos' split 'valid'"):
        tfds_source.TfdsClipSource.from_config(_config("tfds:vdit_test_videos:valid", dd).encode)
    empty = f"--config.encode.tfds_data_dir={tmp_path}"
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'vdit_test_videos'"):
        tfds_source.TfdsClipSource.from_config(_config("tfds:vdit_test_videos", empty).encode)


def test_mock_data_examples_flow_through_the_source():
    """`tfds.testing.mock_data` (random examples from the builder's features, no files)."""
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        data = tfds.data_source("vdit_test_videos", split="train")
        src = tfds_source.TfdsClipSource(data, tfds_source.parse_spec("tfds:vdit_test_videos"),
                                         shapes=[(1, 16, 16)])
        assert len(src) == 3
        for i in range(3):
            clip = src[i]
            assert clip["video"].shape == (1, 16, 16, 3) and isinstance(clip["caption"], str)


def test_curated_clips_as_a_tfds_dataset_and_back(tmp_path):
    shards = [[{"frames": _video(i, 9), "caption": CAPTIONS[i], "recaption": f"re {i}",
                "fps": 8.0, "meta": {"source": f"v{i}.mp4", "motion": 0.5}} for i in (0, 1)],
              [{"frames": _video(2, 9), "caption": CAPTIONS[2], "recaption": "", "fps": 8.0,
                "meta": {"source": "v2.mp4"}}]]
    folder = tfds_source.write_tfds_clips(shards, str(tmp_path), name="my_clips")
    builder = tfds.builder_from_directory(str(folder))
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["train"].num_shards == 2
    assert set(builder.info.features.keys()) == {"frames", "caption", "recaption", "meta", "fps"}
    data = builder.as_data_source(split="train")
    assert data[1]["caption"].decode() == CAPTIONS[1]  # written in order, no shuffle
    np.testing.assert_array_equal(data[2]["frames"], _video(2, 9))

    config = _config("tfds:my_clips", f"--config.encode.tfds_data_dir={tmp_path}",
                     "--config.encode.shapes=[(5, 32, 32)]", "--config.encode.shape_weights=[1.0]")
    src = tfds_source.TfdsClipSource.from_config(config.encode)
    assert src.video_key == "frames"  # found when tfds_video_key is empty
    clip = src[0]
    assert clip["video"].shape == (5, 32, 32, 3) and clip["meta"]["motion"] == 0.5
    assert clip["meta"]["source_fps"] == 8.0
    with pytest.raises(ValueError, match="no clips"):
        tfds_source.write_tfds_clips([], str(tmp_path), name="none")


def test_encode_a_tfds_source(data_dir, vae_workdir, tmp_path):  # noqa: F811 - fixture
    config = _config("tfds:vdit_test_videos:train", f"--config.encode.tfds_data_dir={data_dir}",
                     f"--config.encode.vae_workdir={vae_workdir}")
    summary = encode_videos(config, str(tmp_path / "latents"))
    src = tfds_source.TfdsClipSource.from_config(config.encode)
    assert summary["records"] + summary["skipped"] == 4
    assert summary["records"] == sum(src.shape(i)[0] <= 12 for i in range(4))
    latents = sources.LatentShardSource(str(tmp_path / "latents"))
    kept = [src[i]["caption"] for i in range(4) if src.shape(i)[0] <= 12]
    assert [latents[i]["caption"] for i in range(len(latents))] == kept
    assert latents[0]["meta"]["file"] == "tfds:vdit_test_videos:train[0]"


def test_variable_rate_clip_sampled_by_its_frame_times(tmp_path):
    """A variable-rate clip through curate's line -> TFDS -> the reader: 12 frames at 30 fps, then
    12 at 6 fps (average ~9.6 fps). Sampled at 4 fps by its frames' own times (curate's `times`),
    not on its average-rate grid, which would land in the wrong frames; a record without
    times (older curate output) is sampled at its average rate; a wrong list is an error."""
    times = np.concatenate([np.arange(12) / 30, 11 / 30 + np.arange(1, 13) / 6])
    ends = np.append(times, times[-1] + 1 / 6)  # curate's Segment.times: also the last's end
    frames = np.broadcast_to((8 * np.arange(24, dtype=np.uint8))[:, None, None, None],
                             (24, 32, 48, 3)).copy()  # frame i is uniformly 8 * i
    cfg = load_config(default_config_path()).curate
    segment = Segment(0, 0, frames, 24 / ends[-1], last=True, times=ends)
    line = pipeline.analyse_clip(segment, pipeline.VideoItem("v.mp4", "v.mp4"), 0, 24, None,
                                 cfg).line
    np.testing.assert_allclose(line["times"], times, atol=1e-6)
    clip = {"frames": frames, "caption": "vfr", "recaption": "", "fps": line["fps"], "meta": line}
    old = {**clip, "meta": {k: v for k, v in line.items() if k != "times"}}
    bad = {**clip, "meta": {**line, "times": line["times"][:-1]}}
    tfds_source.write_tfds_clips([[clip, old, bad]], str(tmp_path), name="vfr_clips")
    config = _config("tfds:vfr_clips", f"--config.encode.tfds_data_dir={tmp_path}",
                     "--config.encode.shapes=[(5, 16, 16)]", "--config.encode.shape_weights=[1.0]",
                     "--config.encode.fps=4.0")
    src = tfds_source.TfdsClipSource.from_config(config.encode)
    by_time = clip_indices(24, line["fps"], 5, 4.0, times=times)
    by_rate = clip_indices(24, line["fps"], 5, 4.0)
    assert not np.array_equal(by_time, by_rate)
    for index, want in ((0, by_time), (1, by_rate)):
        out = src[index]
        seen = np.round((out["video"][:, 0, 0, 0] + 1) * 127.5 / 8).astype(int)
        np.testing.assert_array_equal(seen, want)
        assert out["meta"]["first_frame"] == want[0] and "times" not in out["meta"]
    # The frames taken are 1/4 s apart in the video, as asked, up to the nearest frame (the
    # 6 fps part: 1/12 s either way); on the average-rate grid they are not.
    assert np.abs(np.diff(times[by_time]) - 0.25).max() <= 1 / 12 + 1e-9
    assert np.abs(np.diff(times[by_rate]) - 0.25).max() > 0.15
    with pytest.raises(ValueError, match=r"meta 'times' must be 24 increasing frame times"):
        src[2]
