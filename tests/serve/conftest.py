"""A tiny random llama checkpoint with the SmolLM2 tokenizer, a random steering vector, a probe,
and real `python -m mup.serve` processes on loopback ports (`_support.servers`), started once
per module; fixtures wait for /health before handing one out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _support.checkpoints import save_tiny_llama
from _support.servers import Server, server_starter

D_MODEL, N_LAYERS, STEER_LAYER, PROBE_LAYER = 64, 2, 0, 1
API_KEY = "test-key"
NAME = "tiny-steer"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """safetensors llama (2 blocks, d=64) + SmolLM2 tokenizer, weights drawn large so that
    greedy choices are far from ties."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"),
        d_model=D_MODEL,
        max_positions=512,
        std=0.25,
        embed_std=1.0,
    )


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


@pytest.fixture
def start_server():
    """Start Servers (args, cwd); every one is stopped at the end of the test."""
    with server_starter() as start:
        yield start


@pytest.fixture(scope="module")
def module_server():
    """Start Servers (args, cwd) that live until the end of the test module."""
    with server_starter() as start:
        yield start


@pytest.fixture(scope="module")
def server(tiny_dir, vector_file, probe_file, tmp_path_factory):
    """The main test server: API key, probe, 8 engine slots."""
    cwd = tmp_path_factory.mktemp("serve")
    srv = Server(
        [
            "--model", str(tiny_dir),
            "--vector", str(vector_file),
            "--block", str(STEER_LAYER),
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
    with srv.healthy():
        yield srv


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
