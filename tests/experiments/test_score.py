"""`mup probes score`: score files that `mup.monitors.read_scores` accepts, whose scores are
the probe's own predictions and whose FLOPs follow `probe_flops`; inputs checked first.

The fast tests score the synthetic token store of conftest (real SmolLM2 tokens, planted
activations); the slow one runs the command end to end on a tiny random llama.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from mup import probes
from mup.data import load_records
from mup.experiments import _score
from mup.experiments._cli import main
from mup.monitors import ScoreFileError, label_of, read_scores, write_scores


def masked_counts_by_hand(store) -> list[int]:
    mask = np.asarray(store.mask, bool)
    off = store.offsets
    return [int(mask[off[i] : off[i + 1]].sum()) for i in range(store.n_records)]


# Per-token parameters by hand for width D: the read-out w [D] and b (logreg's standardisation
# folds into them); attention adds its query q [D] and qb.
@pytest.mark.parametrize("kind, per_width, constant", [("logreg", 1, 1), ("attention", 2, 2)])
def test_score_file_is_the_probes_predictions(
    kind, per_width, constant, token_probes, token_store, tmp_path
):
    probe, _ = token_probes(kind)
    expected_params = per_width * token_store.d_model + constant
    assert _score.probe_params(probe) == expected_params
    records = {r.id: r for r in load_records(token_store.attrs["dataset"])}
    monitor = _score.monitor_name(probe)
    assert monitor == f"probe:{kind}@2"
    rows = _score.score_rows(
        probe, token_store, "mini_tokens", monitor=monitor, model="smollm2-135m", records=records
    )
    path = write_scores(tmp_path / _score.score_filename(monitor, "mini_tokens"), rows)
    assert path.name == f"probe_{kind}@2__mini_tokens.jsonl"
    scores = read_scores(path)
    assert scores.monitor == monitor and scores.datasets == ("mini_tokens",)
    assert list(scores.ids) == list(token_store.ids)
    np.testing.assert_array_equal(scores.scores.astype(np.float32), probe.predict(token_store))
    n_tokens = masked_counts_by_hand(token_store)
    assert scores.n_tokens.tolist() == n_tokens
    # 2 FLOPs per parameter per token read; the activations are free.
    assert scores.flops.tolist() == [2.0 * expected_params * n for n in n_tokens]
    assert scores.labels.tolist() == [label_of(records[i]) for i in token_store.ids]
    assert set(scores.labels.tolist()) == {0, 1}
    assert all(r["model"] == "smollm2-135m" for r in scores.rows)


def test_probe_input_reads_the_probe_file(token_probes, caplog):
    probe, path = token_probes("logreg")
    reads = _score.probe_input(probes.load(path), source=str(path))
    assert reads == _score.ProbeInput(
        model="smollm2-135m",
        layers=(2,),
        site="residual",
        mask_mode="no_system",
        max_tokens=96,
        model_revision="synthetic",
    )
    # An explicit model replaces the recorded one, and its revision with it.
    other = _score.probe_input(probe, source="p", model="elsewhere", max_tokens=None)
    assert (other.model, other.model_revision, other.max_tokens) == ("elsewhere", None, None)
    older = dataclasses.replace(probe, metadata={"model": "m"})  # saved before max_tokens was
    assert _score.probe_input(older, source="p").max_tokens == _score.FALLBACK_MAX_TOKENS
    assert "records no max_tokens" in caplog.text


def save_variant(probe, path, **changes):
    return dataclasses.replace(probe, **changes).save(path)


def test_bad_inputs_fail_before_any_model_loads(token_probes, tmp_path, capsys):
    probe, good = token_probes("logreg")
    out, stores = tmp_path / "scores", tmp_path / "stores"
    common = ["--out", str(out), "--store-dir", str(stores), "--no-progress"]

    def error(*args) -> str:
        assert main(["score", *args, *common]) == 1
        return capsys.readouterr().err

    missing = tmp_path / "nope.safetensors"
    err = error("--probe", str(missing), "--dataset", "mini")
    assert f"error: probe file {missing} does not exist" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file")
    assert "not a readable safetensors file" in error("--probe", str(junk), "--dataset", "mini")
    err = error("--probe", str(good), "--dataset", "dev/nope")
    assert "--dataset 'dev/nope': neither a data set name" in err and "dev/anthropic" in err
    err = error("--probe", str(good), "--dataset", "mini", "--dataset", "mini")
    assert "--dataset mini and --dataset mini are the same file" in err
    anonymous = save_variant(probe, tmp_path / "anon.safetensors", metadata={})
    err = error("--probe", str(anonymous), "--dataset", "mini")
    assert "records no model (metadata field 'model'); pass --model" in err
    layerless = save_variant(probe, tmp_path / "layerless.safetensors", layers=())
    assert "records no store layers" in error("--probe", str(layerless), "--dataset", "mini")
    # Every refusal came before extraction: no store, no score file.
    assert not stores.exists() and not list(out.glob("*.jsonl"))


def test_store_of_another_extraction_is_refused(token_probes, token_store, stores):
    probe, path = token_probes("logreg")
    reads = _score.probe_input(probe, source=str(path))
    with pytest.raises(ValueError) as info:
        _score.check_store(reads, stores.train, source=str(path))
    message = str(info.value)
    assert f"store {stores.train.url} does not match probe {path}" in message
    assert "model revision '0' (the probe's: 'synthetic')" in message
    assert "mask_mode 'all' (the probe's: 'no_system')" in message
    _score.check_store(reads, token_store, source=str(path))  # its training store passes


@pytest.mark.slow
def test_score_and_view_end_to_end_reuse_stores(tiny_dir, data_root, tmp_path, capsys):
    """A probe trained on a tiny llama's store of `mini`; `score` re-extracts nothing for
    `mini` (same data, model, layer, site, mask, truncation: the store is reused) and one new
    store for dev/anthropic; both files validate and hold the probe's predictions. `view
    --dataset` then reuses the stores too."""
    from mup.experiments._common import ExtractOptions, extract

    store_dir = tmp_path / "stores"
    options = ExtractOptions(
        model=str(tiny_dir),
        out=str(store_dir),
        max_tokens=48,
        limit=24,
        progress=False,
        mask_mode="no_system",
    )
    ((_, mini),) = _score.locate_datasets(["mini"], None)
    (train,) = extract([mini], layers=(1,), split=None, options=options)
    probe = probes.fit("logreg", train, layer=1)
    assert probe.metadata["max_tokens"] == "48" and probe.metadata["mask_mode"] == "no_system"
    path = probe.save(tmp_path / "probe.safetensors")
    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("zarr.json")}
    out = tmp_path / "scores"
    args = ["score", "--probe", str(path), "--dataset", "mini", "--dataset", "dev/anthropic"]
    args += ["--data", str(data_root), "--out", str(out), "--store-dir", str(store_dir)]
    assert main([*args, "--limit", "24", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mini" in printed and "dev/anthropic" in printed
    after = {p: p.stat().st_mtime_ns for p in store_dir.rglob("zarr.json")}
    assert {p: after[p] for p in before} == before  # the mini store untouched
    # One new store (<store dir>/<model>/<store>), for dev/anthropic.
    assert [p.name.split("-")[0] for p in sorted(store_dir.glob("*/*"))] == [
        "anthropic_balanced",
        "stakes_mini",
    ]

    scores = read_scores(out)
    assert scores.monitor == "probe:logreg@1"
    assert set(scores.datasets) == {"mini", "dev/anthropic"}
    expected = probe.predict(train)
    for name in ("mini", "dev/anthropic"):
        part = scores.select(dataset=name)
        assert list(part.ids) == list(train.ids)  # both are copies of the bundled set
        np.testing.assert_array_equal(part.scores.astype(np.float32), expected)
        assert part.n_tokens.tolist() == masked_counts_by_hand(train)
        assert part.flops.tolist() == [2.0 * (16 + 1) * n for n in masked_counts_by_hand(train)]
    result = scores.evaluate()["probe:logreg@1"]["mini"]
    assert 0.0 <= result["auroc"] <= 1.0 and result["mean_flops"] > 0
    line = json.loads((out / "probe_logreg@1__dev_anthropic.jsonl").read_text().splitlines()[0])
    assert line["model"] == str(tiny_dir)
    # A damaged score file is refused naming file, line and field.
    (out / "probe_logreg@1__mini.jsonl").write_text(json.dumps({**line, "score": 2.0}) + "\n")
    with pytest.raises(ScoreFileError, match=r"__mini.jsonl:1: field 'score'"):
        read_scores(out)

    page = tmp_path / "view.html"
    args = ["view", "--probe", str(path), "--dataset", "dev/anthropic", "--data", str(data_root)]
    args += ["--store-dir", str(store_dir), "--limit", "24", "--records", "5", "--out", str(page)]
    assert main([*args, "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("zarr.json")} == after
    html = page.read_text()
    assert html.count('<section class="record') == 5 and "probe:logreg@1 on dev/anthropic" in html
    spans = len(re.findall(r'class="tok[ "]', html))  # "tok" or "tok unread", not "tokens"
    assert spans == sum(np.diff(train.offsets)[:5])
