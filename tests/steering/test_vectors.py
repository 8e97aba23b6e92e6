"""Vector files and difference-of-means vectors (store with a planted direction, paired prompts).

References: numpy computations over the same activations (store), and per-conversation unpadded
forward captures pooled in numpy (pairs).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mup.steering import (
    SteeringVector,
    VectorFileError,
    difference_vector,
    dom_from_pairs,
    dom_from_store,
    encode_pairs,
    load_pairs,
    load_vector,
    save_vector,
)

JOB = {
    "model": "synthetic",
    "model_revision": "0" * 40,
    "dataset": "planted.jsonl",
    "dataset_sha256": "cd" * 32,
    "site": "residual",
    "mask_mode": "assistant",
    "tokenizer": "synthetic",
    "max_tokens": 64,
}


# ---- vector files ---------------------------------------------------------------------------


def test_safetensors_round_trip_keeps_metadata(tmp_path):
    v = np.random.default_rng(0).normal(size=24).astype(np.float32)
    sv = SteeringVector(
        vector=v, block=7, model="m", method="bipo", epoch=3, extra={"metrics": {"loss": 0.5}}
    )
    path = save_vector(tmp_path / "v.safetensors", sv)
    got = load_vector(path, d_model=24)
    np.testing.assert_array_equal(got.vector, v)
    assert (got.block, got.model, got.method, got.epoch) == (7, "m", "bipo", 3)
    assert got.extra["metrics"] == {"loss": 0.5}
    assert got.created == sv.created
    assert got.norm == pytest.approx(float(np.linalg.norm(v)))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert float(meta["norm"]) == pytest.approx(float(np.linalg.norm(v)))
    assert set(meta) >= {"model", "block", "method", "epoch", "norm", "created"}


def test_npy_needs_block_and_checks_shape(tmp_path):
    v = np.arange(16, dtype=np.float32)
    np.save(tmp_path / "v.npy", v)
    with pytest.raises(VectorFileError, match="carries no block"):
        load_vector(tmp_path / "v.npy")
    got = load_vector(tmp_path / "v.npy", block=4, d_model=16)
    assert got.block == 4 and got.method == "npy"
    np.testing.assert_array_equal(got.vector, v)
    with pytest.raises(VectorFileError, match=r"shape \(16,\).*shape \(32,\)"):
        load_vector(tmp_path / "v.npy", block=4, d_model=32)
    np.save(tmp_path / "m.npy", np.zeros((2, 16), np.float32))
    with pytest.raises(VectorFileError, match=r"shape \[d_model\], got \(2, 16\)"):
        load_vector(tmp_path / "m.npy", block=4)
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan], np.float32))
    with pytest.raises(VectorFileError, match="non-finite value at index 1"):
        load_vector(tmp_path / "nan.npy", block=0)


def test_broken_npy_files_name_the_file(tmp_path):
    """0-byte, garbage and truncated .npy files: one VectorFileError line each (a 0-byte file
    used to raise a bare EOFError)."""
    good = tmp_path / "good.npy"
    np.save(good, np.arange(64, dtype=np.float32))
    whole = good.read_bytes()
    np.savez(tmp_path / "archive.npz", v=np.ones(4, np.float32))
    cases = [
        ("empty.npy", b"", "empty file (0 bytes)"),
        ("garbage.npy", np.random.default_rng(0).bytes(200), "not a plain numpy array file"),
        ("header.npy", whole[:20], "not a plain numpy array file"),
        ("data.npy", whole[: len(whole) - 9], "not a plain numpy array file"),
        ("zip.npy", (tmp_path / "archive.npz").read_bytes(), "holds an .npz archive"),
    ]
    for name, data, message in cases:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VectorFileError) as e:
            load_vector(tmp_path / name, block=3)
        assert str(e.value).startswith(f"{tmp_path / name}: {message}"), str(e.value)
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    assert load_vector(good, block=3).d_model == 64


def test_safetensors_errors(tmp_path):
    from safetensors.numpy import save_file

    sv = SteeringVector(vector=np.ones(8, np.float32), block=2, model="m", method="dom-mean")
    path = save_vector(tmp_path / "v.safetensors", sv)
    with pytest.raises(VectorFileError, match="built for block 2, but block 3"):
        load_vector(path, block=3)
    save_file({"other": np.ones(8, np.float32)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(VectorFileError, match="exactly one tensor named 'vector'"):
        load_vector(tmp_path / "k.safetensors")
    save_file({"vector": np.ones(8, np.float32)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(VectorFileError, match="metadata is missing"):
        load_vector(tmp_path / "nometa.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(VectorFileError, match="not a readable safetensors"):
        load_vector(tmp_path / "junk.safetensors")
    whole = path.read_bytes()
    for name, data, message in [
        ("empty.safetensors", b"", "empty file (0 bytes)"),
        ("cut.safetensors", whole[: len(whole) - 7], "not a readable safetensors file"),
        ("head.safetensors", whole[:6], "not a readable safetensors file"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VectorFileError) as e:
            load_vector(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {message}")
        assert "\n" not in str(e.value)
    with pytest.raises(VectorFileError, match=r"\.safetensors or \.npy"):
        (tmp_path / "v.txt").write_text("1")
        load_vector(tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError):
        load_vector(tmp_path / "missing.npy", block=0)


def test_files_and_keywords_from_before_the_block_rename(tmp_path):
    """Files whose metadata names the steered block `layer` still load; the old keywords
    `layer=` still work (with a DeprecationWarning) and `.layer` still reads the block."""
    from safetensors.numpy import save_file

    v = np.arange(1, 9, dtype=np.float32)
    meta = {"model": "m", "layer": "5", "method": "bipo", "epoch": "2", "norm": "1.0"}
    save_file({"vector": v}, str(tmp_path / "old.safetensors"), metadata={**meta, "created": "x"})
    old = load_vector(tmp_path / "old.safetensors", block=5)
    assert (old.block, old.layer, old.epoch, old.method) == (5, 5, 2, "bipo")
    assert "layer" not in old.extra
    assert "block" in old.metadata() and "layer" not in old.metadata()  # rewritten: new key
    with pytest.raises(VectorFileError, match="built for block 5, but block 4"):
        load_vector(tmp_path / "old.safetensors", block=4)

    np.save(tmp_path / "v.npy", v)
    with pytest.warns(DeprecationWarning, match=r"load_vector: the keyword layer= is deprecated"):
        assert load_vector(tmp_path / "v.npy", layer=3).block == 3
    with pytest.raises(TypeError, match="got block= and its old name layer="):
        load_vector(tmp_path / "v.npy", block=3, layer=3)
    with pytest.warns(DeprecationWarning, match="SteeringVector: the keyword layer="):
        sv = SteeringVector(vector=v, layer=6)
    assert (sv.block, sv.layer) == (6, 6)
    url, *_ = _planted_store(tmp_path)
    with pytest.warns(DeprecationWarning, match="dom_from_store: the keyword layer="):
        assert dom_from_store(str(url), layer=2).vector.block == 2


# ---- difference of means from a store ---------------------------------------------------------


def _planted_store(tmp_path, d=16, n=60, seed=0):
    """A float32 store whose masked tokens of label-1 records carry +direction."""
    from mup import store

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    lengths = rng.integers(3, 20, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    t = int(offsets[-1])
    mask = rng.random(t) < 0.6
    labels = np.tile([1, 0, 1, 0, -1], n // 5)
    mask[offsets[7] : offsets[8]] = False  # a labelled record without masked tokens
    acts = rng.normal(size=(t, d))  # [T, D]
    record = np.repeat(np.arange(n), lengths)  # [T] record of each token
    acts[mask & (labels[record] == 1)] += 3.0 * direction
    # Unmasked tokens of positives point the OTHER way: only a mask-respecting mean recovers it.
    acts[~mask & (labels[record] == 1)] -= 10.0 * direction
    acts = acts.astype(np.float32)
    writer = store.create(
        tmp_path / "store",
        layers=[3, 5],
        d_model=d,
        dtype="float32",
        offsets=offsets,
        ids=[f"r{i}" for i in range(n)],
        input_ids=np.zeros(t, np.int64),
        roles=np.zeros(t, np.uint8),
        mask=mask,
        labels=labels,
        attrs=dict(JOB),
        chunk_tokens=32,
        shard_tokens=64,
    )
    writer.write(np.arange(n), {3: acts, 5: acts * 2})
    writer.finalize()
    # numpy reference over layer 3 (= steering block 2)
    means = np.stack(
        [
            acts[offsets[i] : offsets[i + 1]][mask[offsets[i] : offsets[i + 1]]].mean(0)
            if mask[offsets[i] : offsets[i + 1]].any()
            else np.full(d, np.nan)
            for i in range(n)
        ]
    )
    ok = ~np.isnan(means[:, 0])
    ref = means[ok & (labels == 1)].mean(0) - means[ok & (labels == 0)].mean(0)
    return tmp_path / "store", direction, ref, labels


def test_dom_from_store_recovers_planted_direction(tmp_path):
    url, direction, ref, labels = _planted_store(tmp_path)
    # A tiny max_bytes makes iter_row_chunks stream many chunks.
    res = dom_from_store(str(url), block=2, max_bytes=2048)
    np.testing.assert_allclose(res.vector.vector, ref, rtol=1e-5, atol=1e-5)
    cos = res.vector.vector @ direction / res.norm
    assert cos > 0.95
    assert res.vector.block == 2 and res.vector.extra["source_hidden_state"] == 3
    assert res.vector.method == "dom-store" and res.vector.model == "synthetic"
    assert res.n_unlabelled == int(np.sum(labels == -1))
    assert res.n_empty == 1
    assert res.n_positive + res.n_negative == int(np.sum(labels >= 0)) - 1
    assert "norm" in res.summary()


def test_dom_from_store_errors(tmp_path):
    url, *_ = _planted_store(tmp_path)
    with pytest.raises(ValueError, match=r"needs hidden_states\[4\].*holds layers \[3, 5\]"):
        dom_from_store(str(url), block=3)


def test_cli_vector_from_store(tmp_path):
    url, _, ref, _ = _planted_store(tmp_path)
    out = tmp_path / "v.safetensors"
    cmd = [sys.executable, "-m", "mup.steering", "vector", "--store", str(url), "--block", "4"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "norm" in proc.stdout and "wrote" in proc.stdout
    v = load_vector(out)
    assert v.block == 4
    np.testing.assert_allclose(v.vector, 2 * ref, rtol=1e-5, atol=1e-5)  # layer 5 holds 2 * acts
    bad = subprocess.run(
        [*cmd[:-1], "7", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "hidden_states[8]" in bad.stderr


# ---- difference of means from paired prompts -----------------------------------------------------


def test_pca_sign_and_scale():
    rng = np.random.default_rng(0)
    direction = np.zeros(8)
    direction[2] = 1.0
    diffs = 2.0 * direction + 0.1 * rng.normal(size=(50, 8))
    vec, explained = difference_vector(diffs, "pca")
    assert vec[2] > 1.8  # positive: aligned with the mean difference, not flipped
    assert explained > 0.9
    vec_neg, _ = difference_vector(-diffs, "pca")
    assert vec_neg[2] < -1.8
    # with every difference along one direction, PCA equals the mean
    np.testing.assert_allclose(
        difference_vector(np.outer([1, 2, 3], direction), "pca")[0], 2 * direction, atol=1e-6
    )


def test_dom_from_pairs_matches_unpadded_reference(tiny_model, tiny_pairs):
    from mup.models import jit_forward
    from mup.text import ROLE_ASSISTANT, encode_chats

    pairs = tiny_pairs[0][:5]
    layer = 1
    res = {
        m: dom_from_pairs(tiny_model, pairs, layer, method=m, batch_size=4)
        for m in ("mean", "last", "pca")
    }
    # Reference: each conversation alone (batch of one, no other rows, right-padded to one
    # length so a single program compiles), captured at hidden_states[layer + 1].
    length = 24
    pooled = {"mean": [], "last": []}
    for side in ("chosen", "rejected"):
        for p in pairs:
            conv = [*p.prompt, {"role": "assistant", "content": getattr(p, side)}]
            enc = encode_chats(tiny_model.tokenizer, [conv])
            t = len(enc.input_ids)
            ids = np.zeros((1, length), np.int32)
            ids[0, :t] = enc.input_ids
            pos = jnp.arange(length, dtype=jnp.int32)[None]
            out = jit_forward(
                tiny_model.params,
                jnp.asarray(ids),
                pos,
                config=tiny_model.config,
                valid=jnp.asarray(np.arange(length)[None] < t),
                capture=(layer + 1,),
                logits=False,
            )
            h = np.asarray(out.hidden[layer + 1][0, :t])
            resp = enc.roles == ROLE_ASSISTANT
            pooled["mean"].append(h[resp].mean(0))
            pooled["last"].append(h[np.flatnonzero(resp)[-1]])
    n = len(pairs)
    for m in ("mean", "last"):
        arr = np.stack(pooled[m])
        ref = (arr[:n] - arr[n:]).mean(0)
        np.testing.assert_allclose(res[m].vector.vector, ref, rtol=1e-4, atol=1e-5)
    arr = np.stack(pooled["mean"])
    ref_pca, _ = difference_vector(arr[:n] - arr[n:], "pca")
    np.testing.assert_allclose(res["pca"].vector.vector, ref_pca, rtol=1e-4, atol=1e-5)
    assert res["pca"].vector.vector @ res["mean"].vector.vector > 0
    assert res["mean"].vector.method == "dom-mean" and res["mean"].vector.block == layer


def test_vector_block_convention(tiny_model, tiny_pairs):
    """Steering at block L moves hidden_states[L + 1] by exactly the vector: the place where
    dom vectors for block L are measured."""
    from mup.models import ForwardSteering, jit_forward

    enc = encode_pairs(tiny_model.tokenizer, tiny_pairs[0][:2])
    v = np.random.default_rng(3).normal(size=tiny_model.config.d_model).astype(np.float32)
    tokens = jnp.asarray(enc.tokens)
    pos = jnp.broadcast_to(jnp.arange(enc.length, dtype=jnp.int32), tokens.shape)
    spec = ForwardSteering(
        blocks=(1,), vectors=jnp.asarray(v[None]), multipliers=jnp.ones((1, tokens.shape[0]))
    )
    kw = dict(config=tiny_model.config, valid=jnp.asarray(enc.valid), capture=(2,), logits=False)
    plain = np.asarray(jit_forward(tiny_model.params, tokens, pos, **kw).hidden[2])
    steered = np.asarray(jit_forward(tiny_model.params, tokens, pos, steering=spec, **kw).hidden[2])
    np.testing.assert_allclose(steered - plain, np.broadcast_to(v, plain.shape), atol=1e-5)


# ---- pairs files ------------------------------------------------------------------------------


def test_bundled_pairs_are_well_formed():
    from mup.steering import bundled_pairs_path

    pairs = load_pairs(bundled_pairs_path())
    assert len(pairs) == 100
    assert sum(p.split == "test" for p in pairs) == 20
    assert len({p.id for p in pairs}) == 100
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)


def test_pairs_file_errors(tmp_path):
    from mup.steering import PairsError

    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    cases = [
        ("{not json", "line 1|not valid JSON"),
        (json.dumps({**good, "chosen": ""}), "'chosen' must be a non-empty string"),
        (
            json.dumps({k: v for k, v in good.items() if k != "rejected"}),
            "missing field 'rejected'",
        ),
        (json.dumps({**good, "split": "dev"}), "'split' is 'dev'"),
        (json.dumps({**good, "prompt": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
        ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"id": ' + "7" * 5000 + "}", "not valid JSON: Exceeds the limit"),
    ]
    for text, message in cases:
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps(good) + "\n" + text + "\n")
        with pytest.raises(PairsError, match=message.split("|")[-1]) as err:
            load_pairs(path)
        assert f"{path}:2" in str(err.value)
    path.write_bytes(json.dumps(good).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(PairsError, match=f"{path}:2: not valid UTF-8"):
        load_pairs(path)
    path.write_text(json.dumps({**good, "id": "x"}) + "\n" + json.dumps({**good, "id": "x"}) + "\n")
    with pytest.raises(PairsError, match="duplicate id 'x'"):
        load_pairs(path)
    path.write_text(json.dumps({**good, "prompt": "plain text"}) + "\n")
    assert load_pairs(path)[0].prompt == ({"role": "user", "content": "plain text"},)


# ---- the BiPO study's pair formats ---------------------------------------------------------------


def _study_row(i, prompt="hi", chosen="warm", rejected="cold", **extra):
    return {
        "entry_id": i,
        "prompt_arr": [{"role": "user", "content": f"{prompt} {i}"}],
        "chosen_arr": [{"role": "assistant", "content": chosen}],
        "rejected_arr": [{"role": "assistant", "content": rejected}],
        **extra,
    }


def test_study_pair_formats_parse(tmp_path):
    rows = [_study_row(i) for i in range(4)]
    rows[1]["prompt_arr"] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "earlier turn"},
        {"role": "user", "content": "again"},
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(jsonl)
    assert [p.id for p in pairs] == ["0", "1", "2", "3"]
    assert pairs[0].prompt == ({"role": "user", "content": "hi 0"},)
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].split) == ("warm", "cold", "train")
    assert [m["role"] for m in pairs[1].prompt] == ["user", "assistant", "user"]

    columns = tmp_path / "columns.json"
    columns.write_text(
        json.dumps(
            {
                "prompt_arr": [r["prompt_arr"] for r in rows],
                "chosen_arr": [r["chosen_arr"] for r in rows[:3]] + ["plain warm"],
                "rejected_arr": [r["rejected_arr"] for r in rows],
            }
        )
    )
    cols = load_pairs(columns)
    assert [p.id for p in cols] == ["row-0", "row-1", "row-2", "row-3"]
    assert [p.prompt for p in cols] == [p.prompt for p in pairs]
    assert cols[3].chosen == "plain warm"
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows))
    assert [p.prompt for p in load_pairs(as_list)] == [p.prompt for p in pairs]
    # a one-row jsonl is a row, not a columns object
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(rows[0]) + "\n")
    assert load_pairs(one)[0].id == "0"


def test_test_fraction_split(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(_study_row(i)) + "\n" for i in range(10)))
    a = load_pairs(path, test_fraction=0.3, seed=1)
    assert sum(p.split == "test" for p in a) == 3
    assert [p.id for p in a] == [str(i) for i in range(10)]  # order kept
    assert [p.split for p in load_pairs(path, test_fraction=0.3, seed=1)] == [p.split for p in a]
    assert [p.split for p in load_pairs(path, test_fraction=0.3, seed=2)] != [p.split for p in a]
    assert len(load_pairs(path, split="test", test_fraction=0.3, seed=1)) == 3
    from mup.steering import PairsError

    with pytest.raises(PairsError, match="each split needs at least one"):
        load_pairs(path, test_fraction=0.01)
    path.write_text(json.dumps(_study_row(0, split="test")) + "\n" + json.dumps(_study_row(1)))
    with pytest.raises(PairsError, match="declares its own train/test split"):
        load_pairs(path, test_fraction=0.5)


def test_study_pair_format_errors(tmp_path):
    from mup.steering import PairsError

    path = tmp_path / "p.json"
    row = _study_row(0)
    cases = [
        (
            {"prompt_arr": ["a", "b"], "chosen_arr": ["x"], "rejected_arr": ["y", "z"]},
            r"p.json: the parallel arrays differ in length: prompt_arr has 2, chosen_arr has 1, "
            "rejected_arr has 2",
        ),
        ({"prompt_arr": ["a"], "chosen_arr": ["x"]}, "missing field 'rejected_arr'"),
        (
            {"prompt_arr": ["a", "b"], "chosen_arr": ["x", ""], "rejected_arr": ["y", "z"]},
            r"p.json: row 1: field 'chosen_arr' must be a non-empty string",
        ),
        (
            [row, {**row, "entry_id": 1, "chosen_arr": [row["chosen_arr"][0]] * 2}],
            r"row 1: field 'chosen_arr' must hold exactly one assistant message, got 2",
        ),
        (
            [{**row, "rejected_arr": [{"role": "user", "content": "x"}]}],
            r"row 0: rejected_arr\[0\] must be \{'role': 'assistant'",
        ),
        ([{**row, "prompt_arr": [{"role": "bot", "content": "x"}]}], "unknown role 'bot'"),
        ([row, row], "duplicate id '0'"),
    ]
    for obj, message in cases:
        path.write_text(json.dumps(obj))
        with pytest.raises(PairsError, match=message):
            load_pairs(path)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps(row) + "\n" + json.dumps({**row, "entry_id": 1, "chosen_arr": 5}))
    with pytest.raises(PairsError, match=r"p.jsonl:2: field 'chosen_arr' must be a non-empty"):
        load_pairs(jsonl)
