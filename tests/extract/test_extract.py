"""End to end on the bundled mini set with a tiny random llama: stored activations equal a
direct unpadded per-record forward; content keys, no-op re-runs, overwrite and resume rules."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from mup import store
from mup.extract import ExtractConfig, run

LAYERS = (1, 2)


def _config(model, data, out, **kw) -> ExtractConfig:
    kw.setdefault("batch_tokens", 512)
    return ExtractConfig(
        model=str(model), layers=LAYERS, datasets=(str(data),), out=str(out), progress=False, **kw
    )


def _run(config) -> tuple[str, object]:
    text = io.StringIO()
    summary = run(config, out=text)
    return text.getvalue(), summary


@pytest.fixture(scope="module")
def reference(tiny_model, mini_path):
    """Per-record activations from an unpadded transformers forward (float32): {layer: [T, D]}.

    HF `hidden_states[L]` is the layer convention, so this checks the whole pipeline (bucketing,
    padding, unpadding, storage) and the model port at once, without an XLA compile per length.
    """
    torch = pytest.importorskip("torch", reason="torch is the parity reference")
    import transformers

    from mup.data import load_records
    from mup.text import encode_chats, load_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.eval()
    tokenizer = load_tokenizer(str(tiny_model))
    enc = encode_chats(tokenizer, load_records(mini_path), max_tokens=4096, truncate="left")
    parts = {layer: [] for layer in LAYERS}
    with torch.no_grad():
        for i in range(len(enc.offsets) - 1):
            ids = torch.as_tensor(
                enc.input_ids[enc.offsets[i] : enc.offsets[i + 1]][None].astype(np.int64)
            )
            hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in LAYERS:
                parts[layer].append(hidden[layer][0].numpy())
    return enc, {layer: np.concatenate(parts[layer]) for layer in LAYERS}


@pytest.fixture(scope="module")
def f32_store(tiny_model, mini_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32")
    text, summary = _run(_config(tiny_model, mini_path, out, dtype="float32"))
    return out, text, summary


def test_float32_store_equals_unpadded_forward(f32_store, reference, mini_path):
    out, text, summary = f32_store
    enc, want = reference
    (url,) = summary.stores
    opened = store.open(url)
    assert opened.complete and opened.dtype == "float32"
    np.testing.assert_array_equal(opened.offsets, enc.offsets)
    np.testing.assert_array_equal(opened.input_ids, enc.input_ids)
    np.testing.assert_array_equal(opened.roles, enc.roles)
    for layer in LAYERS:
        got, offsets = opened.read_layer(layer)
        np.testing.assert_array_equal(offsets, enc.offsets)
        # float32 storage: only summation order differs (padding, XLA vs torch kernels).
        np.testing.assert_allclose(got, want[layer], rtol=1e-4, atol=1e-4)
    assert summary.records == 80 and summary.tokens == int(enc.offsets[-1])
    assert "80 records" in text and "tokens/s" in text


def test_store_metadata_and_zarr_python(f32_store, mini_path, tiny_model):
    import zarr

    from mup.data import load_records
    from mup.text import token_mask

    _, _, summary = f32_store
    (url,) = summary.stores
    opened = store.open(url)
    records = load_records(mini_path)
    assert opened.ids == list(records.ids)
    np.testing.assert_array_equal(opened.labels, records.labels)
    np.testing.assert_array_equal(opened.mask, token_mask(opened.roles, opened.offsets, "all"))
    attrs = opened.attrs
    assert attrs["complete"] is True and attrs["layers"] == list(LAYERS)
    assert attrs["model"] == str(tiny_model) and attrs["d_model"] == 64
    assert attrs["dataset_sha256"] == records.sha256
    assert attrs["dataset"] == str(mini_path.resolve())
    assert (attrs["site"], attrs["mask_mode"], attrs["max_tokens"]) == ("residual", "all", 4096)
    assert len(attrs["model_revision"]) == 16 and attrs["tokenizer"]
    group = zarr.open_group(url, mode="r")
    assert group.attrs["format"] == store.FORMAT_NAME
    for layer in LAYERS:
        want, _ = opened.read_layer(layer)
        np.testing.assert_array_equal(group[f"layers/{layer}"][:], want)
    for name in ("offsets", "input_ids", "roles", "mask", "labels"):
        assert group[name].shape[0] in (opened.n_records, opened.n_records + 1, opened.n_tokens)
    np.testing.assert_array_equal(group["offsets"][:], opened.offsets)


def test_float16_store_and_normed_site(tiny_model, mini_path, tmp_path, reference):
    enc, want = reference
    _, summary = _run(_config(tiny_model, mini_path, tmp_path, dtype="float16"))
    opened = store.open(summary.stores[0])
    for layer in LAYERS:
        got, _ = opened.read_layer(layer)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want[layer], rtol=2e-3, atol=2e-3)
    # The normed site is a different store (it is in the key); normed layers stop at L - 1.
    normed_cfg = dataclasses.replace(
        _config(tiny_model, mini_path, tmp_path, dtype="float16", site="normed"), layers=(0, 1)
    )
    _, normed = _run(normed_cfg)
    assert normed.stores[0] != summary.stores[0] and "-normed-" in normed.stores[0]


def test_rerun_is_noop_and_changed_data_is_new_store(f32_store, tiny_model, mini_path, tmp_path):
    out, _, first = f32_store
    (url,) = first.stores
    before = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*") if p.is_file()}
    text, summary = _run(_config(tiny_model, mini_path, out, dtype="float32"))
    assert "nothing to do" in text and "[complete]" in text
    assert summary.tokens == 0 and summary.stores == first.stores
    after = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*") if p.is_file()}
    assert after == before  # not one file rewritten

    changed = tmp_path / mini_path.name
    lines = mini_path.read_text().splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n")
    _, other = _run(_config(tiny_model, changed, out, dtype="float32"))
    assert other.stores[0] != url and other.records == 79
    assert store.open(url).complete  # the old store is untouched


def test_overwrite_and_incomplete_store_rules(tiny_model, mini_path, tmp_path):
    cfg = _config(tiny_model, mini_path, tmp_path, dtype="float32", limit=10)
    _, first = _run(cfg)
    (url,) = first.stores
    _, again = _run(
        _config(tiny_model, mini_path, tmp_path, dtype="float32", limit=10, overwrite=True)
    )
    assert again.records == 10 and store.open(url).complete
    # Make it incomplete the way a killed run leaves it: `complete` unset.
    group = Path(url) / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["complete"] = False
    group.write_text(json.dumps(meta))
    with pytest.raises(store.StoreError, match="incomplete store exists.*--resume"):
        _run(cfg)
    # A resume with another batch plan would compute the remaining rows in other shapes.
    with pytest.raises(store.StoreError, match=r"cannot resume.*batch_tokens 512 -> 1024"):
        _run(
            _config(
                tiny_model, mini_path, tmp_path, dtype="float32", limit=10, resume=True,
                batch_tokens=1024,
            )
        )  # fmt: skip
    assert store.open(url, require_complete=False).attrs["model_dtype"] == "float32"
    _, resumed = _run(
        _config(tiny_model, mini_path, tmp_path, dtype="float32", limit=10, resume=True)
    )
    assert resumed.records == 0 and store.open(url).complete  # every shard was already done


def test_bad_input_errors(tiny_model, mini_path, tmp_path):
    with pytest.raises(ValueError, match="out of range.*2 blocks"):
        _run(
            ExtractConfig(
                model=str(tiny_model),
                layers=(3,),
                datasets=(str(mini_path),),
                out=str(tmp_path),
                progress=False,
            )
        )
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        _config(tiny_model, mini_path, tmp_path, resume=True, overwrite=True)
    from mup.extract import config_from_args

    with pytest.raises(FileNotFoundError, match="no such file"):
        config_from_args(["--dataset", str(tmp_path / "nope*.jsonl"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="comma-separated integers"):
        config_from_args(["--dataset", str(mini_path), "--out", "x", "--layers", "a,b"])


def _objects(root: Path) -> dict[str, bytes]:
    """A store's objects but its group zarr.json (which holds timestamps)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() != "zarr.json"
    }


