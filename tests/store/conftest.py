"""Fixtures for the store tests: a real moto S3 server process on loopback, S3 env vars, data."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_store_synth", Path(__file__).with_name("synth.py"))
synth_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth_module)
BUCKET = synth_module.BUCKET


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_process(extra_env: dict | None = None):
    """Start `python -m moto.server` on a free loopback port; yield its endpoint URL."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answered
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not answer within 60 s") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _boto3(endpoint: str, key: str = "test", secret: str = "test"):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required"),
    )


@pytest.fixture(name="moto_process")
def _moto_process_fixture():
    """The moto server context manager, for tests that need a server of their own."""
    return moto_process


@pytest.fixture(name="free_port")
def _free_port_fixture():
    return free_port


@pytest.fixture(scope="session")
def moto_endpoint():
    with moto_process() as endpoint:
        _boto3(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """S3 variables pointing at the moto server, for this test only."""
    for name in ("R2_ACCOUNT_ID", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return moto_endpoint


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def base_url(request, tmp_path):
    """A fresh parent location (local dir or s3 prefix) for one test."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def synth():
    """The synthetic-job helpers (make_job, batch_acts, JOB, BUCKET)."""
    return synth_module
