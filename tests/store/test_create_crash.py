"""Crash windows of store creation: a failure (full disk) or kill -9 right after each of its
writes, and of the deletion that --overwrite does first. After every one, a re-run (`create`
as a plain run or --resume does it, or with overwrite) succeeds and equals a clean run; a
location holding a store's pieces is recognised as such, anything else is never deleted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support import stores as synth

import mup.store as store
from mup.store._create import FAIL_AFTER_ENV

SEED = 5
# Few shards: creation writes none, and each recovered store is written out in full.
SIZES = dict(chunk_tokens=64, shard_tokens=1024)
# Every step of `create`, in order (the job has labels and layers 1 and 4).
STEPS = [
    "deleted",
    "zarr.json",
    "layers/zarr.json",
    *[f"{name}/{part}" for name in ("offsets", "ids", "input_ids", "roles", "mask", "labels")
      for part in ("zarr.json", "c")],
    "layers/1/zarr.json",
    "layers/4/zarr.json",
    "done/zarr.json",
]  # fmt: skip
# --overwrite first deletes the old store: the group zarr.json, then the rest.
OVERWRITE_STEPS = ["zarr.json deleted", *STEPS]


def _objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _fill(writer, acts, offsets) -> None:
    rows = writer.pending_rows()
    for batch in np.array_split(rows, 4):
        writer.write(batch, {k: np.concatenate([a[offsets[r]:offsets[r + 1]] for r in batch])
                             .reshape(-1, a.shape[1]) for k, a in acts.items()})  # fmt: skip
    writer.finalize()


@pytest.fixture(scope="module")
def job():
    return synth.make_job(**synth.CRASH_JOB, seed=SEED)


@pytest.fixture(scope="module")
def clean(job, tmp_path_factory) -> Path:
    """The uninterrupted run every recovered store must equal."""
    meta, acts = job
    url = tmp_path_factory.mktemp("clean") / "store"
    _fill(store.create(url, **meta, **SIZES), acts, meta["offsets"])
    return url


def _assert_equal_to_clean(url: Path, clean: Path) -> None:
    got, want = _objects(url), _objects(clean)
    assert sorted(got) == sorted(want)
    for key in want:
        if key != "zarr.json":
            assert got[key] == want[key], key
    attrs = [json.loads(o["zarr.json"])["attributes"] for o in (got, want)]
    for a in attrs:
        del a["created"], a["completed"]
    assert attrs[0] == attrs[1] and attrs[0]["complete"] is True
    assert store.verify(url).ok


def _recover(url: Path, step: str, overwrite: bool, job) -> None:
    """What a re-run does after the crash, asserting every refusal on the way."""
    meta, acts = job
    found = store.inspect(url)
    if step == "done/zarr.json":  # fully created: an ordinary resume
        assert found.kind == "store"
        _fill(store.open_writer(url), acts, meta["offsets"])
        return
    # Never fully created: no reader or resumer takes it for a store.
    assert found.kind == ("empty" if step == "deleted" else "unfinished"), (step, found)
    with pytest.raises(store.StoreNotFoundError):
        store.open(url, require_complete=False)
    with pytest.raises(store.StoreNotFoundError):
        store.open_writer(url)
    if step == "zarr.json deleted":
        # The old store's shards are still there: only an explicit overwrite deletes them.
        assert not found.recreatable and "holds layer shards" in found.detail
        with pytest.raises(store.StoreExistsError, match="never fully created.*overwrite"):
            store.create(url, **meta, **SIZES)
        writer = store.create(url, **meta, **SIZES, overwrite=True)
    else:
        assert found.kind == "empty" or found.recreatable, found
        writer = store.create(url, **meta, **SIZES)  # a plain re-run or --resume
    _fill(writer, acts, meta["offsets"])


@pytest.fixture(scope="module")
def old_store(tmp_path_factory) -> Path:
    """A complete store of other data, for --overwrite to replace (copied for each step)."""
    meta, acts = synth.make_job(**synth.CRASH_JOB, seed=SEED + 1)
    url = tmp_path_factory.mktemp("old") / "store"
    _fill(store.create(url, **meta, **SIZES), acts, meta["offsets"])
    return url


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_full_disk_at_every_creation_step(overwrite, job, clean, old_store, tmp_path, monkeypatch):
    meta, _ = job
    for i, step in enumerate(OVERWRITE_STEPS if overwrite else STEPS):
        url = tmp_path / f"s{i}"
        if overwrite:
            shutil.copytree(old_store, url)
        monkeypatch.setenv(FAIL_AFTER_ENV, f"{step}:raise")
        with pytest.raises(OSError, match=f"No space left on device .injected after {step}"):
            store.create(url, **meta, **SIZES, overwrite=overwrite)
        monkeypatch.delenv(FAIL_AFTER_ENV)
        _recover(url, step, overwrite, job)
        _assert_equal_to_clean(url, clean)


CREATE = """
import sys
sys.path.insert(0, {here!r})
from _support import stores as synth
import mup.store as store
meta, _ = synth.make_job(**synth.CRASH_JOB, seed={seed})
store.create({url!r}, **meta, **{sizes!r}, overwrite={overwrite})
print("created")
"""


def test_kill9_at_every_creation_step(job, clean, old_store, tmp_path):
    """kill -9 of an --overwrite run after each step: the steps after the deletion leave what a
    new store's creation leaves, so this covers both."""
    for i, step in enumerate(OVERWRITE_STEPS):
        url = tmp_path / f"s{i}"
        shutil.copytree(old_store, url)
        code = CREATE.format(here=str(Path(__file__).parents[1]), seed=SEED, url=str(url),
                             sizes=SIZES, overwrite=True)  # fmt: skip
        env = {**os.environ, FAIL_AFTER_ENV: f"{step}:kill"}
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60)  # fmt: skip
        assert got.returncode == -signal.SIGKILL, (step, got.stdout, got.stderr)
        assert "created" not in got.stdout
        _recover(url, step, True, job)
        _assert_equal_to_clean(url, clean)


