"""`vdit serve` (vdit/serve.py): one model load, queued requests, clear errors for bad requests,
and the page in a real browser (Debian's headless Chromium driven by Playwright) against a tiny
shapes run trained in the fixture: type a prompt, wait for the video, check it plays and that the
served file has the asked frames and size."""

import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from test_periodic_samples import VAE, latents, vae_workdir  # noqa: F401 - fixtures
from train_testing import train_tiny

from vdit import cli, serve, serve_page, serve_request
from vdit.data import video_io
from vdit.serve import Studio
from vdit.serve_http import make_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, latents, vae_workdir):  # noqa: F811 - fixtures
    """A 2-step tiny shapes run (5 frames 16x16, 2 sampling steps by default) behind a server on
    a free loopback port."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train_tiny("shapes_dit", workdir, latents, 2, *VAE, "--config.train.i2v_rate=0.0",
               f"--config.encode.vae_workdir={vae_workdir}", "--config.sample.steps=2",
               "--config.sample.frames=5", "--config.sample.height=16", "--config.sample.width=16")
    studio = Studio(workdir, str(tmp_path_factory.mktemp("serve")))
    server = make_server(studio, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield studio, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url, body):
    request = urllib.request.Request(url + "/api/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _get(url):
    with urllib.request.urlopen(url) as r:
        return json.load(r)


def _wait(url, job_id):
    import time

    for _ in range(600):
        job = _get(f"{url}/api/jobs/{job_id}")
        if job["state"] in ("done", "error"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_cli_has_serve():
    args = cli.build_parser().parse_args(["serve", "--workdir", "runs/dit", "--port", "0"])
    assert (args.command, args.workdir, args.port, args.host) == ("serve", "runs/dit", 0, "127.0.0.1")


def test_bad_requests_get_clear_messages(studio):
    _, url = studio
    for body, message in (({"prompt": " "}, "prompt: type what the video should show"),
                          ({"prompt": "a red circle", "frames": 6},
                           "'frames' = 6: frames must be 1+4k"),
                          ({"prompt": "a red circle", "size": "20x20"},
                           "20x20: height must be a positive multiple of 8"),
                          ({"prompt": "a red circle", "size": "big"}, "expected HEIGHTxWIDTH"),
                          ({"prompt": "a red circle", "steps": "many"}, "steps: 'many' is not an integer"),
                          ({"prompt": "a red circle", "steps": 0}, "steps: 0 is out of range"),
                          ({"prompt": "a red circle", "image": "data:image/png;base64,AAAA"},
                           "first image: cannot read it"),
                          ({"prompt": "a red circle", "frames": 9.7}, "frames: 9.7 is not an integer"),
                          ({"prompt": "a red circle", "frames": True}, "frames: True is not an integer"),
                          ({"prompt": ["a", "b"]}, "prompt: expected text, got list"),
                          ({"prompt": "a red circle", "image": 5}, "image: expected text, got int"),
                          ({"prompt": "a red circle", "image": {"a": 1}},
                           "image: expected text, got dict"),
                          # the CLI's --seed range (prompt i of `vdit sample` uses --seed + i)
                          ({"prompt": "a red circle", "seed": 2**32},
                           "seed: 4294967296 is out of range [0, 4294967295]"),
                          # 16x the default clip (5x16x16) at most: 5x1024x1024 is refused
                          ({"prompt": "a red circle", "size": "1024x1024"},
                           "5x1024x1024 = 5,242,880 pixels is over this server's limit of 20,480")):
        status, out = _post(url, body)
        assert status == 400 and message in out["error"], (body, out)
    inputs = os.path.join(studio[0].out_dir, "inputs")
    before = len(os.listdir(inputs)) if os.path.isdir(inputs) else 0
    status, _ = _post(url, {"prompt": "a red circle", "frames": 6, "image": _png_data_url()})
    assert status == 400 and (len(os.listdir(inputs)) if os.path.isdir(inputs) else 0) == before
    # a cross-site form or text/plain post, a foreign Host (DNS rebinding), a bad Content-Length
    for headers, code, message in (({"Content-Type": "text/plain"}, 415, "send application/json"),
                                   ({"Content-Type": "application/json", "Host": "evil.example"},
                                    403, "Host 'evil.example' is not this server"),
                                   ({"Content-Type": "application/json", "Content-Length": "abc"},
                                    400, "Content-Length"),
                                   ({"Content-Type": "application/json", "Content-Length": "-1"},
                                    400, "Content-Length: expected the body's size")):
        request = urllib.request.Request(url + "/api/generate", b'{"prompt": "a red circle"}',
                                         headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)  # a negative length hung the request
        assert e.value.code == code and message in json.load(e.value)["error"], headers


def _png_data_url():
    import base64
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_job_numbers_continue_after_the_folders_videos(tmp_path):
    """A restarted server must not overwrite the videos an earlier one wrote."""
    assert serve._next_id(str(tmp_path)) == 1
    for name in ("0001.mp4", "0007.mp4", "check.mp4", "0009.txt"):
        (tmp_path / name).write_bytes(b"")
    assert serve._next_id(str(tmp_path)) == 8


@pytest.mark.parametrize("header, want", [
    ("bytes=0-9", (0, 9)), ("bytes=95-", (95, 99)), ("bytes=-5", (95, 99)),
    ("bytes=90-500", (90, 99)), ("bytes=100-", "unsatisfiable"), ("bytes=-0", "unsatisfiable"),
    ("bytes=10-5", None), ("bytes=abc-", None), ("bytes=0-1,5-9", None), ("", None)])
def test_byte_ranges(header, want):
    assert serve_request.byte_range(header, 100) == want


def test_requests_are_queued_and_served(studio):
    s, url = studio
    ids = [_post(url, {"prompt": p, "seed": i})[1]["id"]
           for i, p in enumerate(["a red circle moving right", "a blue square moving up"])]
    jobs = [_wait(url, i) for i in ids]
    assert [j["state"] for j in jobs] == ["done", "done"], jobs
    # No guidance asked: the run's own (so a two-expert run's sample.guidance_2 applies too).
    assert s.jobs[ids[0]].job.args.guidance is None and s.jobs[ids[0]].params["guidance"] > 0
    assert [j["id"] for j in _get(url + "/api/jobs")["jobs"][:2]] == ids[::-1]  # newest first
    with urllib.request.urlopen(url + jobs[0]["video"]) as r:
        data = r.read()
    path = os.path.join(s.out_dir, "check.mp4")
    with open(path, "wb") as f:
        f.write(data)
    video, _ = video_io.load_video(path)
    assert video.shape == (5, 16, 16, 3)
    request = urllib.request.Request(url + jobs[0]["video"], headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(request) as r:
        assert r.status == 206 and r.read() == data[:10]


def _browser():
    try:
        from playwright.sync_api import sync_playwright  # optional: the test extra
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    if not os.path.isfile(CHROMIUM):
        pytest.skip("no Chromium: install Debian's package (apt-get install -y chromium); "
                    ".ci/run does")
    return sync_playwright


def test_page_in_a_real_browser(studio, tmp_path):
    _, url = studio
    sync_playwright = _browser()
    with sync_playwright() as p:
        # A fresh profile folder (Playwright passes it as --user-data-dir).
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1000, "height": 700})
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('size').value !== ''")
            assert page.input_value("#frames") == "5" and page.input_value("#size") == "16x16"
            # the default guidance is a hint, not a value the page would send as asked for
            assert page.input_value("#guidance") == ""
            assert page.get_attribute("#guidance", "placeholder").startswith("default ")

            page.fill("#prompt", "")  # a bad request: the message shows on the page
            page.click("#generate")
            page.wait_for_selector("#error", state="visible")
            assert "prompt: type what the video should show" in page.inner_text("#error")

            page.fill("#prompt", "a green triangle moving left")
            page.fill("#frames", "9")
            page.fill("#size", "16x32")
            page.click("#generate")
            page.wait_for_function("document.getElementById('result').readyState >= 2",
                                   timeout=120_000)
            assert page.is_hidden("#error")
            info = page.evaluate("""() => { const v = document.getElementById('result');
                return {duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                        src: v.getAttribute('src')}; }""")
            assert (info["width"], info["height"]) == (32, 16)
            # It plays: the playback position moves.
            page.wait_for_function("document.getElementById('result').currentTime > 0.05")
            assert page.get_attribute("#download", "href") == info["src"]
            assert "a green triangle moving left" in page.inner_text("#recent")
            page.screenshot(path=os.environ.get("VDIT_SERVE_SCREENSHOT",
                                                str(tmp_path / "page.png")))
        finally:
            browser.close()
    with urllib.request.urlopen(url + info["src"]) as r:
        (tmp_path / "served.mp4").write_bytes(r.read())
    video, fps = video_io.load_video(tmp_path / "served.mp4")
    assert video.shape == (9, 16, 32, 3)
    assert np.isclose(info["duration"], 9 / fps, atol=1.5 / fps)  # the browser's duration


def test_out_of_memory_job_says_what_to_shrink(studio, monkeypatch):
    """A job that runs out of device memory carries the CLI's short message, naming the
    request's fields."""
    from vdit.pipelines.generate import Generator

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1234 bytes")

    _, url = studio
    monkeypatch.setattr(Generator, "text_to_video", oom)
    job = _wait(url, _post(url, {"prompt": "a red circle", "seed": 3})[1]["id"])
    assert job["state"] == "error" and job["error"] == (
        "out of device memory sampling 5x16x16 (frames x height x width): try a smaller size or "
        "fewer frames"), job


