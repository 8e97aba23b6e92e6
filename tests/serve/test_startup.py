"""`mup serve` refuses a taken port in one line, before it reads any model weight."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def test_taken_port_fails_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mup.serve", "--model", "no-such-model", "--port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    # one line naming the flag and the address; the (here impossible) model load never ran
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "no-such-model" not in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.perf_counter() - t0 < 60