def test_what_create_deletes(tmp_path, job):
    meta, acts = job
    # Foreign content is never deleted, with or without overwrite.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "LOCK").write_text("")
    for overwrite in (False, True):
        with pytest.raises(store.StoreExistsError, match=r"holds no mup store \('LOCK'\)"):
            store.create(foreign, **meta, **SIZES, overwrite=overwrite)
    assert (foreign / "LOCK").exists()
    other_zarr = tmp_path / "zarr-array"
    other_zarr.mkdir()
    (other_zarr / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
    with pytest.raises(store.StoreExistsError, match="not a mup store"):
        store.create(other_zarr, **meta, **SIZES, overwrite=True)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert store.inspect(a_file).kind == "foreign"
    with pytest.raises(store.StoreExistsError, match="is a file"):
        store.create(a_file, **meta, **SIZES, overwrite=True)
    # A (partial) store with a stray file: only overwrite deletes it, stray included.
    url = tmp_path / "partial"
    store.create(url, **meta, **SIZES).close()
    (url / "done" / "zarr.json").unlink()
    (url / ".lock").write_text("")
    found = store.inspect(url)
    assert found.kind == "unfinished" and not found.recreatable and "'.lock'" in found.detail
    with pytest.raises(store.StoreExistsError, match="never fully created.*stray"):
        store.create(url, **meta, **SIZES)
    _fill(store.create(url, **meta, **SIZES, overwrite=True), acts, meta["offsets"])
    assert not (url / ".lock").exists() and store.verify(url).ok
    # A stray file inside a whole store does not stop it being read, resumed or overwritten.
    (url / "LOCK").write_text("")
    assert store.inspect(url).kind == "store" and store.open(url).complete
    store.create(url, **meta, **SIZES, overwrite=True).close()
    assert not (url / "LOCK").exists()
    # A group zarr.json cut short (full disk) with nothing else: an interrupted creation.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_ty')
    assert store.inspect(cut).recreatable
    store.create(cut, **meta, **SIZES).close()
