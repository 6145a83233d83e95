"""The path layer and a run directory's layout.

Every user-given path (workdir, latents, shards, weights, outputs) becomes an `etils.epath.Path`
here, so `gs://` (and `s3://`, `az://`, `hf://`, through fsspec) works wherever a local path does;
Orbax already takes epath paths. `user_path` checks a path before any work starts: an unsupported
URI scheme, or a bucket that cannot be reached, is an error naming the path.

A run (workdir) holds:
    checkpoints/<step>/   Orbax checkpoints (state + config)       `checkpoints_dir`
    latents/              latent shards + stats.json (`vdit encode`) `latents_dir`, `stats_path`
    metrics.jsonl         one JSON line per logged step             `metrics_path`
    tensorboard/          TensorBoard event files                   `tensorboard_dir`
    samples/              periodic samples                          `samples_dir`
    samples.jsonl         prompts + videos that `vdit eval` judges  `samples_jsonl`

Libraries that only read local files (ArrayRecord, PyAV, PIL's savers, TensorBoard's writer)
go through `local_copy` / `staged_output`: a remote file is copied to a local temporary file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

Path = epath.Path
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")  # the URI schemes epath routes to a remote filesystem
STATS_FILE = "stats.json"


def user_path(path: str | os.PathLike, what: str = "path") -> epath.Path:
    """A user-given path -> epath.Path; an unsupported scheme is a ValueError naming it."""
    text = os.fspath(path)
    for scheme in REMOTE_SCHEMES:  # "gs:/bucket" would be a local folder named "gs:"
        if text.startswith(f"{scheme}:") and not text.startswith(f"{scheme}://"):
            raise ValueError(f"{what} {text!r}: a remote path starts with {scheme}:// (two "
                             "slashes)")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme not in REMOTE_SCHEMES:
            raise ValueError(f"{what} {text!r}: unsupported scheme {scheme}://; use a local path "
                             f"or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    return epath.Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).split("://", 1)[0] in REMOTE_SCHEMES and "://" in os.fspath(path)


def check_reachable(path: str | os.PathLike, what: str = "path") -> epath.Path:
    """`user_path`, and for a remote path its bucket must answer (checked before any work starts)."""
    p = user_path(path, what)
    if is_remote(p):
        scheme, rest = os.fspath(p).split("://", 1)
        bucket = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
        try:
            ok = bucket.exists()
        except Exception as e:  # a missing SDK, credentials or network: all "cannot be reached"
            hint = "; install vdit's gcs extra: pip install -e '.[gcs]'" if isinstance(
                e, ImportError) else ""
            raise OSError(f"{what} {os.fspath(p)!r}: bucket {os.fspath(bucket)} cannot be reached "
                          f"({type(e).__name__}: {e}){hint}") from e
        if not ok:
            raise OSError(f"{what} {os.fspath(p)!r}: bucket {os.fspath(bucket)} does not exist")
    return p


def is_absolute(path: str | os.PathLike) -> bool:
    return is_remote(path) or os.path.isabs(os.fspath(path))


def absolute(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (Orbax requires it); a remote path unchanged."""
    p = user_path(path)
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def create_if_absent(path, text: str) -> bool:
    """Writes `text` to `path` unless the file exists; True when this call created it. Locally an
    exclusive create (O_EXCL), so of workers racing to write the same file exactly one wins; an
    object store has no exclusive create, so there the last of racing writers wins (callers
    re-read the file and check what they used, see `vdit/data/encode_videos.py`)."""
    p = user_path(path)
    if is_remote(p):
        if p.exists():
            return False
        p.write_text(text)
        return True
    try:
        fd = os.open(os.fspath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


# ---------------------------------------------------------------------- a run's layout
def checkpoints_dir(workdir) -> epath.Path:
    return absolute(workdir) / "checkpoints"


def latents_dir(config, workdir) -> epath.Path:
    """Where `vdit encode` writes and `vdit train` reads shards: `data.latents_dir` or
    WORKDIR/latents."""
    given = config.data.get("latents_dir", None) if "data" in config else None
    return user_path(given, "data.latents_dir") if given else user_path(workdir) / "latents"


def stats_path(latents) -> epath.Path:
    return user_path(latents) / STATS_FILE


def metrics_path(workdir) -> epath.Path:
    return user_path(workdir) / "metrics.jsonl"


def tensorboard_dir(workdir) -> epath.Path:
    return user_path(workdir) / "tensorboard"


def samples_dir(workdir) -> epath.Path:
    return user_path(workdir) / "samples"


def profile_dir(workdir) -> epath.Path:
    """Where `train.profile_steps` writes its jax.profiler trace."""
    return user_path(workdir) / "profile"


def eval_dir(workdir) -> epath.Path:
    """Where `vdit eval shapes --workdir` writes its samples (samples/ + samples.jsonl)."""
    return user_path(workdir) / "eval"


def samples_jsonl(workdir) -> epath.Path:
    return user_path(workdir) / "samples.jsonl"


# ---------------------------------------------------------------------- local staging
@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
    """A local filename holding `path`'s bytes (the path itself when local): for readers that
    only open local files (PyAV, ArrayRecord)."""
    p = user_path(path)
    if not is_remote(p):
        yield os.fspath(p)
        return
    with tempfile.TemporaryDirectory(prefix="vdit-stage-") as tmp:
        yield download(p, os.path.join(tmp, p.name))


@contextlib.contextmanager
def staged_output(path) -> Iterator[str]:
    """A local filename to write; on success its bytes land at `path` (parents made). For writers
    that only take local files (ArrayRecord, PyAV, TensorBoard)."""
    p = user_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(p):
        yield os.fspath(p)
        return
    with tempfile.TemporaryDirectory(prefix="vdit-stage-") as tmp:
        local = os.path.join(tmp, p.name)
        yield local
        upload(local, p)


def download(path, local: str) -> str:
    """Copies `path` (any filesystem) to the local file `local`; returns `local`."""
    with user_path(path).open("rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return local


def copy_tree(src, dst) -> None:
    """Copies the files of folder `src` into `dst` (any filesystems, both), recursively."""
    src, dst = user_path(src), user_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            with item.open("rb") as f, (dst / item.name).open("wb") as g:
                shutil.copyfileobj(f, g)


def upload(local: str, path) -> None:
    with open(local, "rb") as src, user_path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst)
