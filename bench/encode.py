"""Encode-side video decode benchmark: peak memory and clips/s of `vdit encode`'s clip source
(`VideoClipSource`, the part that reads a user's videos) on a short and a long high-resolution
video, which it generates itself (counter videos, `vdit/data/counter_video.py`: 1080p, 24 fps,
a keyframe every 250 frames).

Each video is measured in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own: the child
imports vdit, records its RSS, then takes `--clips` clips (the shape of `--shape`, from the middle
of the video, as encode does) and checks, by the frame number each frame shows, that the seek
landed on the clip's first frame. One JSON line per video (peak and baseline RSS, clips/s, what a
whole-video decode at native size would hold), then a summary line with the ratio of the long
video's peak RSS to the short one's (target: at most 1.2).

    .venv/bin/python bench/encode.py [--quick] [--minutes 1 10] [--size 1080x1920]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from vdit.data.clip_decode import VideoReader
from vdit.data.counter_video import frame_number, write_counter_video
from vdit.data.video_files import VideoClipSource, VideoEntry

TARGET_RATIO = 1.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny videos (2 s and 20 s at 128x192), seconds in all; as tests run it")
    p.add_argument("--minutes", type=float, nargs=2, default=(1.0, 10.0),
                   metavar=("SHORT", "LONG"), help="lengths of the two videos")
    p.add_argument("--size", default="1080x1920", help="HEIGHTxWIDTH of the videos")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--gop", type=int, default=250, help="frames between keyframes")
    p.add_argument("--shape", default="33x256x256", help="FRAMESxHEIGHTxWIDTH of each clip")
    p.add_argument("--clips", type=int, default=8, help="clips taken per video")
    p.add_argument("--dir", help="folder for the videos (kept; reused when present)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one video
    return p.parse_args(argv)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(path: str, shape: tuple[int, int, int], clips: int) -> dict:
    """Runs in the child: clips of one video through encode's clip source."""
    baseline = _rss_mib()
    source = VideoClipSource([VideoEntry(path, "", os.path.basename(path))] * clips, [shape])
    start = time.perf_counter()
    for i in range(clips):
        clip = source[i]
    seconds = time.perf_counter() - start
    first = clip["meta"]["first_frame"]
    with VideoReader(path) as reader:
        native = reader.read([first], reader.height, reader.width)[0]
        frames, height, width = reader.num_frames, reader.height, reader.width
    if frame_number(native) != first:
        raise RuntimeError(f"seek check failed: frame {first} of {path} shows "
                           f"{frame_number(native)}")
    return {"video": os.path.basename(path), "frames": frames, "size": f"{height}x{width}",
            "clip": list(clip["video"].shape), "clips": clips,
            "clips_per_s": clips / seconds, "peak_rss_mib": _rss_mib(),
            "baseline_rss_mib": baseline, "seek_check": True,
            "whole_video_native_gib": frames * height * width * 3 / 2**30}


def _child(path: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", path, "--shape", args.shape,
               "--clips", str(args.clips)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.child:
        print(json.dumps(measure(args.child, shape, args.clips)))
        return []
    if args.quick:
        args.minutes, args.size, args.gop, args.clips = (2 / 60, 20 / 60), "128x192", 48, 3
        args.shape = "9x64x64"
    height, width = (int(v) for v in args.size.split("x"))
    folder = args.dir or tempfile.mkdtemp(prefix="vdit-bench-encode-")
    os.makedirs(folder, exist_ok=True)
    out = []
    for name, minutes in zip(("short", "long"), args.minutes, strict=True):
        frames = round(minutes * 60 * args.fps)
        path = os.path.join(folder, f"{name}-{frames}f-{height}x{width}-g{args.gop}.mp4")
        start = time.perf_counter()
        if not os.path.isfile(path):
            write_counter_video(path + ".tmp.mp4", frames, args.fps, height, width, args.gop)
            os.replace(path + ".tmp.mp4", path)
        row = {"which": name, "minutes": minutes, "generate_s": time.perf_counter() - start,
               **_child(path, args)}
        out.append(row)
        print(json.dumps(row))
    if not args.dir:
        shutil.rmtree(folder)
    ratio = out[1]["peak_rss_mib"] / out[0]["peak_rss_mib"]
    summary = {"summary": True, "long_over_short_peak_rss": ratio, "target": TARGET_RATIO,
               "ok": ratio <= TARGET_RATIO, "quick": args.quick}
    print(json.dumps(summary))
    return out + [summary]


if __name__ == "__main__":
    main()
