"""Fixtures for the store tests: locations and synthetic data (the moto S3 server fixtures
`moto_endpoint`, `s3_env`, `moto_process`, `free_port` live in tests/conftest.py)."""

from __future__ import annotations

import uuid

import pytest
from _support import stores as synth_module
from _support.stores import BUCKET


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def base_url(request, tmp_path):
    """A fresh parent location (local dir or s3 prefix) for one test."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def synth():
    """`_support.stores` (make_job, batch_acts, JOB, BUCKET, CRASH_JOB, CRASH_STORE)."""
    return synth_module
