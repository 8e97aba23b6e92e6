"""Activation store: round trips, resume, listing, zarr-python interop, errors (local, moto S3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _support import stores as synth

import mup.store as store

SMALL = dict(chunk_tokens=16, shard_tokens=64)


def _expected(acts, dtype="float16"):
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {layer: a.astype(np_dtype) for layer, a in acts.items()}


def _write_all(writer, acts, offsets, rng, n_batches=6):
    rows = rng.permutation(writer.n_records)
    for batch in np.array_split(rows, n_batches):
        writer.write(batch, _batch(acts, offsets, batch))


def _batch(acts, offsets, rows):
    return {
        layer: np.concatenate([a[offsets[r] : offsets[r + 1]] for r in rows]).reshape(
            -1, a.shape[1]
        )
        for layer, a in acts.items()
    }


def _check_store(st, meta, acts, dtype="float16"):
    exp = _expected(acts, dtype)
    assert st.complete and st.dtype == dtype
    np.testing.assert_array_equal(st.offsets, meta["offsets"])
    assert st.ids == meta["ids"]
    np.testing.assert_array_equal(st.input_ids, meta["input_ids"])
    np.testing.assert_array_equal(st.roles, meta["roles"])
    np.testing.assert_array_equal(st.mask, meta["mask"])
    np.testing.assert_array_equal(st.labels, meta["labels"])
    for layer in meta["layers"]:
        got, off = st.read_layer(layer)
        assert got.dtype == exp[layer].dtype
        np.testing.assert_array_equal(got, exp[layer])
        np.testing.assert_array_equal(off, meta["offsets"])
    verdict = store.verify(st.url)  # every object present, every chunk checksum sound
    assert verdict.ok, verdict.line()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_roundtrip_random_order_local(tmp_path, dtype):
    meta, acts = synth.make_job(seed=1)
    url = tmp_path / "store"
    writer = store.create(url, **meta, dtype=dtype, **SMALL)
    _write_all(writer, acts, meta["offsets"], np.random.default_rng(0))
    writer.finalize()
    _check_store(store.open(url), meta, acts, dtype)


def test_roundtrip_random_order(base_url):
    meta, acts = synth.make_job(seed=2)
    url = f"{base_url}/job"
    writer = store.create(url, **meta, **SMALL)
    _write_all(writer, acts, meta["offsets"], np.random.default_rng(1))
    writer.finalize()
    st = store.open(url)
    _check_store(st, meta, acts)
    exp = _expected(acts)[5]
    off = meta["offsets"]
    rows = np.array([7, 8, 9, 0, 30, 3])  # adjacent run, a jump back, an empty record
    got, got_off = st.read_layer(5, rows)
    np.testing.assert_array_equal(got, np.concatenate([exp[off[r] : off[r + 1]] for r in rows]))
    np.testing.assert_array_equal(np.diff(got_off), off[rows + 1] - off[rows])
    seen = []
    for chunk_rows, chunk, chunk_off in st.iter_row_chunks(2, max_bytes=40 * 8 * 2):
        assert chunk.nbytes <= 40 * 8 * 2 or chunk_rows.size == 1
        np.testing.assert_array_equal(
            chunk, _expected(acts)[2][off[chunk_rows[0]] : off[chunk_rows[-1] + 1]]
        )
        np.testing.assert_array_equal(
            chunk_off, off[chunk_rows[0] : chunk_rows[-1] + 2] - off[chunk_rows[0]]
        )
        seen.extend(chunk_rows.tolist())
    assert seen == list(range(st.n_records))


def test_resume_after_partial_write(base_url):
    meta, acts = synth.make_job(seed=3)
    url = f"{base_url}/job"
    off = meta["offsets"]
    writer = store.create(url, **meta, **SMALL)
    first = np.arange(0, 20)  # a prefix of rows: some shards complete, one partly filled
    writer.write(first[::-1], _batch(acts, off, first[::-1]))
    writer.flush()
    done_before = writer.done_rows()
    writer.close()  # stop without finalize: the partly filled shard is lost
    assert done_before[:5].all() and not done_before.all()

    with pytest.raises(store.IncompleteStoreError, match="incomplete"):
        store.open(url)
    partial = store.open(url, require_complete=False)
    np.testing.assert_array_equal(partial.done_rows(), done_before)

    resumed = store.open_writer(url)
    np.testing.assert_array_equal(resumed.done_rows(), done_before)
    done_row = int(np.flatnonzero(done_before & (np.diff(off) > 0))[0])
    with pytest.raises(ValueError, match="already done"):
        resumed.write([done_row], _batch(acts, off, [done_row]))
    todo = resumed.pending_rows()
    np.testing.assert_array_equal(todo, np.flatnonzero(~done_before))
    rng = np.random.default_rng(5)
    for batch in np.array_split(rng.permutation(todo), 4):
        resumed.write(batch, _batch(acts, off, batch))
    resumed.finalize()
    _check_store(store.open(url), meta, acts)
    # A complete store reopens with nothing left to do.
    again = store.open_writer(url)
    assert again.done_rows().all() and again.pending_rows().size == 0
    again.finalize()


def test_finalize_refuses_missing_rows(tmp_path):
    meta, acts = synth.make_job(seed=4)
    writer = store.create(tmp_path / "s", **meta, **SMALL)
    rows = np.arange(10)
    writer.write(rows, _batch(acts, meta["offsets"], rows))
    with pytest.raises(ValueError, match="have not been written"):
        writer.finalize()
    writer.close()


def test_list_stores(base_url):
    meta, acts = synth.make_job(n=6, seed=5)
    assert store.list_stores(base_url) == []
    keys = []
    for i, layers in enumerate([(1,), (1, 3)]):
        m, a = synth.make_job(n=6, seed=5 + i, layers=layers)
        key = store.store_key(
            dataset_sha256=m["attrs"]["dataset_sha256"], model="tiny", site="residual",
            layers=layers, mask_mode="all", max_tokens=64, dtype="float16",
        )  # fmt: skip
        keys.append(key)
        w = store.create(f"{base_url}/{key}", **m, **SMALL)
        if i == 0:
            rows = np.arange(6)
            w.write(rows, _batch(a, m["offsets"], rows))
            w.finalize()
        else:
            w.close()
    found = store.list_stores(base_url)
    assert [f.key for f in found] == sorted(keys)
    by_key = {f.key: f for f in found}
    assert by_key[keys[0]].complete and not by_key[keys[1]].complete
    assert by_key[keys[1]].attrs["layers"] == [1, 3]
    assert by_key[keys[0]].url.endswith(keys[0])
    assert store.open(by_key[keys[0]].url).n_records == 6


def test_zarr_python_reads_every_array(tmp_path):
    zarr = pytest.importorskip("zarr")
    meta, acts = synth.make_job(seed=6)
    url = tmp_path / "store"
    writer = store.create(url, **meta, dtype="float16", **SMALL)
    _write_all(writer, acts, meta["offsets"], np.random.default_rng(2))
    writer.finalize()
    group = zarr.open_group(str(url), mode="r")
    assert group.attrs["format"] == store.FORMAT_NAME and group.attrs["complete"] is True
    np.testing.assert_array_equal(group["offsets"][:], meta["offsets"])
    ids = [bytes(r).rstrip(b"\0").decode() for r in group["ids"][:]]
    assert ids == meta["ids"]
    np.testing.assert_array_equal(group["input_ids"][:], meta["input_ids"])
    np.testing.assert_array_equal(group["roles"][:], meta["roles"])
    np.testing.assert_array_equal(group["mask"][:], meta["mask"])
    np.testing.assert_array_equal(group["labels"][:], meta["labels"])
    assert group["done"][:].all()
    for layer in meta["layers"]:
        np.testing.assert_array_equal(group[f"layers/{layer}"][:], acts[layer].astype(np.float16))


def test_bfloat16_zarr_python_workaround(tmp_path):
    """zarr-python 3 has no bfloat16 data type; tensorstore and register_zarr_bfloat16 read it."""
    zarr = pytest.importorskip("zarr")
    import ml_dtypes
    import tensorstore as ts
    from zarr.core.dtype import data_type_registry

    meta, acts = synth.make_job(n=8, seed=7, layers=(3,))
    url = tmp_path / "store"
    writer = store.create(url, **meta, dtype="bfloat16", **SMALL)
    rows = np.arange(8)
    writer.write(rows, _batch(acts, meta["offsets"], rows))
    writer.finalize()
    expected = acts[3].astype(ml_dtypes.bfloat16)
    if "bfloat16" not in data_type_registry.contents:
        with pytest.raises(ValueError, match="bfloat16"):
            zarr.open_array(str(url / "layers" / "3"), mode="r")
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(url / "layers/3")}})
    np.testing.assert_array_equal(arr.result().read().result(), expected)
    store.register_zarr_bfloat16()
    store.register_zarr_bfloat16()  # idempotent
    got = zarr.open_group(str(url), mode="r")["layers/3"][:]
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_store_key_stability():
    kw = dict(
        dataset_sha256="ab" * 32, model="smollm2-135m", site="residual", layers=[11, 5],
        mask_mode="all", max_tokens=1024, dtype="float16",
    )  # fmt: skip
    key = store.store_key(**kw)
    # Pinned: a changed key would orphan every store users already wrote.
    assert key == store.store_key(**kw) == "cb4efc0540801fd9"
    assert store.store_key(**{**kw, "layers": [5, 11]}) == key
    for field, other in [
        ("dataset_sha256", "cd" * 32), ("model", "llama-1b"), ("site", "normed"),
        ("layers", [11]), ("mask_mode", "assistant"), ("max_tokens", None), ("dtype", "bfloat16"),
        ("compute_dtype", "bfloat16"),
    ]:  # fmt: skip
        assert store.store_key(**{**kw, field: other}) != key, field
    assert store.store_key(**kw, compute_dtype="float32") == key  # the default: pinned key kept


def test_create_validates_inputs(tmp_path):
    meta, _ = synth.make_job(seed=8)
    t = int(meta["offsets"][-1])
    bad = [
        ({"input_ids": np.zeros(t - 1, np.int64)}, rf"input_ids must have shape \[T\]=\[{t}\]"),
        ({"mask": np.zeros(t, np.int8)}, "mask must be a bool array"),
        ({"labels": np.full(len(meta["ids"]), 2)}, "expected 1 .high., 0 .low. or -1"),
        ({"ids": meta["ids"][:-1]}, "ids must have N=37"),
        ({"offsets": meta["offsets"][::-1]}, "non-decreasing"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"layers": [2, 2]}, "distinct"),
        ({"attrs": {"model": "x"}}, "missing job attributes"),
        ({"attrs": {**meta["attrs"], "complete": True}}, "store-owned"),
    ]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            store.create(tmp_path / "s", **{**meta, **change}, **SMALL)
    assert not (tmp_path / "s").exists()  # nothing written before validation passed


def test_write_validates_inputs(tmp_path):
    meta, acts = synth.make_job(seed=9)
    off = meta["offsets"]
    writer = store.create(tmp_path / "s", **meta, **SMALL)
    rows = np.array([4, 1])
    good = _batch(acts, off, rows)
    n_tok = int(off[5] - off[4] + off[2] - off[1])
    with pytest.raises(ValueError, match=rf"acts\[2\] must have shape .*\[{n_tok}, 8\]"):
        writer.write(rows, {**good, 2: good[2][:-1]})
    with pytest.raises(ValueError, match="every stored layer"):
        writer.write(rows, {2: good[2]})
    with pytest.raises(ValueError, match="out of range"):
        writer.write([37], {k: v[:0] for k, v in good.items()})
    with pytest.raises(ValueError, match="duplicates"):
        writer.write([1, 1], _batch(acts, off, [1, 1]))
    with pytest.raises(ValueError, match="floating point"):
        writer.write(rows, {k: v.astype(np.int32) for k, v in good.items()})
    overflow = {k: v.copy() for k, v in good.items()}
    overflow[5][3, 0] = 1e6  # beyond float16's range
    with pytest.raises(ValueError, match=r"non-finite value at row \d+ after casting to float16"):
        writer.write(rows, overflow)
    writer.write(rows, good)
    with pytest.raises(ValueError, match="already written"):
        writer.write(rows[:1], _batch(acts, off, rows[:1]))
    writer.close()


def test_reader_errors(tmp_path):
    meta, acts = synth.make_job(n=5, seed=10)
    url = tmp_path / "s"
    w = store.create(url, **meta, **SMALL)
    rows = np.arange(5)
    w.write(rows, _batch(acts, meta["offsets"], rows))
    w.finalize()
    st = store.open(url)
    with pytest.raises(KeyError, match=r"layer 7 is not in store .*available layers: \[2, 5\]"):
        st.read_layer(7)
    with pytest.raises(store.StoreNotFoundError):
        store.open(tmp_path / "nothing")
    with pytest.raises(store.StoreNotFoundError):
        store.open_writer(tmp_path / "nothing")


def test_create_refuses_to_clobber(tmp_path):
    meta, _ = synth.make_job(n=5, seed=11)
    url = tmp_path / "s"
    store.create(url, **meta, **SMALL).close()
    with pytest.raises(FileExistsError, match="open_writer"):
        store.create(url, **meta, **SMALL)
    store.create(url, **meta, overwrite=True, **SMALL).close()
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no mup store"):
        store.create(other, **meta, overwrite=True, **SMALL)
    assert (other / "precious.txt").read_text() == "keep me"
    # A store whose creation was interrupted (no `done` array yet) is created again.
    Path(url / "done" / "zarr.json").unlink()
    with pytest.raises(store.StoreNotFoundError, match="interrupted"):
        store.open_writer(url)
    store.create(url, **meta, **SMALL).close()
    assert json.loads((url / "zarr.json").read_text())["attributes"]["complete"] is False


@pytest.mark.s3
def test_boto3_upload_matches_tensorstore(s3_env):
    meta, acts = synth.make_job(seed=12)
    urls = {}
    for mode in ("tensorstore", "boto3"):
        url = f"s3://{synth.BUCKET}/modes/{mode}"
        w = store.create(url, **meta, overwrite=True, s3_upload=mode, **SMALL)
        _write_all(w, acts, meta["offsets"], np.random.default_rng(3))
        w.finalize()
        urls[mode] = url
    for url in urls.values():
        _check_store(store.open(url), meta, acts)
    from mup.store import parse_location

    loc = {m: parse_location(u) for m, u in urls.items()}
    client = loc["boto3"].boto3_client()
    for layer in meta["layers"]:
        for s in range(3):
            blobs = [
                client.get_object(Bucket=synth.BUCKET, Key=loc[m].key(f"layers/{layer}/c/{s}/0"))[
                    "Body"
                ].read()
                for m in ("tensorstore", "boto3")
            ]
            assert blobs[0] == blobs[1]


@pytest.mark.s3
def test_preflight_ok_and_missing_bucket(s3_env):
    assert store.preflight(f"s3://{'mup-store-test'}/x").kind == "s3"
    with pytest.raises(store.StoreAccessError, match="bucket 'no-such-bucket' does not exist"):
        store.preflight("s3://no-such-bucket/x")


def test_preflight_local(tmp_path):
    assert store.preflight(tmp_path / "a" / "b").kind == "file"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(store.StoreAccessError, match="not a writable directory"):
        store.preflight(f / "sub")