def test_a_step_folder_samples_that_steps_weights(studio, monkeypatch):
    """--workdir RUN/checkpoints/STEP (as `vdit export` takes it) loads that step, with the run's
    latent statistics (RUN/latents by default, not STEP/latents)."""
    from vdit.pipelines import run_parts
    from vdit.sample_cli import load_generator

    s, _ = studio
    steps = sorted(int(n) for n in os.listdir(os.path.join(s.workdir, "checkpoints"))
                   if n.isdigit())
    load_parts, folders = run_parts.load_parts, []
    monkeypatch.setattr(run_parts, "load_parts", lambda config, params, workdir: (
        folders.append(workdir), load_parts(config, params, workdir))[1])
    gen, kind = load_generator(os.path.join(s.workdir, "checkpoints", str(steps[-1])))
    assert kind == "vdit" and [os.path.abspath(f) for f in folders] == [os.path.abspath(s.workdir)]
    np.testing.assert_array_equal(gen.latents_mean, s.gen.latents_mean)
    for x, y in zip(jax.tree.leaves(gen.dit_params), jax.tree.leaves(s.gen.dit_params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_i2v_model_without_an_image_names_the_request_field(tmp_path):
    """An image-to-video model's request needs the `image` field (not the CLI's --image)."""
    from generate_testing import add_text_encoder, i2v_pipeline

    folder = str(tmp_path / "i2v")
    i2v_pipeline(folder)
    add_text_encoder(folder)
    studio = Studio(folder, str(tmp_path / "serve"))
    with pytest.raises(ValueError, match="^image: this is an image-to-video model; give a first "
                                         "image$"):
        studio.submit({"prompt": "a red circle", "frames": 9, "size": "32x32"})


def test_a_busy_port_fails_before_the_model_loads(tmp_path):
    import argparse
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = argparse.Namespace(workdir=str(tmp_path / "no-model"), host="127.0.0.1", port=port,
                                  out=str(tmp_path / "out"), max_pixels=0)
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve.run_cli(args)


def test_the_pages_empty_guidance_is_not_asked_for(studio):
    """The page's body (every box as text): an empty guidance box takes the run's own guidance
    (a two-expert run's guidance_2 for its low-noise expert), a filled one is asked for. The page
    fills the box with a placeholder only and leaves an empty box out of the body."""
    s, url = studio
    page_body = {"prompt": "a red circle", "negative_prompt": "", "image": "", "frames": "5",
                 "size": "16x16", "steps": "2", "seed": "0"}
    ids = [s.submit(dict(page_body, guidance="")), s.submit(dict(page_body, guidance="2.5")),
           s.submit(page_body)]
    assert [s.jobs[i].job.args.guidance for i in ids] == [None, 2.5, None]
    assert "body.guidance = " in serve_page.PAGE and 'guidance").value = ' not in serve_page.PAGE
    assert [_wait(url, i)["state"] for i in ids] == ["done"] * 3


def test_queue_position_counts_the_running_job():
    """"queued (N ahead)": the job being sampled is ahead of every queued one."""
    studio = Studio.__new__(Studio)  # the bookkeeping only: no model, no worker
    studio._lock, studio._order = threading.Lock(), ["0001", "0002", "0003", "0004"]
    studio.jobs = {i: serve.Job(i, {}, None, None, state=state) for i, state in
                   zip(studio._order, ("done", "running", "queued", "queued"), strict=True)}
    assert [studio.status(i)["position"] for i in studio._order] == [0, 0, 1, 2]


def _cli_args(tmp_path, **kwargs):
    import argparse
    return argparse.Namespace(**{"workdir": str(tmp_path / "no-model"), "host": "127.0.0.1",
                                 "port": 0, "out": None, "max_pixels": 0, "lora": (),
                                 "lora_2": (), "weights": None, **kwargs})


def test_a_wrong_workdir_leaves_no_serve_folder(tmp_path):
    for workdir in (tmp_path / "no-model", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises((FileNotFoundError, ValueError)):
            serve.run_cli(_cli_args(tmp_path, workdir=str(workdir)))
        assert not (workdir / "serve").exists()
    assert not (tmp_path / "no-model").exists()


def test_default_out_is_the_runs_folder(tmp_path):
    """A step folder RUN/checkpoints/STEP writes to RUN/serve, not inside the step folder that
    training's checkpoint.keep prunes."""
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "checkpoints", "1400"))
    assert serve.default_out(run) == os.path.join(run, "serve")
    assert serve.default_out(os.path.join(run, "checkpoints", "1400")) == os.path.join(run, "serve")
    assert serve.default_out(os.path.join(run, "checkpoints", "1400") + "/") == \
        os.path.join(run, "serve")
    assert serve.default_out("gs://bucket/run/checkpoints/7") == "serve"


def _ipv6_loopback():
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")


def test_ipv6_host_listens(tmp_path):
    _ipv6_loopback()
    server = make_server(None, "::1", 0)
    try:
        assert server.server_address[0] == "::1"
    finally:
        server.server_close()


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_host_that_is_not_this_machine_is_named(tmp_path, host):
    """The listen error says what is wrong: the --host, not the port."""
    with pytest.raises(ValueError, match=f"cannot listen on {host}:0 .*: --host {host} is not an "
                                         "address of this machine") as e:
        serve.run_cli(_cli_args(tmp_path, host=host))
    assert "--port" not in str(e.value)


def test_dtype_reaches_the_model_load(tmp_path, monkeypatch):
    """`vdit serve --dtype bfloat16` loads the model in bfloat16 (as `vdit sample` does)."""
    asked = []

    def load(workdir, loras, loras_2, weights, dtype=None):
        asked.append(dtype)
        raise FileNotFoundError("stop after the load's arguments")

    monkeypatch.setattr(serve, "load_generator", load)
    with pytest.raises(FileNotFoundError, match="stop after"):
        serve.run_cli(_cli_args(tmp_path, dtype="bfloat16"))
    assert asked == ["bfloat16"]
