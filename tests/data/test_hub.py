"""The hub step of find_dataset and `mup data download`, against a loopback hub endpoint.

The endpoint (`_support.hub`) serves a folder laid out like the published dataset repo, with its
real file list, through huggingface_hub's real client (`HF_ENDPOINT`). Each case runs in a
subprocess, as a user's command would: huggingface_hub reads its environment at import.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _support.hub import COMMIT, hub_server

from mup.data import HUB_REPO, bundled_path

# The published repository's files (its README and the upstream code's hub-to-local table).
HUB_FILES = [
    "training/train.jsonl",
    "training/test.jsonl",
    *(
        f"{name}_{kind}/{split}.jsonl"
        for name in ("anthropic_hh", "mt", "mts", "toolace")
        for kind in ("balanced", "raw")
        for split in ("validation", "test")
    ),
    *(
        f"{name}_{kind}/test.jsonl"
        for name in ("mental_health", "aya_redteaming")
        for kind in ("balanced", "raw")
    ),
]


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory) -> Path:
    """Each file holds 4 stakes records whose ids name the file they came from."""
    root = tmp_path_factory.mktemp("hub-repo")
    records = [json.loads(line) for line in bundled_path().read_text().splitlines()[:4]]
    for name in HUB_FILES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{**r, "ids": f"{name}#{i}", "split": "from-file"} for i, r in enumerate(records)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MUP_DATA"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        MUP_CACHE_DIR=str(tmp_path / "mup-cache"),
        **extra,
    )
    return env


def _find(name: str, env: dict[str, str], cwd: Path) -> tuple[Path, str, float]:
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(message)s');"
        "from mup.data import find_dataset; print(find_dataset(sys.argv[1]))"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, name], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip()), done.stderr, time.monotonic() - started


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_download_lays_out_a_data_root(hub_repo, tmp_path):
    dest = tmp_path / "data"
    with hub_server(hub_repo, HUB_REPO) as (endpoint, requests):
        done = subprocess.run(
            [sys.executable, "-m", "mup", "data", "download", "--dest", str(dest)],
            env=_env(tmp_path, endpoint),
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
    assert done.returncode == 0, done.stderr
    # The balanced dev and test sets and the training set, each at its data-root path.
    assert (dest / "mup/evals/dev/anthropic_hh_balanced.jsonl").is_file()
    assert (dest / "mup/evals/test/aya_redteaming_balanced.jsonl").is_file()
    assert not (dest / "mup/evals/dev/mt_raw.jsonl").exists()  # raw sets only when asked
    training = [
        json.loads(x) for x in (dest / "mup/training/prompts_4x.jsonl").read_text().splitlines()
    ]
    assert [r["split"] for r in training] == ["train"] * 4 + ["test"] * 4  # joined, split tagged
    assert {r["ids"].split("#")[0] for r in training} == {
        "training/train.jsonl",
        "training/test.jsonl",
    }
    assert all("/resolve/main/" in r for r in requests if "resolve" in r)
    # The root then serves every lookup, with no hub at all.
    code = (
        "from mup.data import find_dataset;"
        "print(find_dataset('training')); print(find_dataset('test/mental_health'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(tmp_path, f"http://127.0.0.1:{_closed_port()}", MUP_DATA=str(dest)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        str(dest / "mup/training/prompts_4x.jsonl"),
        str(dest / "mup/evals/test/mental_health_balanced.jsonl"),
    ]


def test_hub_download_then_offline_cache(hub_repo, tmp_path):
    with hub_server(hub_repo, HUB_REPO) as (endpoint, _):
        path, log, _ = _find("test/mts", _env(tmp_path, endpoint), tmp_path)
    assert path.parts[-3:] == (COMMIT, "mts_balanced", "test.jsonl")
    assert str(path).startswith(str(tmp_path / "hf"))  # huggingface_hub's own cache, in HF_HOME
    assert json.loads(path.read_text().splitlines()[0])["ids"] == "mts_balanced/test.jsonl#0"
    # Server gone: offline mode, and a plain unreachable endpoint, both reuse the cached copy.
    for extra in ({"HF_HUB_OFFLINE": "1"}, {}):
        env = _env(tmp_path, f"http://127.0.0.1:{_closed_port()}", **extra)
        again, log, _ = _find("test/mts", env, tmp_path)
        assert again == path, log
        assert log == ""


def test_unreachable_hub_falls_back_in_one_line(tmp_path):
    env = _env(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    path, log, seconds = _find("test/toolace", env, tmp_path)
    assert path == bundled_path()
    lines = log.strip().splitlines()
    assert len(lines) == 1, log
    assert "'test/toolace' not found locally or on the hub" in lines[0]
    assert "ConnectError" in lines[0] and "toolace_balanced/test.jsonl" in lines[0]
    assert seconds < 30  # no minute of retries (the import of jax-free mup.data is ~2 s)
    # Offline mode with an empty cache: the same single line, no connection attempted.
    path, log, _ = _find("test/toolace", {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert path == bundled_path() and len(log.strip().splitlines()) == 1, log


def test_missing_file_on_the_hub(hub_repo, tmp_path):
    (hub_repo / "scratch").mkdir(exist_ok=True)
    with hub_server(hub_repo / "scratch", HUB_REPO) as (endpoint, _):  # an empty repo: 404s
        path, log, _ = _find("test/mt", _env(tmp_path, endpoint), tmp_path)
    assert path == bundled_path()
    assert "NotFound" in log and len(log.strip().splitlines()) == 1, log
