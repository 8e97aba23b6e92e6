"""Fixtures for the store tests: locations (the moto S3 server fixtures `moto_endpoint` and
`s3_env` live in tests/conftest.py; synthetic data comes from `_support.stores`)."""

from __future__ import annotations

import uuid

import pytest
from _support.stores import BUCKET


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def base_url(request, tmp_path):
    """A fresh parent location (local dir or s3 prefix) for one test."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
