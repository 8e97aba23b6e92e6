"""A real `python -m mup.serve` of a tiny random llama (one per test session of each area that
imports these fixtures into its conftest, started only when a test asks for it), and a loopback
proxy in front of it that records every request it forwards, so that tests can count what a
client (labelling, judging) asked for, across processes.

The proxy can also hold requests: after `hold_after(n)` it forwards n more chat requests and
parks the rest unanswered (never forwarded), which lets a test kill a client process at a
moment when exactly n requests have been made and answered (`kill_after_lines`).
`fail_next(k)` answers the next k chat requests with a 503 itself (a failing network element in
front of a real server), for the client's retries; `refuse` names request fields that it answers
with an OpenAI-style 400, as servers that lack them do.

In a conftest: ``from _support.endpoints import proxy, server, tiny_dir  # noqa: F401``.
"""

from __future__ import annotations

import http.client
import http.server
import json
import signal
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from _support.checkpoints import save_tiny_llama
from _support.servers import Server

NAME = "tiny-labeller"
MAX_CONTEXT = 2048


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """2 blocks, d=32, SmolLM2's tokenizer; transformers' default init: junk answers."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory):
    srv = Server(
        [
            "--model", str(tiny_dir),
            "--served-name", NAME,
            "--max-context", str(MAX_CONTEXT),
            "--max-batch", "8",
            "--no-warmup",  # compile only the shapes the tests use
        ],
        tmp_path_factory.mktemp("serve"),
    )  # fmt: skip
    with srv.healthy():
        yield srv


class CountingProxy:
    """Forwards HTTP requests to `upstream`, recording each forwarded chat request body."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlparse(upstream)
        self._host, self._port = parsed.hostname, parsed.port
        self.chats: list[dict] = []  # forwarded /v1/chat/completions bodies, in order
        self.answers: list[dict] = []  # the server's answers to them (in completion order)
        self.answered: list[dict] = []  # the forwarded bodies the server answered with a 200
        self.paths: list[str] = []  # every request that reached the proxy, "METHOD /path"
        self.failed = 0  # chat requests answered with an error by fail_next
        self._fail = 0
        self._fail_status = 503
        self.refuse: set[str] = set()  # chat request fields answered with a 400
        self.refused: list[str] = []  # the field each refused request was refused for
        self._cond = threading.Condition()
        self._limit: int | None = None
        self._epoch = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802 (http.server's naming)
                proxy.paths.append(f"GET {self.path}")
                proxy._forward(self, None)

            def do_POST(self):  # noqa: N802
                proxy.paths.append(f"POST {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                chat = self.path.endswith("/chat/completions")
                refused = [f for f in sorted(proxy.refuse) if chat and f in json.loads(body)]
                if refused:
                    proxy.refused.append(refused[0])
                    error = {
                        "message": f"'{refused[0]}' is not supported by this server",
                        "type": "invalid_request_error",
                        "param": refused[0],
                        "code": "unsupported_parameter",
                    }
                    data = json.dumps({"error": error}).encode()
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if chat and not proxy._admit(body):
                    try:  # its client is usually gone (killed) by now
                        self.send_response(proxy._fail_status)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    except OSError:
                        pass
                    return
                data = proxy._forward(self, body)
                if chat and data is not None:
                    proxy.answers.append(json.loads(data))
                    proxy.answered.append(json.loads(body))

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _admit(self, body: bytes) -> bool:
        """Whether to forward this chat request: always, unless failed or held (then: never)."""
        with self._cond:
            if self._fail > 0:
                self._fail -= 1
                self.failed += 1
                return False
            epoch = self._epoch
            while self._limit is not None and len(self.chats) >= self._limit:
                if not self._cond.wait(timeout=120) or self._epoch != epoch:
                    return False  # released (its client was killed): drop it unforwarded
            self.chats.append(json.loads(body))
            return True

    def hold_after(self, n: int) -> None:
        """Forward n more chat requests, then park the rest."""
        with self._cond:
            self._limit = len(self.chats) + n

    def fail_next(self, k: int, status: int = 503) -> None:
        """Answer the next k chat requests with `status` (503, 500, 429...) instead of
        forwarding them."""
        with self._cond:
            self._fail = k
            self._fail_status = status

    def release(self) -> None:
        """Stop holding; parked requests are dropped without being forwarded."""
        with self._cond:
            self._limit = None
            self._epoch += 1
            self._cond.notify_all()

    def _forward(self, handler, body: bytes | None) -> bytes | None:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=300)
        try:
            headers = {
                k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")
            }
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "date"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return data if response.status == 200 else None

    def user_texts(self, start: int = 0) -> list[str]:
        """The user message of each forwarded chat request from index `start` on."""
        return [
            next(m["content"] for m in body["messages"] if m["role"] == "user")
            for body in self.chats[start:]
        ]

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def proxy(server):
    """A fresh counting proxy in front of the session's server, for one test."""
    p = CountingProxy(server.url)
    yield p
    p.close()


def kill_after_lines(proxy: CountingProxy, args: list[str], out: Path, n: int, what: str) -> int:
    """Run the client command `args` with the proxy answering n chat requests, and SIGKILL it
    once `out` holds n complete lines and the requests it then makes are parked (unanswered,
    never forwarded); its exit status. `what` names the process in a failure ("labelling")."""
    proxy.hold_after(n)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= n):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, f"the {what} process wrote nothing"
            time.sleep(0.05)
        time.sleep(0.3)  # let the parked requests reach the proxy
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode
