"""Fixtures shared by every test area: a real moto S3 server process on loopback. (Helpers that
test modules import live in tests/_support.)

`moto_endpoint` is one server for the whole session with the bucket `S3_BUCKET` created;
`s3_env` points the standard AWS variables at it for one test. A server of one's own (e.g. with
moto's auth switched on) is `_support.s3.moto_process`.
"""

from __future__ import annotations

import pytest
from _support.s3 import boto3_client, moto_process

S3_BUCKET = "mup-store-test"


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
