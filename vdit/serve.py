"""`vdit serve`: a local web page for generation, over one model loaded once.

`run_cli(args)` loads the model of a vdit run folder or a diffusers Wan pipeline folder once (as
`vdit sample` does; this file's `Studio` holds it and its job queue), then answers on
http://HOST:PORT/ (stdlib `http.server`, one thread per connection; vdit/serve_http.py):
  GET  /                 the page (vdit/serve_page.py)
  POST /api/generate     JSON {prompt, negative_prompt, image (data: URL or ""), frames, size
                         ("HxW"), steps, guidance, seed} -> {"id"}; frames, size, steps, guidance
                         or seed left out or "" (an empty box on the page) take the model's
                         defaults (guidance: the run's own, a two-expert model's guidance_2 for
                         its low-noise expert too); a bad request is 400 with
                         {"error": message naming the field}, checked before it is queued
  GET  /api/jobs/ID      {id, state (queued|running|done|error), phase, progress in [0, 1],
                         position (jobs ahead when queued, the running one included), error,
                         video (URL when done), ...}
  GET  /api/jobs         the recent jobs, newest first
  GET  /videos/NAME.mp4  a result (byte ranges honoured, so the browser can seek)
Requests run one at a time on a worker thread in arrival order (the model is never used by two at
once). Sampling is one compiled loop, so progress within it is an estimate: the fraction of the
previous job's sampling time at the same shape and steps that has elapsed (capped below 1); the
phase (queued, sampling - prompt encoding included -, writing, done or failed) is exact.
`--host` may be an IPv6 address (::1) as well as an IPv4 one or a name.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import math
import os
import queue
import threading
import time
from argparse import Namespace

from PIL import Image

from vdit import runs, serve_http
from vdit.cli_checks import SEED_MAX
from vdit.config import check_frames
from vdit.data import video_io
from vdit.pipelines import sharded
from vdit.sample_cli import OutOfMemory, SampleJob, load_generator, needs_image
from vdit.sample_flags import parse_size
from vdit.serve_request import number_field, text_field
from vdit.train.init_from import resolve

log = logging.getLogger(__name__)
MAX_STEPS = 500
MAX_RECENT = 20
# Largest request by default, as a multiple of the model's default clip (frames x height x width):
# one request past what the machine can hold would fail after minutes and hold up the queue.
PIXELS_OVER_DEFAULT = 16


@dataclasses.dataclass
class Job:
    id: str
    params: dict
    job: SampleJob
    image: str | None
    state: str = "queued"
    phase: str = "queued"
    progress: float = 0.0
    error: str = ""
    video: str = ""
    created: float = dataclasses.field(default_factory=time.time)
    seconds: float = 0.0

    def public(self, position: int) -> dict:
        return {"id": self.id, "state": self.state, "phase": self.phase,
                "progress": round(self.progress, 3), "position": position, "error": self.error,
                "video": self.video, "seconds": round(self.seconds, 2), **self.params}


class Studio:
    """The loaded model, the queue and the jobs; `submit` validates, the worker thread samples."""

    def __init__(self, workdir: str, out_dir: str, max_pixels: int = 0, loras=(), loras_2=(),
                 weights: str | None = None, dtype: str | None = None, mesh: str | None = None):
        if max_pixels < 0:
            raise ValueError(f"--max-pixels {max_pixels}: expected >= 0 (0: "
                             f"{PIXELS_OVER_DEFAULT}x the model's default clip)")
        self.workdir, self.out_dir = workdir, out_dir
        self.gen, self.kind = sharded.load_on_mesh(mesh, load_generator, workdir, loras,
                                                   loras_2, weights, dtype)  # mesh: --mesh
        if self.gen.text_model is None:
            raise ValueError(f"{workdir} has no text encoder (text_encoder/ + tokenizer/): "
                             "vdit serve needs one to encode prompts")
        # Only now: a --workdir that fails to load leaves no empty serve/ folder behind.
        os.makedirs(out_dir, exist_ok=True)
        self._first_id = _next_id(out_dir)  # a restarted server never overwrites a video
        self.gen_needs_image = needs_image(self.gen)
        self.defaults = self.gen.defaults
        d = self.defaults
        self.default_clip = (int(d.get("frames", 17)), int(d.get("height", 64)),
                             int(d.get("width", 64)))
        self.max_pixels = max_pixels or PIXELS_OVER_DEFAULT * math.prod(self.default_clip)
        self.jobs: dict[str, Job] = {}
        self._order: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._timing: dict[tuple, float] = {}  # (frames, h, w, steps) -> last sampling seconds
        self._worker = threading.Thread(target=self._work, daemon=True, name="vdit-serve-worker")
        self._worker.start()

    # ---------------------------------------------------------------- requests
    def submit(self, body: dict) -> str:
        """Checks a request (ValueError naming the field) and queues it; returns the job id."""
        params = self._params(body)
        if self.gen_needs_image and not params["first_image"]:
            raise ValueError("image: this is an image-to-video model; give a first image")
        image = _save_image(text_field(body, "image"), self.out_dir)
        # None asked (left out, or the page's empty box ""): the run's own, so a two-expert run's
        # low-noise expert keeps its guidance_2 instead of the high-noise default.
        asked = body.get("guidance") not in (None, "")
        args = Namespace(workdir=self.workdir, size=params["size"], fps=None, video=None,
                         frames=params["frames"], image=image, steps=params["steps"],
                         guidance=params["guidance"] if asked else None,
                         negative_prompt=params["negative_prompt"],
                         mode="restyle", motion=None, strength=0.7, last_image=None,
                         context_frames=None)
        try:
            job = SampleJob(self.gen, self.kind, args)  # frames 1+4k, size multiples, I2V needs
        except BaseException:
            if image:  # a refused request leaves nothing behind
                os.remove(image)
            raise
        with self._lock:
            job_id = f"{self._first_id + len(self._order):04d}"
            self.jobs[job_id] = Job(job_id, params, job, image)
            self._order.append(job_id)
        self._queue.put(job_id)
        return job_id

    def _params(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        prompt = text_field(body, "prompt")
        if not prompt:
            raise ValueError("prompt: type what the video should show")
        d = self.defaults
        frames, height, width = self.default_clip
        size = text_field(body, "size") or f"{height}x{width}"
        height, width = parse_size(size)  # "--size ...: expected HEIGHTxWIDTH"
        frames = number_field(body, "frames", int, frames, 1, 1000)
        check_frames("frames", frames)
        if frames * height * width > self.max_pixels:
            raise ValueError(
                f"frames x size = {frames}x{height}x{width} = {frames * height * width:,} pixels "
                f"is over this server's limit of {self.max_pixels:,} (vdit serve --max-pixels; "
                f"default {PIXELS_OVER_DEFAULT}x the model's default clip "
                f"{'x'.join(map(str, self.default_clip))})")
        return {"prompt": prompt, "negative_prompt": text_field(body, "negative_prompt"),
                "frames": frames, "size": size,
                "steps": number_field(body, "steps", int, d.get("steps", 20), 1, MAX_STEPS),
                "guidance": number_field(body, "guidance", float, d.get("guidance", 5.0), 0.0, 100.0),
                "seed": number_field(body, "seed", int, 0, 0, SEED_MAX),
                "first_image": bool(text_field(body, "image"))}

    def status(self, job_id: str) -> dict | None:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            # Jobs run in arrival order, so those ahead of a queued one are the earlier ones
            # still queued or running (the running one holds the model until it is done).
            position = 0
            if job.state == "queued":
                earlier = self._order[:self._order.index(job_id)]
                position = sum(self.jobs[j].state in ("queued", "running") for j in earlier)
            return job.public(position)

    def recent(self) -> list[dict]:
        ids = list(reversed(self._order))[:MAX_RECENT]
        return [s for s in (self.status(i) for i in ids) if s is not None]

    # ---------------------------------------------------------------- worker
    def _work(self) -> None:
        while True:
            job = self.jobs[self._queue.get()]
            start = time.perf_counter()
            job.state = "running"
            try:
                self._run(job)
                job.state, job.phase, job.progress = "done", "done", 1.0
            except Exception as e:  # noqa: BLE001 - a failed job is reported on the page, never fatal
                log.exception("vdit serve: job %s failed", job.id)
                job.state, job.phase, job.error = "error", "failed", _job_error(e)
            job.seconds = time.perf_counter() - start

    def _run(self, job: Job) -> None:
        p = job.params
        key = (p["frames"], p["size"], p["steps"])
        expected = self._timing.get(key)
        job.phase, job.progress = "sampling", 0.05
        done = threading.Event()
        ticker = threading.Thread(target=_tick, args=(job, expected, done), daemon=True)
        ticker.start()
        t0 = time.perf_counter()
        try:
            video = job.job.run([p["prompt"]], [p["seed"]])[0]
        finally:
            done.set()
        self._timing[key] = time.perf_counter() - t0
        job.phase, job.progress = "writing", 0.95
        name = f"{job.id}.mp4"
        video_io.write_video(os.path.join(self.out_dir, name), video, job.job.fps)
        job.video = f"/videos/{name}"


def _job_error(error: Exception) -> str:
    """A failed job's message for the page: out of memory names the request's fields to shrink."""
    if isinstance(error, OutOfMemory):
        return error.message(OutOfMemory.FIELDS)
    return f"{type(error).__name__}: {error}"


def _tick(job: Job, expected: float | None, done: threading.Event) -> None:
    """Advances the sampling estimate (5% -> 90%) against the previous run's seconds."""
    t0 = time.perf_counter()
    while not done.wait(0.2):
        if expected:
            job.progress = 0.05 + 0.85 * min(0.99, (time.perf_counter() - t0) / expected)
        else:  # first run at this shape (includes compiling): creep towards 90%
            job.progress = 0.05 + 0.85 * (1 - 1 / (1 + (time.perf_counter() - t0) / 20))


