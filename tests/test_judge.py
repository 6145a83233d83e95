"""The shapes judge: accuracy on ground truth (clean and degraded), "none" on noise and blanks,
scoring, and the directory evaluation behind `vdit eval shapes`."""

import json

import cv2
import numpy as np
import pytest

from vdit.data import video_io
from vdit.data.synthetic import SyntheticShapes
from vdit.eval.shapes import NONE, eval_shapes_dir, format_table, judge_video, score

SIZES = [(32, 32), (32, 48), (48, 32), (64, 64), (64, 96), (96, 64), (48, 80), (32, 64)]
DURATIONS = [5, 9, 17, 1]


def _ground_truth(count, seed=1, degrade=None):
    """Videos of mixed sizes and durations with their main-object targets."""
    ds = SyntheticShapes(seed=seed, num_examples=count)
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = SIZES[i % len(SIZES)]
        frames = DURATIONS[(i // len(SIZES)) % len(DURATIONS)]
        ex = ds.render(i, frames, height, width)
        target = dict(ex["objects"][0])
        if frames == 1:
            target["direction"] = None
        video = ex["video"] if degrade is None else degrade(ex["video"], rng)
        yield video, target


def _blur_noise(video, rng, sigma=1.0, noise=0.1):
    video = np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in video])
    return np.clip(video + rng.normal(0, noise, video.shape), -1, 1).astype(np.float32)


def _run(items):
    preds, targets = [], []
    for video, target in items:
        preds.append(judge_video(video))
        targets.append(target)
    return score(preds, targets)


def test_accuracy_on_ground_truth():
    scores = _run(_ground_truth(500))
    print("clean ground truth\n" + format_table(scores))
    assert scores["count"] == 500 and scores["direction_count"] == 380  # 120 are T = 1
    assert scores["color"] >= 0.98 and scores["direction"] >= 0.98
    assert scores["shape"] >= 0.9
    assert scores["none_rate"] <= 0.02


def test_accuracy_on_blurred_noisy_ground_truth():
    """Generated videos are blurry and noisy: Gaussian blur sigma 1 px + noise sigma 0.1."""
    scores = _run(_ground_truth(200, seed=2, degrade=_blur_noise))
    print("blurred + noisy ground truth\n" + format_table(scores))
    assert scores["color"] >= 0.95 and scores["direction"] >= 0.95
    assert scores["shape"] >= 0.85


def test_heavier_degradation_stays_useful():
    heavy = lambda v, rng: _blur_noise(v, rng, sigma=1.5, noise=0.2)
    scores = _run(_ground_truth(96, seed=3, degrade=heavy))
    print("heavily degraded ground truth\n" + format_table(scores))
    assert scores["color"] >= 0.9 and scores["direction"] >= 0.9 and scores["shape"] >= 0.75


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "blank", "solid"])
def test_noise_and_blank_are_none(kind):
    rng = np.random.default_rng(0)

    def replace(video, rng):
        if kind == "uniform":
            return rng.uniform(-1, 1, video.shape).astype(np.float32)
        if kind == "gaussian":
            return np.clip(rng.normal(0, 0.5, video.shape), -1, 1).astype(np.float32)
        if kind == "blank":
            return np.full(video.shape, rng.uniform(-1, 1), np.float32)
        color = rng.uniform(-1, 1, 3).astype(np.float32)  # one flat (maybe saturated) color
        return np.broadcast_to(color, video.shape).copy()

    preds, targets = [], []
    for video, target in _ground_truth(80, seed=4):
        preds.append(judge_video(replace(video, rng)))
        targets.append(target)
    scores = score(preds, targets)
    print(f"{kind} videos\n" + format_table(scores))
    # Chance is 1/6 (color), 1/3 (shape), 1/5 (direction); the judge should mostly abstain.
    assert scores["color"] <= 1 / 6 and scores["shape"] <= 1 / 3
    assert scores["direction"] <= 1 / 5
    assert scores["none_rate"] >= 0.9


def test_uint8_input_and_single_frame():
    ex = SyntheticShapes(frames=9, height=64, width=64).render(5)
    a = judge_video(ex["video"])
    b = judge_video(video_io.to_uint8(ex["video"]))
    assert (a["color"], a["shape"], a["direction"]) == (b["color"], b["shape"], b["direction"])
    one = judge_video(ex["video"][:1])
    assert one["direction"] is None and one["frames"] == 1
    assert one["color"] == ex["objects"][0]["color"]
    assert judge_video(np.zeros((1, 32, 32, 3), np.float32))["color"] == NONE


def test_judge_rejects_bad_input():
    with pytest.raises(ValueError, match="expected a video \\[T, H, W, 3\\]"):
        judge_video(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 or float"):
        judge_video(np.zeros((1, 32, 32, 3), np.int32))


def test_score_table():
    targets = [{"color": "red", "shape": "circle", "direction": "up"},
               {"color": "blue", "shape": "square", "direction": None},
               {"color": "green", "shape": "triangle", "direction": "left"}]
    preds = [{"color": "red", "shape": "circle", "direction": "up", "frames": 5},
             {"color": "blue", "shape": "circle", "direction": None, "frames": 1},
             {"color": NONE, "shape": NONE, "direction": NONE, "frames": 5}]
    scores = score(preds, targets)
    assert scores["color"] == pytest.approx(2 / 3) and scores["shape"] == pytest.approx(1 / 3)
    assert scores["direction"] == 0.5 and scores["direction_count"] == 2
    assert scores["all"] == pytest.approx(1 / 3) and scores["none_rate"] == pytest.approx(1 / 3)
    assert "color" in format_table(scores)
    with pytest.raises(ValueError, match="2 predictions for 3 targets"):
        score(preds[:2], targets)


def test_eval_shapes_dir(tmp_path):
    ds = SyntheticShapes(frames=17, height=64, width=64, seed=5)
    videos = tmp_path / "videos"
    videos.mkdir()
    lines = []
    for i in range(6):
        video_io.write_mp4(videos / f"{i}.mp4", ds[i]["video"], fps=ds.fps)
        lines.append({"file": f"videos/{i}.mp4", **ds.prompt_record(i)})
    (videos / "bad.mp4").write_bytes(b"not a video at all")
    lines.append({"file": "bad.mp4", "prompt": "a red circle moving up", "color": "red",
                  "shape": "circle", "direction": "up"})  # found under videos_dir
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = eval_shapes_dir(videos, prompts)
    scores = result["scores"]
    print("mp4 round trip\n" + format_table(scores))
    assert scores["count"] == 7 and scores["unreadable"] == 1
    assert scores["color"] == pytest.approx(6 / 7) and scores["shape"] == pytest.approx(6 / 7)
    assert scores["direction"] == pytest.approx(6 / 7)
    assert "bad.mp4" in result["items"][-1]["pred"]["reason"]


def test_eval_shapes_dir_bad_prompts(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"file": "a.mp4", "color": "pink", "shape": "circle",
                                   "direction": "up"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: color must be one of"):
        eval_shapes_dir(tmp_path, prompts)
    prompts.write_text("{oops\n")
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        eval_shapes_dir(tmp_path, prompts)
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        eval_shapes_dir(tmp_path, tmp_path / "missing.jsonl")
