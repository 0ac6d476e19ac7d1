"""Real servers on 127.0.0.1 for tests that read or write data by URL, started and stopped by the tests themselves.

- :class:`S3Server`: moto's standalone S3 API server (``ThreadedMotoServer``) with one bucket, reached through s3fs
  the way a user reaches a custom endpoint: ``AWS_ENDPOINT_URL`` (set by :meth:`S3Server.environment`).
- :class:`FileServer`: an HTTP server of a folder's files (GET and HEAD), answering Range requests or ignoring them,
  optionally demanding a ``?token=`` query, sending ``ETag``/``Last-Modified`` or not, able to cut responses short
  or to die at a chosen moment.

Both listen on a free port and can be stopped mid-test and started again on the same port (a URL stays valid).
The fixtures ``s3_server`` and ``http_server`` give a running one (module-wide for S3: moto takes a second to start)
and stop it afterwards; import them into a test module to use them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block, restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- S3
class S3Server:
    """moto's S3 API on 127.0.0.1 with the bucket ``bucket``; objects live in this process's moto backend, so they
    survive a stop and start."""

    def __init__(self, bucket: str = "cusa-test", port: int | None = None):
        self.bucket = bucket
        self.port = port or free_port()
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def environment(self) -> dict[str, str]:
        """What a user sets to reach this endpoint with any credentials (moto accepts all)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        self._server.start()
        wait_for_port(self.port)
        client = self.client()
        if self.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def client(self):
        import boto3

        env = self.environment()
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])

    def objects(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of the bucket's objects under ``prefix``."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out

    def clear(self, prefix: str = "") -> None:
        client = self.client()
        for key in self.objects(prefix):
            client.delete_object(Bucket=self.bucket, Key=key)

    def upload(self, files: list, prefix: str) -> list[str]:
        """Put local ``files`` under ``prefix/`` (by file name); their s3:// URLs."""
        client = self.client()
        urls = []
        for path in files:
            key = f"{prefix}/{Path(path).name}"
            client.upload_file(str(path), self.bucket, key)
            urls.append(self.url(key))
        return urls


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A running moto S3 server with a bucket, ``AWS_ENDPOINT_URL`` and test credentials set in this process."""
    server = S3Server().start()
    try:
        with environment(server.environment()):
            yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- HTTP
class FileServer:
    """Files under ``root`` over HTTP on 127.0.0.1.

    ``range_support``: answer ``Range: bytes=a-b`` with 206 and the slice, or ignore it (200, whole file).
    ``token``: refuse (403) a request without ``?token=TOKEN``. ``validators``: send each file's ``ETag`` and
    ``Last-Modified`` (as most servers do), or neither (the size is then all a client learns). :meth:`truncate_next`
    makes the next N file
    responses announce the full length and close the connection halfway through the body; :meth:`die_when` makes the
    server drop every connection, from the first request at which ``condition()`` holds, as a crashed server would.
    ``requests`` lists the paths asked for (GET and HEAD), in order; ``gets`` the paths whose bytes were asked for
    (GET), with the ``Range`` header when there was one (``"PATH bytes=A-B"``).
    """

    def __init__(self, root: Path, *, range_support: bool = True, token: str | None = None,
                 port: int | None = None, validators: bool = True):
        self.root = Path(root)
        self.range_support = range_support
        self.validators = validators
        self.token = token
        self.port = port or free_port()
        self.requests: list[str] = []
        self.gets: list[str] = []
        self._truncate = 0
        self._die_when: Callable[[], bool] | None = None
        self.dead = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def url(self, rel: str = "") -> str:
        base = f"http://{HOST}:{self.port}/{rel}".rstrip("/")
        return f"{base}?token={self.token}" if self.token else base

    def truncate_next(self, n: int) -> None:
        with self._lock:
            self._truncate = n

    def die_when(self, condition: Callable[[], bool]) -> None:
        self._die_when = condition

    def start(self) -> "FileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._serve(self, body=False)

            def do_GET(self) -> None:
                server._serve(self, body=True)

        self.dead = False
        self._httpd = ThreadingHTTPServer((HOST, self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:  # a dying server stops itself from several request threads at once
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def restart(self) -> "FileServer":
        """Start again on the same port, alive and with no pending faults."""
        self.stop()
        self._die_when = None
        self._truncate = 0
        return self.start()

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        parts = urlsplit(handler.path)
        rel = unquote(parts.path).lstrip("/")
        self.requests.append(rel)
        if body:
            wanted = handler.headers.get("Range")
            self.gets.append(f"{rel} {wanted}" if wanted else rel)
        if self.dead or (self._die_when is not None and self._die_when()):
            self.dead = True
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)  # no answer at all: the server is gone
            threading.Thread(target=self.stop, daemon=True).start()
            return
        if self.token is not None and parse_qs(parts.query).get("token") != [self.token]:
            return self._status(handler, HTTPStatus.FORBIDDEN)
        path = (self.root / rel).resolve()
        if not path.is_file() or self.root.resolve() not in path.parents:
            return self._status(handler, HTTPStatus.NOT_FOUND)
        data = path.read_bytes()
        st = path.stat()
        status, start, end = HTTPStatus.OK, 0, len(data)
        wanted = handler.headers.get("Range")
        if wanted and self.range_support and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(len(data), int(last) + 1) if first and last else len(data)
            status = HTTPStatus.PARTIAL_CONTENT
        payload = data[start:end]
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Content-Type", "application/octet-stream")
        if self.validators:
            handler.send_header("ETag", f'"{st.st_size:x}-{st.st_mtime_ns:x}"')
            handler.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        if self.range_support:
            handler.send_header("Accept-Ranges", "bytes")
            if status == HTTPStatus.PARTIAL_CONTENT:
                handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        with self._lock:
            cut = self._truncate > 0 and len(payload) > 1
            if cut:
                self._truncate -= 1
        if cut:
            handler.wfile.write(payload[:len(payload) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)  # dropped mid-transfer
            return
        handler.wfile.write(payload)

    @staticmethod
    def _status(handler: BaseHTTPRequestHandler, status: HTTPStatus) -> None:
        message = f"{status.value} {status.phrase}\n".encode()
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(message)))
        handler.end_headers()
        handler.wfile.write(message)


@pytest.fixture
def http_server(tmp_path) -> Iterator[FileServer]:
    """A running HTTP server of the (initially empty) folder ``tmp_path / "www"``, with Range support."""
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root).start()
    try:
        yield server
    finally:
        server.stop()
