"""Crash safety: SIGKILL a writer process at several points, resume, compare with a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from _support import stores as synth

import mup.store as store

SCRIPT = Path(__file__).with_name("crash_writer.py")
SEED = 21
# (how to pick the kill point, value): after K "wrote" lines, or S seconds after the restart.
# Timed kills come early, while most rows remain: a fast machine must not finish the store
# before a timer fires (the schedule writes at most ~90 of the 120 rows before the last run).
KILLS = [("seconds", 0.15), ("lines", 3), ("seconds", 0.3), ("lines", 2), ("lines", 1)]
KILLS_S3 = KILLS[:3]  # moto answers slowly; three kill points keep the test within budget


def _objects(url: str) -> dict[str, bytes]:
    """Every object of a store (local files or S3 objects) by relative key."""
    loc = store.parse_location(url)
    out = {}
    if loc.kind == "file":
        for p in Path(loc.path).rglob("*"):
            if p.is_file():
                out[p.relative_to(loc.path).as_posix()] = p.read_bytes()
        return out
    client = loc.boto3_client()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=loc.bucket, Prefix=loc.prefix + "/"
    ):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=loc.bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(loc.prefix) + 1 :]] = body
    return out


def _reference(url: str) -> None:
    meta, acts = synth.make_job(**synth.CRASH_JOB, seed=SEED)
    writer = store.create(url, **meta, **synth.CRASH_STORE)
    rows = np.arange(writer.n_records)
    for batch in np.array_split(rows, 10):
        writer.write(batch, synth.batch_acts(acts, meta["offsets"], batch))
    writer.finalize()


def _start(url: str, mode: str, tmp_path: Path, part: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), url, str(SEED), "0.04", mode] + ([part] if part else []),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A SIGKILLed boto3-mode writer cannot remove its staging dir: keep it under tmp_path.
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )


def _run(url: str, mode: str, tmp_path: Path, kill=None, part: str | None = None) -> str:
    proc = _start(url, mode, tmp_path, part)
    lines = []
    try:
        if kill is not None:
            how, value = kill
            lines.append(proc.stdout.readline())  # "resumed with ..." : imports are done
            if how == "seconds":
                time.sleep(value)
            else:
                while sum(line.startswith("wrote") for line in lines) < value:
                    line = proc.stdout.readline()
                    assert line, f"writer ended early: {''.join(lines)} {proc.stderr.read()}"
                    lines.append(line)
            os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines.append(out)
    text = "".join(lines)
    if kill is None:
        assert proc.returncode == 0, f"writer failed:\n{text}\n{err}"
        assert "finalized" in text
    else:
        assert proc.returncode == -signal.SIGKILL, f"writer was not killed ({kill}):\n{text}\n{err}"
        assert "finalized" not in text
    return text


def _crash_and_resume(url: str, ref_url: str, mode: str, tmp_path: Path, kills) -> None:
    done_counts = []
    for kill in kills:
        text = _run(url, mode, tmp_path, kill)
        done_counts.append(int(text.split("resumed with ")[1].split()[0]))
        with pytest.raises(store.IncompleteStoreError):
            store.open(url)
    _run(url, mode, tmp_path)
    # Progress survived the kills (records done only ever grow) and the last run finished it.
    assert done_counts == sorted(done_counts) and done_counts[-1] > 0

    _assert_same_as_clean_run(url, ref_url)


def _assert_same_as_clean_run(url: str, ref_url: str) -> None:
    _reference(ref_url)
    got, ref = _objects(url), _objects(ref_url)
    assert sorted(got) == sorted(ref)  # no stray temporary or extra objects
    for key in ref:
        if key == "zarr.json":
            continue
        assert got[key] == ref[key], f"object {key} differs from the uninterrupted run"
    attrs = {
        k: json.loads(v)["attributes"]
        for k, v in (("got", got["zarr.json"]), ("ref", ref["zarr.json"]))
    }
    for a in attrs.values():
        a.pop("created")
        a.pop("completed")
    assert attrs["got"] == attrs["ref"] and attrs["got"]["complete"] is True
    st = store.open(url)
    assert store.verify(url).ok
    meta, acts = synth.make_job(**synth.CRASH_JOB, seed=SEED)
    assert st.done_rows().all() and st.ids == meta["ids"]
    for layer in st.layers:
        np.testing.assert_array_equal(st.read_layer(layer)[0], acts[layer].astype(np.float16))


def test_kill9_and_resume_local(tmp_path):
    _crash_and_resume(
        str(tmp_path / "crashy"), str(tmp_path / "clean"), "tensorstore", tmp_path, KILLS
    )


@pytest.mark.s3
@pytest.mark.parametrize("mode", ["tensorstore", "boto3"])
def test_kill9_and_resume_s3(s3_env, tmp_path, mode):
    base = f"s3://{synth.BUCKET}/crash-{uuid.uuid4().hex[:8]}"
    _crash_and_resume(f"{base}/crashy", f"{base}/clean", mode, tmp_path, KILLS_S3)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_parts_concurrently_with_a_crash(where, tmp_path, request):
    """The multi-host pattern: two processes write disjoint shard blocks of one store at once;
    one is killed and resumed; then a full writer finalizes. Equal to a single clean writer."""
    if where == "s3":
        request.getfixturevalue("s3_env")
        base = f"s3://{synth.BUCKET}/parts-{uuid.uuid4().hex[:8]}"
    else:
        base = str(tmp_path)
    url = f"{base}/parts"
    meta, _ = synth.make_job(**synth.CRASH_JOB, seed=SEED)
    store.create(url, **meta, **synth.CRASH_STORE).close()
    first = _start(url, "tensorstore", tmp_path, "0/2")
    _run(url, "tensorstore", tmp_path, kill=("lines", 3), part="1/2")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "finalized" in out, err
    with pytest.raises(store.IncompleteStoreError):
        store.open(url)  # parts finished, nobody set `complete` yet
    with pytest.raises(ValueError, match="have not been written"):
        store.open_writer(url).finalize()  # part 1 is still missing rows
    _run(url, "tensorstore", tmp_path, part="1/2")
    writer = store.open_writer(url)
    assert writer.pending_rows().size == 0
    writer.finalize()
    _assert_same_as_clean_run(url, f"{base}/clean")
