"""Fixtures for the store tests: locations and synthetic data (the moto S3 server fixtures
`moto_endpoint`, `s3_env`, `moto_process`, `free_port` live in tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_store_synth", Path(__file__).with_name("synth.py"))
synth_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth_module)
BUCKET = synth_module.BUCKET


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