def _next_id(out_dir: str) -> int:
    """1 + the highest job number among out_dir's NNNN.mp4 videos (1 for a new folder)."""
    numbers = [int(name[:-4]) for name in os.listdir(out_dir)
               if name.endswith(".mp4") and name[:-4].isdigit()]
    return max(numbers, default=0) + 1


def _save_image(data_url: str, out_dir: str) -> str | None:
    """A data: URL from the page -> a PNG file under out_dir/inputs (None when no image)."""
    if not data_url:
        return None
    head, _, payload = data_url.partition(",")
    if not head.startswith("data:image/") or ";base64" not in head:
        raise ValueError("first image: expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as img:
            pixels = video_io.image_rgb(img)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad file
        raise ValueError(f"first image: cannot read it as an image ({type(e).__name__}: {e})") from e
    folder = os.path.join(out_dir, "inputs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{time.time_ns()}.png")
    Image.fromarray(pixels).save(path)
    return path


def default_out(workdir: str) -> str:
    """The videos folder when --out is not given: RUN/serve for a run folder or a step folder
    RUN/checkpoints/STEP (whose folder training prunes), FOLDER/serve for a pipeline folder;
    ./serve for a remote run (the server writes and serves its videos from a local folder)."""
    if runs.is_remote(workdir):
        return "serve"
    run, _ = resolve(workdir)
    return str(runs.user_path(run) / "serve")


def run_cli(args) -> int:
    """The body of `vdit serve`: load once, serve until interrupted."""
    out = args.out or default_out(args.workdir)
    try:  # listen first: a busy port fails now, not after the model has loaded
        server = serve_http.make_server(None, args.host, args.port)
    except OSError as e:
        raise serve_http.listen_error(args.host, args.port, e) from e
    try:
        server.RequestHandlerClass.studio = Studio(args.workdir, out, args.max_pixels,
                                                   args.lora, args.lora_2, args.weights,
                                                   getattr(args, "dtype", None),
                                                   getattr(args, "mesh", None))
    except BaseException:
        server.server_close()
        raise
    studio = server.RequestHandlerClass.studio
    host, port = server.server_address[:2]
    print(f"vdit serve: {studio.kind} model from {args.workdir}; open "
          f"http://{serve_http.url_host(host)}:{port}/ "
          f"(videos in {os.path.abspath(out)}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
