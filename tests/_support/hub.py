"""A loopback stand-in for the Hugging Face hub's file endpoint, serving a local folder.

It answers what `huggingface_hub.hf_hub_download` asks of the real hub: `HEAD` and `GET` on
`/datasets/{repo}/resolve/{revision}/{path}`, with the `X-Repo-Commit`, `ETag` and length
headers the client keys its cache on. The folder is laid out exactly like the published dataset
repo, so the test exercises mup's real hub paths through huggingface_hub's real client.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import urllib.parse
from pathlib import Path

COMMIT = "0" * 39 + "1"


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    repo: str
    requests: list[str]

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _file(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        prefix = f"/datasets/{self.repo}/resolve/"
        if not path.startswith(prefix):
            return None
        _revision, _, relative = path[len(prefix) :].partition("/")
        target = self.root / relative
        return target if target.is_file() else None

    def _headers(self, target: Path) -> None:
        data = target.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def _missing(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(f"HEAD {self.path}")
        target = self._file()
        self._headers(target) if target else self._missing()

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(f"GET {self.path}")
        target = self._file()
        if target is None:
            self._missing()
            return
        self._headers(target)
        self.wfile.write(target.read_bytes())


@contextlib.contextmanager
def hub_server(root: Path, repo: str):
    """Serve `root` as dataset repo `repo` on a free loopback port; yield (endpoint, requests)."""
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"root": root, "repo": repo, "requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
