"""The suite-wide store audit: at the end of a session, `mup.store.verify` runs on every local
store the tests wrote that vouches for itself (``complete: true``), and the session fails on
any fault. A store that says it is complete must be sound, whichever test wrote it.

Tests that damage complete stores on purpose (bit flips, deleted shards) are marked
``damages_stores``; stores under their tmp_path are left out (a marker file in that tmp_path
says so, which also reaches the controller when pytest-xdist runs the tests in workers: the
controller audits the whole base temp folder once, after every worker has finished). Stores
that never completed (kill -9 mid-run, crash injection) do not vouch for anything and are not
audited.
Set MUP_STORE_AUDIT=0 to skip the audit (e.g. when running a single test while editing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mup.store._format import FORMAT_NAME

DAMAGED_MARKER = ".damages_stores"


def _complete_stores(root: Path):
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if DAMAGED_MARKER in files:
            dirs[:] = []
            continue
        if "zarr.json" not in files:
            continue
        try:
            meta = json.loads((here / "zarr.json").read_text())
        except (OSError, ValueError):
            continue
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if meta.get("node_type") == "group" and attrs.get("format") == FORMAT_NAME:
            dirs[:] = []  # a store's arrays are not stores
            if attrs.get("complete") is True:
                yield here


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "damages_stores: the test corrupts complete stores on purpose (not audited)"
    )


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    if item.get_closest_marker("damages_stores") is not None:
        tmp = getattr(item, "funcargs", {}).get("tmp_path")
        if tmp is not None and Path(tmp).is_dir():
            (Path(tmp) / DAMAGED_MARKER).touch()


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MUP_STORE_AUDIT", "1") == "0" or session.testscollected == 0:
        return
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller audits
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        root = factory.getbasetemp()
    except OSError:
        return
    from mup.store import verify

    stores = list(_complete_stores(Path(root)))
    faults = [v for v in map(verify, map(str, stores)) if not v.ok]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"store audit: {len(stores)} complete stores written by the suite verified, "
            f"{len(faults)} with faults"
        )
        for v in faults:
            reporter.write_line(v.line(), red=True)
    if faults:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