def test_unfinished_stray_and_foreign_store_directories(tiny_model, mini_path, tmp_path,
                                                        monkeypatch):  # fmt: skip
    """Every refusal is one line, raised while planning (before the model loads); --overwrite
    deletes a (partial) mup store, stray files included, and nothing that is not one; an
    interrupted creation is simply created again, by a plain run or --resume."""
    import shutil

    from mup.store._create import FAIL_AFTER_ENV

    def config(**kw):
        return _config(tiny_model, mini_path, tmp_path, dtype="float32", limit=6, **kw)

    def refused(pattern, **kw):
        text = io.StringIO()
        with pytest.raises(store.StoreError, match=pattern) as e:
            run(config(**kw), out=text)
        assert "\n" not in str(e.value) and text.getvalue() == ""  # not even planned

    _, first = _run(config())
    url = Path(first.stores[0])
    want = _objects(url)
    # Creation or deletion cut short, old shards still there, and a stray lock file.
    (url / "done" / "zarr.json").unlink()
    (url / "LOCK").write_text("")
    for kw in ({}, {"resume": True}):
        refused(
            r"never fully created .*layer shards.*stray files \('LOCK'\); use --overwrite", **kw
        )
    text, _ = _run(config(overwrite=True))
    assert "[overwrite]" in text and _objects(url) == want and store.verify(url).ok
    # A complete store that lost a shard: refused in one line (the --overwrite below redoes it).
    next((url / "layers" / "1" / "c").iterdir()).joinpath("0").unlink()
    refused(r"store .* is damaged: layers/1/c/\d+/0 missing; .*--overwrite")
    # A full disk while offsets are written (metadata there, data not): --resume creates the
    # store again (tests/store/test_create_crash.py walks every step; test_process kill -9s).
    monkeypatch.setenv(FAIL_AFTER_ENV, "offsets/c:raise")
    with pytest.raises(OSError, match="No space left on device"):
        _run(config(overwrite=True))
    monkeypatch.delenv(FAIL_AFTER_ENV)
    with pytest.raises(store.StoreNotFoundError, match="never fully created"):
        store.open(url, require_complete=False)
    text, summary = _run(config(resume=True))
    assert "[recreate]" in text and summary.records == 6
    assert _objects(url) == want and store.open(url).complete
    # Not a mup store at all: refused whatever the flags, and left alone.
    shutil.rmtree(url)
    url.mkdir()
    (url / "LOCK").write_text("")
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        refused(r"holds no mup store \('LOCK'\); mup deletes only its own stores", **kw)
    assert (url / "LOCK").exists()
