"""Every user-given path goes through the path layer (vdit/runs/__init__.py, etils.epath), so gs:// works
wherever a local path does: a scan of vdit/ for calls that take a path as a local filename
(`open`, `os.path.*`, `glob`, `shutil`, `pathlib`, os file calls, numpy/safetensors/PyAV/PIL file
readers). Each remaining use is listed below with why it is not a user path or why it is safe."""

from __future__ import annotations

import ast
import collections
import pathlib

VDIT = pathlib.Path(__file__).resolve().parent.parent / "vdit"
PATH_LAYER = "runs/__init__.py"
OS_FILE_CALLS = {"makedirs", "listdir", "remove", "replace", "rename", "walk", "scandir", "mkdir",
                 "rmdir", "unlink", "stat"}
READERS = {"np.load", "np.save", "np.savez", "av.open", "Image.open", "load_file", "save_file",
           "Path", "pathlib.Path"}

# file -> {call: count}, and why each is fine. A new use outside these fails the test.
ALLOWED = {
    # --config is a Python recipe that is imported (executed), which needs a local module file
    # (and its folder, whose modules it imports); recipes live in the repository's configs/.
    "config.py": {"os.path.join": 2, "os.path.dirname": 3, "os.path.isfile": 1,
                  "os.path.abspath": 2, "os.path.splitext": 1, "os.path.basename": 1},
    # The local branch of `_load` (memory-mapped); remote files are read through the runs layer.
    "convert/safetensors_io.py": {"load_file": 1},
    # The local branch of `append_lines` (fsync needs an OS file); remote ledgers go through runs.
    "curate/ledger.py": {"open": 1},
    # Image.open on a file object opened through the runs layer.
    "sample_cli.py": {"Image.open": 1},
    "cli_checks.py": {"Image.open": 1},
    # `vdit serve` writes the videos it serves (and uploaded first frames) to a local folder and
    # serves them over HTTP from there (listing it to number new videos, removing the image of a
    # refused request); Image.open reads an uploaded image from memory.
    "serve.py": {"os.path.join": 5, "os.makedirs": 2, "Image.open": 1, "os.path.abspath": 1,
                 "os.listdir": 1, "os.remove": 1},
    "serve_http.py": {"os.path.join": 1, "open": 1, "os.path.isfile": 1},
    # Lock files need an atomic exclusive create (O_EXCL) and pid checks: local or shared
    # filesystems; a remote workdir gets no lock (`workdir_lock` says so).
    "train/lock.py": {"os.makedirs": 1, "os.remove": 1, "open": 1, "os.path.dirname": 1,
                      "os.path.abspath": 1, "os.path.exists": 1, "os.path.getmtime": 1},
    # Curation reads folders of local video files with PyAV and ships a package-internal model
    # (Path(__file__)); its outputs (ledgers, clip shards) go through the runs layer.
    "curate/captions.py": {"Path": 1},
    "curate/decode.py": {"Path": 1, "av.open": 1},
    "curate/learned.py": {"Path": 2, "load_file": 1},
    "curate/run.py": {"Path": 4, "os.path.basename": 2,
                      "os.path.abspath": 1},
    "curate/settings.py": {"Path": 1},
    # Video files for `vdit encode` from a folder: decoded by PyAV from local files.
    "data/video_files.py": {"Path": 9},
    "data/clip_decode.py": {"Path": 1, "av.open": 1},
    # Counter videos are written to local files (tests, bench/encode.py), never a user's path.
    "data/counter_video.py": {"av.open": 1},
    # Local video folders (encode's and curate's inputs are local): searched following linked
    # folders; sidecar captions and manifests read as local text.
    "data/video_io.py": {"Path": 6, "av.open": 3, "os.walk": 2, "os.path.realpath": 1,
                         "os.path.join": 2, "os.path.islink": 1},
    # The free space of the local temporary folder that remote latent shards are copied into.
    "data/sources.py": {"shutil.disk_usage": 1},
    # `make demo` writes its outputs to a local --out folder (a laptop run); the runs it trains
    # use the same train/encode/sample code as everything else.
    "demo.py": {"os.path.join": 9, "os.path.dirname": 2, "os.path.abspath": 2, "os.makedirs": 1,
                "open": 1},
    # `make distill`: the same local --out folder as `make demo`
    "demo_distill.py": {"os.path.join": 6, "os.path.dirname": 2, "os.path.abspath": 2,
                        "os.path.isdir": 1, "os.path.isfile": 1, "open": 2},
}


def _is_file_call(name: str) -> bool:
    if name == "open" or name in READERS:
        return True
    if name.startswith(("os.path.", "glob.", "shutil.", "pathlib.")):
        return True
    parts = name.split(".")
    return parts[0] == "os" and len(parts) == 2 and parts[1] in OS_FILE_CALLS


def file_calls() -> dict[str, collections.Counter]:
    found = {}
    for path in sorted(VDIT.rglob("*.py")):
        rel = path.relative_to(VDIT).as_posix()
        if rel == PATH_LAYER:
            continue
        calls = collections.Counter()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                # Path(...).method(...) counts once, as the Path(...) call.
                name = ast.unparse(func) if not isinstance(func, ast.Attribute) or not isinstance(
                    func.value, ast.Call) else ""
                if name and _is_file_call(name):
                    calls[name] += 1
        if calls:
            found[rel] = calls
    return found


def test_no_local_file_calls_outside_the_path_layer():
    found = file_calls()
    unexpected = {f: {c: n for c, n in calls.items() if n > ALLOWED.get(f, {}).get(c, 0)}
                  for f, calls in found.items()}
    unexpected = {f: c for f, c in unexpected.items() if c}
    assert not unexpected, (
        "calls that treat a path as a local filename outside vdit/runs/__init__.py (route the path "
        f"through vdit.runs / etils.epath, or allow it in ALLOWED with the reason): {unexpected}")


def test_the_scan_sees_what_it_forbids(tmp_path):
    assert _is_file_call("open") and _is_file_call("os.path.join") and _is_file_call("glob.glob")
    assert _is_file_call("os.makedirs") and _is_file_call("shutil.copytree")
    assert not _is_file_call("os.environ.get") and not _is_file_call("runs.user_path")
    assert "runs/checkpoint.py" not in file_calls()  # once os.path.abspath: gs://x -> ./gs:/x
