"""A loopback stand-in for the Hugging Face hub, serving local folders as dataset repos.

It answers what `huggingface_hub`'s real client and `datasets.load_dataset` ask of the hub, so
tests run mup's real hub paths with no internet:

- `HEAD` / `GET /datasets/{repo}/resolve/{revision}/{path}`: the file, with the `X-Repo-Commit`,
  `ETag` and length headers the client keys its cache on (and byte ranges, for `HfFileSystem`);
- `GET /api/datasets/{repo}` and `/api/datasets/{repo}/revision/{revision}`: the repo's info
  (its commit and file list), which `datasets` asks first;
- `GET /api/datasets/{repo}/tree/{revision}[/{folder}]` (`?recursive=`) and
  `POST /api/datasets/{repo}/paths-info/{revision}`: the listings behind `HfFileSystem`'s
  `ls`, `glob` and `info`, which resolve a dataset card's `data_files` patterns.

Each folder is laid out exactly like the published repo it stands for. The commit is the
revision asked for when that is a commit hash (loaders pin one), else `COMMIT`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

COMMIT = "0" * 39 + "1"
_SHA = re.compile(r"[0-9a-f]{40}")
_API = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
_RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


def _commit(revision: str) -> str:
    return revision if _SHA.fullmatch(revision) else COMMIT


def _blob_id(data: bytes) -> str:
    """The git blob id that the hub reports as a file's `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    repos: Mapping[str, Path]
    requests: list[str]

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- responses ----------------------------------------------------------------------------

    def _error(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, commit: str) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, target: Path, commit: str) -> None:
        data = target.read_bytes()
        status, start, end = 200, 0, len(data)
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if ranged and data:
            first, last = ranged.groups()
            if first:
                start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            else:  # a suffix: the last N bytes
                start = max(len(data) - int(last or 0), 0)
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{_blob_id(data)}"')
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[start:end])

    # -- the repo's content -------------------------------------------------------------------

    def _entry(self, root: Path, path: Path) -> dict:
        relative = path.relative_to(root).as_posix()
        if path.is_dir():
            oid = hashlib.sha1(relative.encode()).hexdigest()
            return {"type": "directory", "oid": oid, "path": relative}
        data = path.read_bytes()
        return {"type": "file", "oid": _blob_id(data), "size": len(data), "path": relative}

    def _files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file())

    def _api(self, repo: str, rest: str, query: dict[str, list[str]]) -> None:
        root = self.repos[repo]
        if rest in ("", "/") or rest.startswith("/revision/"):
            revision = rest.removeprefix("/revision/") if rest.startswith("/revision/") else "main"
            commit = _commit(revision)
            siblings = [{"rfilename": p.relative_to(root).as_posix()} for p in self._files(root)]
            info = {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "author": repo.split("/")[0],
                "sha": commit,
                "private": False,
                "gated": False,
                "disabled": False,
                "lastModified": "2024-01-04T16:14:32.000Z",
                "tags": [],
                "siblings": siblings,
            }
            self._json(info, commit)
            return
        tree = re.fullmatch(r"/tree/([^/]+)(?:/(.*))?", rest)
        if tree:
            revision, folder = tree.group(1), tree.group(2) or ""
            base = root / folder
            if not base.is_dir():
                self._error(404, "EntryNotFound")
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            children = base.rglob("*") if recursive else base.iterdir()
            self._json([self._entry(root, p) for p in sorted(children)], _commit(revision))
            return
        info = re.fullmatch(r"/paths-info/([^/]+)", rest)
        if info and self.command == "POST":
            length = int(self.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            paths = [root / p for p in form.get("paths", [])]
            found = [self._entry(root, p) for p in paths if p.exists()]
            self._json(found, _commit(info.group(1)))
            return
        self._error(404, "EntryNotFound")

    # -- dispatch -----------------------------------------------------------------------------

    def _route(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        url = urllib.parse.urlparse(self.path)
        path = urllib.parse.unquote(url.path)
        if api := _API.match(path):
            if api.group("repo") not in self.repos:
                self._error(404, "RepoNotFound")
                return
            self._api(api.group("repo"), api.group("rest") or "", urllib.parse.parse_qs(url.query))
            return
        resolve = _RESOLVE.match(path)
        if resolve is None or resolve.group("repo") not in self.repos:
            self._error(404, "RepoNotFound")
            return
        target = self.repos[resolve.group("repo")] / resolve.group("path")
        if not target.is_file():
            self._error(404, "EntryNotFound")
            return
        self._file(target, _commit(resolve.group("revision")))

    do_HEAD = do_GET = do_POST = _route  # noqa: N815 (http.server's naming)


@contextlib.contextmanager
def hub_server(root: Path | Mapping[str, Path], repo: str | None = None):
    """Serve dataset repos on a free loopback port; yield (endpoint, requests).

    `hub_server(folder, "owner/name")` serves one folder as that repo; `hub_server({"owner/name":
    folder, ...})` serves several. `requests` lists every request as "METHOD path".
    """
    repos = {repo: Path(root)} if repo is not None else dict(root)
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"repos": repos, "requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
