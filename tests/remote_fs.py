"""A stand-in for Google Cloud Storage in tests: `gs://BUCKET/...` served from a local folder.

It is installed where the real thing plugs in, so vdit's code takes the same path as on GCS:
- the fsspec filesystem that etils.epath's gs:// backend asks for (gcsfs in production);
- Orbax's TensorStore kvstore for gs:// (`gcs_utils.get_kvstore_for_gcs`, TensorStore's own GCS
  driver in production), pointed at the same folder with TensorStore's file driver, and Orbax's
  bucket query (`is_hierarchical_namespace_enabled`, google-cloud-storage in production).
A bucket is a sub-folder of the root; one that does not exist is a missing bucket.
A file opened for writing behaves as gcsfs's: the object appears only when the file is closed
(gcsfs uploads at close, or every 5 MiB), and `fileno` raises io.UnsupportedOperation.
"""

from __future__ import annotations

import io
import os

from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.serialization import tensorstore_utils

PREFIX = "gs://"


class FolderGCS(DirFileSystem):
    """gs://bucket/key <-> ROOT/bucket/key; paths it returns are "bucket/key", as gcsfs's are."""

    protocol = ("gcs", "gs")
    root = ""  # set by `install`

    def __init__(self, *args, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem())

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return str(path).removeprefix(PREFIX).removeprefix("gcs://").rstrip("/")

    def _join(self, path):
        if isinstance(path, str):
            path = self._strip_protocol(path)
        return super()._join(path)

    def open(self, path, mode="rb", *args, **kwargs):
        if not any(c in mode for c in "wx"):
            return super().open(path, mode, *args, **kwargs)
        local = self._join(path)
        bucket = os.path.join(self.root, self._strip_protocol(path).split("/")[0])
        if not os.path.isdir(bucket):
            raise FileNotFoundError(f"no bucket {bucket}")
        upload = _Upload(local)
        return upload if "b" in mode else io.TextIOWrapper(upload, encoding=kwargs.get("encoding"))


class _Upload(io.BytesIO):
    """A gcsfs-like file opened for writing: written to the folder at close, no OS file."""

    def __init__(self, local: str):
        super().__init__()
        self._local = local

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def close(self):
        if not self.closed:
            os.makedirs(os.path.dirname(self._local), exist_ok=True)  # no folders on GCS
            with open(self._local, "wb") as f:
                f.write(self.getvalue())
        super().close()


def install(monkeypatch, root: str) -> None:
    """Serves gs:// from `root` for the rest of the test."""
    cls = type("FolderGCSAt", (FolderGCS,), {"root": root})
    monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem", lambda name: cls())
    monkeypatch.setattr(tensorstore_utils.gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": root + "/" + path.removeprefix(PREFIX)})
    # Orbax asks the bucket (google-cloud-storage) whether it has a hierarchical namespace.
    monkeypatch.setattr(tensorstore_utils.gcs_utils, "is_hierarchical_namespace_enabled",
                        lambda path: False)
