"""A file server on 127.0.0.1 (a free port) for download tests: it serves `files` (URL path ->
bytes), counts the requests, and can misbehave on purpose: answer an HTTP error status, close
the connection partway through a body whose full length it announced, or never answer."""

from __future__ import annotations

import http.server
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LoopbackServer

    def do_GET(self):
        owner = self.server
        with owner.lock:
            owner.requests.append(self.path)
        if self.path in owner.stalled:
            owner.stopping.wait()  # until the server stops: the client times out first
            return
        if self.path in owner.status:
            self.send_error(owner.status[self.path])
            return
        body = owner.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A truncated response: the full length announced, part of the body, then the
        # connection closed (HTTP/1.0: the handler's return closes it).
        self.wfile.write(body[: owner.truncated.get(self.path, len(body))])

    def log_message(self, *args):  # quiet
        pass


class LoopbackServer(http.server.ThreadingHTTPServer):
    """`with LoopbackServer() as server:` serves until the block ends; `server.url` is its
    base URL. `files`, `status` (path -> HTTP code), `truncated` (path -> bytes sent of the
    body) and `stalled` (paths never answered) may be changed while it runs; `requests` lists
    the paths asked for."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.truncated: dict[str, int] = {}
        self.stalled: set[str] = set()
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the port (later connections are refused)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join()
