"""`vdit serve`'s HTTP layer: the request handler for the page, the job API and the videos
(routes in vdit/serve.py's module docstring), and the server on an IPv4 or IPv6 address. The
`Studio` it serves (vdit/serve.py) is set on the handler class; nothing here loads a model."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vdit.serve_page import PAGE
from vdit.serve_request import byte_range

log = logging.getLogger("vdit.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Handler(BaseHTTPRequestHandler):
    studio: Any  # the vdit.serve.Studio, set on the subclass that make_server builds

    def log_message(self, fmt, *args):  # quiet by default: the logger, not stderr lines
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _foreign_host(self) -> bool:
        """A loopback server answers only requests addressed to a loopback name: a page that
        rebinds its own domain to 127.0.0.1 (DNS rebinding) sends its domain as Host. Answers
        403 when so."""
        if self.server.server_address[0] not in LOOPBACK:
            return False  # --host 0.0.0.0 etc.: the user chose to serve other machines
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]").lower() in LOOPBACK:
            return False
        address, port = self.server.server_address[:2]
        self._json(403, {"error": f"Host {host!r} is not this server: open "
                                  f"http://{url_host(address)}:{port}/"})
        return True

    def do_GET(self):  # noqa: N802 - http.server's name
        if self._foreign_host():
            return
        path = self.path.split("?")[0]
        if path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/jobs":
            self._json(200, {"jobs": self.studio.recent(), "model": self.studio.workdir,
                             "defaults": _jsonable(self.studio.defaults)})
        elif path.startswith("/api/jobs/"):
            status = self.studio.status(path.rsplit("/", 1)[1])
            self._json(200 if status else 404, status or {"error": "no such job"})
        elif path.startswith("/videos/"):
            self._video(path.rsplit("/", 1)[1])
        else:
            self._json(404, {"error": f"no page {path}"})

    do_HEAD = do_GET

    def do_POST(self):  # noqa: N802 - http.server's name
        if self._foreign_host():
            return
        if self.path != "/api/generate":
            return self._json(404, {"error": f"no endpoint {self.path}"})
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a cross-site form or text/plain post cannot send this
            return self._json(415, {"error": f"Content-Type {kind!r}: send application/json"})
        length = _content_length(self.headers.get("Content-Length", "0"))
        if length is None:  # rfile.read(-1) would wait for a close that never comes
            return self._json(400, {"error": "Content-Length: expected the body's size in bytes, "
                                             f"got {self.headers.get('Content-Length')!r}"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            job_id = self.studio.submit(body)
        except json.JSONDecodeError as e:
            return self._json(400, {"error": f"the request is not JSON: {e}"})
        except (ValueError, FileNotFoundError) as e:
            return self._json(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a bug answers 500 (and is logged), not a dropped
            log.exception("vdit serve: request failed")  # connection
            return self._json(500, {"error": f"{type(e).__name__}: {e}"})
        self._json(202, {"id": job_id})

    def _video(self, name: str) -> None:
        path = os.path.join(self.studio.out_dir, name)
        if not name.endswith(".mp4") or "/" in name or not os.path.isfile(path):
            return self._json(404, {"error": f"no video {name}"})
        with open(path, "rb") as f:
            data = f.read()
        span = byte_range(self.headers.get("Range", ""), len(data))
        if span == "unsatisfiable":
            return self._send(416, b"", "video/mp4", {"Content-Range": f"bytes */{len(data)}"})
        if span is None:  # no Range, or one this server does not parse (multiple): everything
            return self._send(200, data, "video/mp4", {"Accept-Ranges": "bytes"})
        start, end = span
        self._send(206, data[start:end + 1], "video/mp4", {
            "Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"})


def _content_length(header: str) -> int | None:
    """The body size a Content-Length header gives; None unless a whole number >= 0."""
    try:
        length = int(header)
    except ValueError:
        return None
    return length if length >= 0 else None


def _jsonable(values: dict) -> dict:
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in values.items()}


class ThreadingHTTPServerV6(ThreadingHTTPServer):
    """ThreadingHTTPServer on an IPv6 socket (the stdlib one is AF_INET only, so `--host ::1`
    could not bind)."""

    address_family = socket.AF_INET6


def make_server(studio, host: str = "127.0.0.1",
                port: int = 8000) -> ThreadingHTTPServer:
    """The HTTP server for `studio` on `host` (an IPv6 address such as ::1 gets an IPv6 socket;
    port 0 picks a free one: see `server.server_address`); a None studio is set on
    `server.RequestHandlerClass` before serving."""
    handler = type("StudioHandler", (Handler,), {"studio": studio})
    kind = ThreadingHTTPServerV6 if ":" in host.strip("[]") else ThreadingHTTPServer
    server = kind((host.strip("[]"), port), handler)
    server.daemon_threads = True
    return server


def url_host(host: str) -> str:
    """`host` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def listen_error(host: str, port: int, error: OSError) -> ValueError:
    """Why `vdit serve` cannot listen, worded after the cause: a busy port, or a --host that is
    not an address of this machine (or not one at all)."""
    where = f"cannot listen on {url_host(host)}:{port} ({error.strerror or error})"
    if error.errno in (errno.EADDRINUSE, errno.EACCES):
        return ValueError(f"{where}: pick another --port, or stop the server that holds it")
    return ValueError(f"{where}: --host {host} is not an address of this machine (127.0.0.1 "
                      "or ::1 serve only this machine, 0.0.0.0 or :: every network)")
