"""A real S3 endpoint for the tests: moto's standalone server on 127.0.0.1 (a random free port), reached
over HTTP through a small reverse proxy that counts the bytes the server sent and can inject faults
(a 403 on one request, a dropped connection). Only loopback traffic; every wait is bounded."""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: what the tests put in the environment: fake credentials, no AWS config files, and no lookups of
#: instance metadata (which would leave the machine)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
          "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied</Message></Error>")


@dataclass
class Request:
    method: str
    path: str
    status: int
    sent: int  # bytes of the response (status line, headers, body)


@dataclass
class Proxy:
    """Counts what the server sends; ``fault(method, path)`` may answer "403" or "drop" instead."""

    upstream: tuple[str, int]
    requests: list[Request] = field(default_factory=list)
    fault: Callable[[str, str], str | None] | None = None
    after: Callable[[Request], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sent(self) -> int:
        with self.lock:
            return sum(r.sent for r in self.requests)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
        self.fault = None
        self.after = None


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _forward(self) -> None:
            body = self._body()
            action = proxy.fault(self.command, self.path) if proxy.fault else None
            if action == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            length = None
            if action == "403":
                status, headers, data = 403, [("Content-Type", "application/xml")], _DENIED
            else:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    fwd = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "expect"}
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        fwd["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=fwd)
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP | {"content-length"}]
                except OSError:  # the server is gone: so is this connection
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                finally:
                    conn.close()
            head = f"HTTP/1.1 {status} X\r\n".encode()
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
                head += f"{k}: {v}\r\n".encode()
            self.send_header("Content-Length", length if length is not None else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            # status line and headers (plus what BaseHTTPRequestHandler adds: Server, Date) and body
            body_sent = len(data) if self.command != "HEAD" else 0
            req = Request(self.command, self.path, status, len(head) + 80 + body_sent)
            with proxy.lock:
                proxy.requests.append(req)
            if proxy.after is not None:
                proxy.after(req)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away (a killed process, a dropped connection) is part of the tests


@dataclass
class S3:
    """A running endpoint: ``url`` (through the proxy), the moto server and the proxy."""

    url: str
    server: object
    proxy: Proxy

    def storage_options(self, **extra: object) -> dict[str, object]:
        return {"endpoint_url": self.url, "key": "testing", "secret": "testing", "skip_instance_cache": True,
                **extra}

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (or the CLI) to reach this endpoint."""
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.url, "FSSPEC_S3_ENDPOINT_URL": self.url}


@contextmanager
def s3_server() -> Iterator[S3]:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 behind a counting proxy, both on free ports."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in (*AWS_ENV, *_UNSET)}
    os.environ.update(AWS_ENV)
    for k in _UNSET:
        os.environ.pop(k, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    upstream = server.get_host_and_port()
    proxy = Proxy(upstream)
    httpd = _Quiet(("127.0.0.1", 0), _handler(proxy))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield S3(f"http://127.0.0.1:{httpd.server_address[1]}", server, proxy)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
