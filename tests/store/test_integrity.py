"""Store integrity: flipped bits, lost and empty objects, the completion check, `mup store
verify`, and stores of format version 1 (written here with that version's codec chains)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from _support import stores as synth
from _support.s3 import moto_process

import mup.store as store
from mup.store import _format as F
from mup.store._cli import main as store_main
from mup.store._io import read_group_attrs

SMALL = dict(chunk_tokens=16, shard_tokens=64)


def _complete_store(url, seed=1, **kw):
    meta, acts = synth.make_job(seed=seed, **kw)
    writer = store.create(url, **meta, **SMALL)
    rows = np.arange(writer.n_records)
    for batch in np.array_split(rows, 3):
        writer.write(batch, synth.batch_acts(acts, meta["offsets"], batch))
    writer.finalize()
    return meta, acts


def _chunk_files(url: Path) -> list[Path]:
    return sorted(p for p in url.rglob("*") if p.is_file() and "/c/" in p.as_posix())


def test_every_object_of_a_new_store_ends_in_a_checksum(tmp_path):
    _complete_store(tmp_path / "s")
    for meta_file in (tmp_path / "s").rglob("zarr.json"):
        meta = json.loads(meta_file.read_text())
        if meta["node_type"] != "array":
            continue
        codecs = meta["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            inner = codecs[0]["configuration"]
            assert inner["codecs"][-1] == {"name": "crc32c"}, meta_file
            assert inner["index_codecs"][-1] == {"name": "crc32c"}, meta_file
        else:
            assert codecs[-1] == {"name": "crc32c"}, meta_file
    group = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]
    assert group["format_version"] == store.FORMAT_VERSION == 2 and group["has_labels"] is True


def test_a_flipped_bit_anywhere_in_any_chunk_fails_verify(tmp_path):
    """Every chunk object (shards, their indexes, small arrays, done flags): one bit flipped at
    several places in each, one at a time, and verify names that very object every time."""
    url = tmp_path / "s"
    _complete_store(url)
    assert store.verify(url).ok
    rng = np.random.default_rng(0)
    files = _chunk_files(url)
    assert len(files) == 57  # 2 layers x 17 shards, 17 done flags, 6 small arrays
    for path in files:
        original = path.read_bytes()
        positions = {0, len(original) - 1, *rng.integers(0, len(original), 3).tolist()}
        for pos in positions:
            flipped = bytearray(original)
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
            path.write_bytes(bytes(flipped))
            verdict = store.verify(url)
            key = path.relative_to(url).as_posix()
            name = key.split("/c/")[0]
            assert not verdict.ok, f"bit flip at byte {pos} of {key} went unnoticed"
            assert any(f.startswith((key, name)) for f in verdict.faults), verdict.faults
        path.write_bytes(original)
    assert store.verify(url).ok


@pytest.mark.damages_stores
def test_flipped_bit_in_a_shard_fails_every_reader(tmp_path):
    zarr = pytest.importorskip("zarr")
    url = tmp_path / "s"
    _complete_store(url)
    shard = url / "layers" / "5" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x04  # inside the first inner chunk's compressed bytes
    shard.write_bytes(bytes(data))
    st = store.open(url)  # present and non-empty: only a read can tell
    lost = r"layer 5 .* failed: DATA_LOSS.*layers/5/c/2/0.*Digest mismatch"
    with pytest.raises(store.DamagedStoreError, match=lost):
        st.read_layer(5)
    with pytest.raises(store.DamagedStoreError, match="layers/5/c/2/0"):
        st.read_layer(5, rows=np.arange(st.n_records))
    with pytest.raises(store.DamagedStoreError, match="layers/5/c/2/0"):
        list(st.iter_row_chunks(5))
    st.read_layer(2)  # the other layer is sound
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(url / "layers" / "5"), mode="r")[:]
    raw = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(url / "layers/5")}})
    with pytest.raises(ValueError, match="DATA_LOSS"):
        raw.result().read().result()


@pytest.mark.damages_stores
def test_lost_and_empty_shards_fail_open_and_reads(tmp_path):
    url = tmp_path / "s"
    _complete_store(url)
    st = store.open(url)  # opened while sound
    (url / "layers" / "2" / "c" / "3" / "0").unlink()
    (url / "layers" / "5" / "c" / "7" / "0").write_bytes(b"")
    with pytest.raises(store.DamagedStoreError) as e:
        store.open(url)
    msg = str(e.value)
    assert "layers/2/c/3/0 missing" in msg and "layers/5/c/7/0 empty (0 bytes)" in msg
    assert "\n" not in msg
    # A reader opened before the loss never returns the fill value for it.
    with pytest.raises(store.DamagedStoreError, match="layers/2/c/3/0.*missing"):
        st.read_layer(2)
    with pytest.raises(store.DamagedStoreError, match="layers/5/c/7/0"):
        st.read_layer(5)
    first = int(np.searchsorted(st.offsets, 3 * 64, side="right")) - 1
    with pytest.raises(store.DamagedStoreError, match="layers/2/c/3/0"):
        st.read_layer(2, rows=[first])
    verdict = store.verify(url)
    assert not verdict.ok
    assert "layers/2/c/3/0 missing" in verdict.faults and len(verdict.faults) == 2


@pytest.mark.damages_stores
def test_lost_metadata_objects_fail_open(tmp_path):
    url = tmp_path / "s"
    _complete_store(url)
    (url / "ids" / "c" / "0" / "0").unlink()
    (url / "done" / "c" / "4").unlink()
    with pytest.raises(store.DamagedStoreError, match=r"ids/c/0/0 missing; done/c/4 missing"):
        store.open(url)


def test_completion_refused_over_lost_objects(base_url):
    """Objects deleted behind the writer's back (a server that lost acknowledged writes): it
    refuses to set `complete`, naming them; resuming rewrites a lost shard."""
    url = f"{base_url}/job"
    meta, acts = synth.make_job(seed=2)
    loc = store.parse_location(url)

    def delete(key):
        if loc.kind == "file":
            os.remove(os.path.join(loc.path, key))
        else:
            loc.boto3_client().delete_object(Bucket=loc.bucket, Key=loc.key(key))

    def write_everything(writer):
        rows = writer.pending_rows()
        writer.write(rows, synth.batch_acts(acts, meta["offsets"], rows))
        writer.flush()

    writer = store.create(url, **meta, **SMALL)
    write_everything(writer)
    delete("layers/5/c/2/0")
    with pytest.raises(store.DamagedStoreError, match=r"cannot complete .*layers/5/c/2/0 missing"):
        writer.finalize()
    writer.close()
    partial = store.open(url, require_complete=False)
    assert not partial.complete
    assert not partial.done_rows().all()  # the lost shard's rows are not done
    # The lost shard (still flagged done) is found again on resume and written again.
    resumed = store.open_writer(url)
    lost_rows = resumed.pending_rows()
    assert lost_rows.size and (meta["offsets"][lost_rows + 1] > 2 * 64).all()
    write_everything(resumed)
    resumed.finalize()
    st = store.open(url)
    np.testing.assert_array_equal(st.read_layer(5)[0], acts[5].astype(np.float16))

    writer = store.create(url, **meta, overwrite=True, **SMALL)
    write_everything(writer)
    for key in ("offsets/c/0", "ids/zarr.json", "layers/2/c/0/0"):
        delete(key)
    with pytest.raises(store.DamagedStoreError) as e:
        writer.finalize()
    writer.close()
    for key in ("offsets/c/0", "ids/zarr.json", "layers/2/c/0/0"):
        assert f"{key} missing" in str(e.value)
    assert read_group_attrs(store.parse_location(url))["complete"] is False


def _write_format_1_store(url: Path, meta: dict, acts: dict, done_shards) -> None:
    """A store exactly as format version 1 wrote it: zstd chunks without checksums, the shard
    index with one, `done` flags as bare bytes, no `has_labels` attribute."""
    chunk, shard = SMALL["chunk_tokens"], SMALL["shard_tokens"]
    offsets = meta["offsets"]
    n, t, d = len(meta["ids"]), int(offsets[-1]), meta["d_model"]
    plain = [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
    ]

    def array(name, metadata, data=None):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(url / name) + "/"},
                "metadata": metadata, "create": True,
                "store_data_equal_to_fill_value": True}  # fmt: skip
        arr = ts.open(spec).result()
        if data is not None:
            arr.write(data).result()
        return arr

    def small(dtype, shape, chunks):
        return {
            "shape": shape, "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            "chunk_key_encoding": {"name": "default"}, "codecs": plain,
            "fill_value": False if dtype == "bool" else 0,
        }  # fmt: skip

    attrs = {
        "format": "mup.activations", "format_version": 1, **meta["attrs"],
        "layers": meta["layers"], "d_model": d, "dtype": "float16", "n_records": n,
        "n_tokens": t, "chunk_tokens": chunk, "shard_tokens": shard,
        "ids_encoding": "utf-8, zero-padded uint8 [N, W]", "mup_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00", "complete": False,
    }  # fmt: skip
    url.mkdir(parents=True)
    group = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    (url / "zarr.json").write_text(json.dumps(group))
    (url / "layers").mkdir()
    (url / "layers" / "zarr.json").write_text(json.dumps({**group, "attributes": {}}))
    ids = F.encode_ids(meta["ids"])
    array("offsets", small("int64", [n + 1], [n + 1]), offsets)
    array("ids", small("uint8", list(ids.shape), list(ids.shape)), ids)
    array("input_ids", small("int32", [t], [t]), meta["input_ids"].astype(np.int32))
    array("roles", small("uint8", [t], [t]), meta["roles"])
    array("mask", small("bool", [t], [t]), meta["mask"])
    array("labels", small("int8", [n], [n]), meta["labels"].astype(np.int8))
    n_shards = -(-t // shard)
    for layer in meta["layers"]:
        layer_meta = {
            "shape": [t, d], "data_type": "float16",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard, d]}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [chunk, d],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "zstd", "configuration": {"level": 1, "checksum": False}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end"}}],
            "fill_value": 0.0,
        }  # fmt: skip
        arr = array(f"layers/{layer}", layer_meta)
        for s in done_shards:
            t0, t1 = s * shard, min((s + 1) * shard, t)
            arr[t0:t1].write(acts[layer][t0:t1].astype(np.float16)).result()
    done_meta = {
        "shape": [n_shards], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1]}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}], "fill_value": 0,
    }  # fmt: skip
    done = array("done", done_meta)
    for s in done_shards:
        done[s].write(np.uint8(1)).result()


@pytest.mark.damages_stores
def test_format_1_stores_stay_readable_and_resumable(tmp_path):
    zarr = pytest.importorskip("zarr")
    meta, acts = synth.make_job(seed=13)
    url = tmp_path / "v1"
    n_shards = -(-int(meta["offsets"][-1]) // SMALL["shard_tokens"])
    _write_format_1_store(url, meta, acts, done_shards=range(n_shards // 2))
    codecs_before = {p: p.read_text() for p in url.rglob("zarr.json") if p.parent != url}
    # Resume it: the writer keeps format 1's codecs (no checksum appears mid-array).
    writer = store.open_writer(url)
    rows = writer.pending_rows()
    assert 0 < rows.size < len(meta["ids"])
    writer.write(rows, synth.batch_acts(acts, meta["offsets"], rows))
    writer.finalize()
    assert {p: p.read_text() for p in url.rglob("zarr.json") if p.parent != url} == codecs_before
    st = store.open(url)
    assert st.attrs["format_version"] == 1 and st.complete
    assert st.ids == meta["ids"]
    np.testing.assert_array_equal(st.labels, meta["labels"])
    for layer in meta["layers"]:
        np.testing.assert_array_equal(st.read_layer(layer)[0], acts[layer].astype(np.float16))
        np.testing.assert_array_equal(
            zarr.open_array(str(url / "layers" / str(layer)), mode="r")[:],
            acts[layer].astype(np.float16),
        )
    verdict = store.verify(url)
    assert verdict.ok and "format 1: chunks carry no checksum" in verdict.line()
    (url / "labels" / "c" / "0").unlink()  # format 1 has no has_labels: the listing tells
    with pytest.raises(store.DamagedStoreError, match="labels/c/0 missing"):
        store.open(url)


@pytest.mark.damages_stores
def test_verify_command(tmp_path, capsys):
    out = tmp_path / "out"
    _complete_store(out / "model" / "good", seed=1)
    _complete_store(out / "model" / "bad", seed=2)
    (out / "model" / "bad" / "layers" / "5" / "c" / "1" / "0").unlink()
    partial = out / "model" / "partial"
    meta, _ = synth.make_job(seed=3)
    store.create(partial, **meta, **SMALL).close()

    assert store_main(["verify", str(out / "model" / "good")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"ok     {out / 'model' / 'good'}: format 2, complete")
    assert store_main(["verify", str(out)]) == 1  # an --out location: every store below it
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    by_name = {Path(line.split()[1].rstrip(":")).name: line for line in lines}
    assert by_name["good"].startswith("ok")
    assert by_name["bad"].startswith("FAULT") and "layers/5/c/1/0 missing" in by_name["bad"]
    assert by_name["partial"].startswith("FAULT") and "incomplete: 0 of" in by_name["partial"]
    assert store_main(["verify", str(tmp_path / "nothing")]) == 1
    assert "no mup store here" in capsys.readouterr().out


def test_verify_command_is_a_module(tmp_path):
    url = tmp_path / "s"
    _complete_store(url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    got = subprocess.run([sys.executable, "-m", "mup.store", "verify", str(url)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert got.returncode == 0 and got.stdout.startswith("ok"), got.stderr


@pytest.mark.s3
def test_completion_refused_when_the_bucket_is_gone(monkeypatch):
    """A restarted S3 server that lost everything, bucket included: the completion check fails
    in one StoreError line and never writes `complete`."""
    import boto3

    meta, acts = synth.make_job(seed=3)
    with moto_process() as endpoint:
        for name in ("R2_ACCOUNT_ID", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="lost")
        writer = store.create("s3://lost/job", **meta, **SMALL)
        rows = np.arange(writer.n_records)
        writer.write(rows, synth.batch_acts(acts, meta["offsets"], rows))
        writer.flush()
        for item in client.list_objects_v2(Bucket="lost")["Contents"]:
            client.delete_object(Bucket="lost", Key=item["Key"])
        client.delete_bucket(Bucket="lost")
        with pytest.raises(store.StoreError, match=r"listing s3://lost/job failed: .*NoSuchBucket"):
            writer.finalize()
        writer.close()
        client.create_bucket(Bucket="lost")
        assert client.list_objects_v2(Bucket="lost").get("KeyCount", 0) == 0  # no `complete`


@pytest.mark.s3
def test_verify_on_s3(s3_env, capsys):
    """The same verdicts over S3: a prefix holding stores, one with a lost and one with a
    corrupted shard object."""
    import uuid

    base = f"s3://{synth.BUCKET}/verify-{uuid.uuid4().hex[:8]}"
    for name, seed in (("good", 1), ("lost", 2), ("flipped", 3)):
        _complete_store(f"{base}/model/{name}", seed=seed)
    loc = store.parse_location(base)
    client = loc.boto3_client()
    client.delete_object(Bucket=loc.bucket, Key=loc.key("model/lost/layers/2/c/4/0"))
    key = loc.key("model/flipped/layers/5/c/0/0")
    data = bytearray(client.get_object(Bucket=loc.bucket, Key=key)["Body"].read())
    data[3] ^= 0x10
    client.put_object(Bucket=loc.bucket, Key=key, Body=bytes(data))
    assert store_main(["verify", base]) == 1
    lines = {line.split()[1].rstrip(":").rsplit("/", 1)[1]: line
             for line in capsys.readouterr().out.splitlines()}  # fmt: skip
    assert sorted(lines) == ["flipped", "good", "lost"]
    assert lines["good"].startswith("ok") and "every chunk checksum verified" in lines["good"]
    assert lines["lost"].startswith("FAULT") and "layers/2/c/4/0 missing" in lines["lost"]
    # A flip in the zstd frame header fails decompression before the checksum is reached.
    assert lines["flipped"].startswith("FAULT") and "layers/5/c/0/0: " in lines["flipped"]
    with pytest.raises(store.DamagedStoreError, match="layers/2/c/4/0 missing"):
        store.open(f"{base}/model/lost")
