"""A tiny random llama checkpoint with the SmolLM2 tokenizer, a random steering vector, a probe,
and real `python -m mup.serve` processes on loopback ports.

Each server is a subprocess (cwd=tmp_path, sys.executable) so that the installed package is what
runs, started once per module; fixtures wait for /health before handing it out.
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
from pathlib import Path

import numpy as np
import pytest

D_MODEL, N_LAYERS, STEER_LAYER, PROBE_LAYER = 64, 2, 0, 1
API_KEY = "test-key"
NAME = "tiny-steer"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """safetensors llama (2 blocks, d=64) + SmolLM2 tokenizer, weights drawn large so that
    greedy choices are far from ties."""
    torch = pytest.importorskip("torch", reason="transformers/torch build the tiny checkpoint")
    import transformers as tf

    from mup.text import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    path = tmp_path_factory.mktemp("tiny_llama")
    config = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.25 if "embed" not in name else 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vector_file(tmp_path_factory) -> Path:
    v = np.random.default_rng(1).normal(size=D_MODEL).astype(np.float32)
    path = tmp_path_factory.mktemp("vec") / "vector.npy"
    np.save(path, v / np.linalg.norm(v) * 8.0)
    return path


@pytest.fixture(scope="session")
def probe_file(tmp_path_factory) -> Path:
    """A difference-of-means probe at PROBE_LAYER fitted on random labelled activations."""
    from mup import probes

    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 9, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    labels = (np.arange(40) % 2).astype(np.int8)
    acts = rng.normal(size=(int(offsets[-1]), D_MODEL)).astype(np.float32)
    acts += np.repeat(labels, lengths)[:, None] * rng.normal(size=D_MODEL).astype(np.float32)
    data = probes.Activations(acts=acts, offsets=offsets, labels=labels, layers=(PROBE_LAYER,))
    probe = probes.fit("dom", data, layer=PROBE_LAYER)
    assert probe.layers == (PROBE_LAYER,)
    return probe.save(tmp_path_factory.mktemp("probe") / "probe.safetensors")


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


@pytest.fixture
def start_server():
    """Start Servers (args, cwd); every one is stopped at the end of the test."""
    started: list[Server] = []

    def start(args: list[str], cwd: Path, env: dict | None = None) -> Server:
        started.append(Server(args, cwd, env))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def module_server():
    """Start Servers (args, cwd) that live until the end of the test module. (Test modules
    cannot import this conftest: the suite runs from the installed package, no checkout on
    sys.path.)"""
    started: list[Server] = []

    def start(args: list[str], cwd: Path, env: dict | None = None) -> Server:
        started.append(Server(args, cwd, env))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server(tiny_dir, vector_file, probe_file, tmp_path_factory):
    """The main test server: API key, probe, 8 engine slots."""
    cwd = tmp_path_factory.mktemp("serve")
    srv = Server(
        [
            "--model", str(tiny_dir),
            "--vector", str(vector_file),
            "--layer", str(STEER_LAYER),
            "--probe", str(probe_file),
            "--served-name", NAME,
            "--api-key", API_KEY,
            "--max-multiplier", "4",
            "--default-multiplier", "0.5",
            "--max-tokens-per-request", "64",
            "--default-max-tokens", "16",
            "--max-batch", "8",
        ],
        cwd,
    )  # fmt: skip
    srv.name, srv.api_key, srv.steer_layer, srv.probe_layer = (
        NAME,
        API_KEY,
        STEER_LAYER,
        PROBE_LAYER,
    )
    srv.vector = np.load(vector_file)
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
