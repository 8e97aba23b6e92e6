"""Free loopback ports, and real `python -m mup.serve` processes on them.

Each server is a subprocess of `sys.executable` (so the installed package is what runs), its
output in a log file next to `cwd`'s other files; `wait_healthy` polls /health.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mup.serve", "--port", str(self.port), *args],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_healthy(self, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/health", timeout=2) as r,
            ):
                return json.loads(r.read())
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @contextlib.contextmanager
    def healthy(self) -> Iterator[Server]:
        """This server once /health answers; stopped when the block ends."""
        try:
            self.wait_healthy()
            yield self
        finally:
            self.stop()


@contextlib.contextmanager
def server_starter() -> Iterator[Callable[..., Server]]:
    """start(args, cwd, env=None) -> Server; every server it started is stopped at the end."""
    started: list[Server] = []

    def start(args: list[str], cwd: Path, env: dict | None = None) -> Server:
        started.append(Server(args, cwd, env))
        return started[-1]

    try:
        yield start
    finally:
        for srv in started:
            srv.stop()
