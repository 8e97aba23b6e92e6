"""Fixtures shared by every test area: a real moto S3 server process on loopback. (Helpers that
test modules import live in tests/_support.)

`moto_endpoint` is one server for the whole session with the bucket `S3_BUCKET` created;
`s3_env` points the standard AWS variables at it for one test; `moto_process` starts a server
of one's own (e.g. with moto's auth switched on).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from _support.servers import free_port

S3_BUCKET = "mup-store-test"


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


def boto3_client(endpoint: str, key: str = "test", secret: str = "test"):
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
        boto3_client(endpoint).create_bucket(Bucket=S3_BUCKET)
        yield endpoint


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    """The bucket that exists on `moto_endpoint`."""
    return S3_BUCKET


def s3_variables(endpoint: str) -> dict[str, str]:
    """Environment variables that point the AWS clients at `endpoint` (moto accepts any key)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }


S3_CLEARED = ("R2_ACCOUNT_ID", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """S3 variables pointing at the moto server, for this test only."""
    for name in (*S3_CLEARED, "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_variables(moto_endpoint).items():
        monkeypatch.setenv(name, value)
    return moto_endpoint


# The suite-wide audit of every complete store the tests write (see _support/store_audit.py).
pytest_plugins = ["_support.store_audit"]
