"""bench/attention.py --quick: rows drawn by the real pipeline for every mix, counted per kernel."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_bench_quick_counts_every_mix():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "attention.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert {x["mix"] for x in lines} == {"bench_data", "stage1_image", "stage2_video", "stage3_hq"}
    assert len(lines) == 4 * 2 * 2  # mixes x kernels x (self, cross)
    for x in lines:
        assert x["blocks_needed"] > 0 and x["blocks_computed"] >= x["blocks_needed"]
        assert x["blocks_computed_over_needed"] <= 1.15
        assert x["needed_flops_over_dense"] <= x["computed_flops_over_dense"] <= 1.0
        assert x["computed_flops_over_needed"] >= 1.0 and x["aligned_flops_over_needed"] >= 1.0
    image_self = [x for x in lines if x["mix"] == "stage1_image" and x["attention"] == "self"]
    assert all(x["computed_flops_over_dense"] < 0.5 for x in image_self)  # many images per row
