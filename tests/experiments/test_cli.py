"""`python -m mup.probes` end to end: a tiny random llama extracts the bundled mini set (laid
out as a data root), then compare / sweep / efficiency / calibration write their files.

The first command is a subprocess (cwd=tmp_path: the installed package); the others call
`main(argv)` in-process and reuse its content-keyed stores where they can.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mup.experiments._cli import main

# Extraction compiles the tiny model for five stores: about a minute on an idle 2-core machine.
pytestmark = pytest.mark.slow

QUICK = ["--limit", "24", "--max-tokens", "48", "--no-progress"]


def _args(tiny_dir, data_root, out) -> list[str]:
    """The arguments every command here shares: the tiny model at layer 1, the data root, out."""
    model = ["--model", str(tiny_dir), "--layer", "1"]
    return [*model, "--data", str(data_root), "--out", str(out), *QUICK]


@pytest.fixture(scope="module")
def compare_run(tiny_dir, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    args = [sys.executable, "-m", "mup.probes", "compare", *_args(tiny_dir, data_root, out)]
    args += ["--kinds", "logreg,dom"]
    result = subprocess.run(args, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_compare_writes_table_plot_and_results(compare_run):
    out, result = compare_run
    table = (out / "compare.md").read_text()
    assert "| probe | anthropic | mt | mts | toolace | mean |" in table
    assert "| logreg |" in table and "| dom |" in table
    assert "| probe | anthropic" in result.stdout
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4
    assert {x["eval"]["name"] for x in lines} == {"anthropic", "mt", "mts", "toolace"}
    assert all(x["layer"] == 1 and len(x["scores"]) == 24 for x in lines)
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_efficiency_and_calibration_reuse_the_stores(compare_run, tiny_dir, data_root, capsys):
    out, _ = compare_run
    n_stores = len(list((out / "stores").rglob("zarr.json")))
    common = _args(tiny_dir, data_root, out)
    assert main(["efficiency", *common, "--sizes", "4,12", "--seeds", "0"]) == 0
    assert main(["calibration", *common, "--kind", "logreg"]) == 0
    assert len(list((out / "stores").rglob("zarr.json"))) == n_stores  # nothing re-extracted
    printed = capsys.readouterr().out
    assert "Spearman(prob, scale)" in printed and "n=12" in printed
    for name in ("efficiency", "calibration"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.jsonl").read_text().count("\n") >= 4
    cal = json.loads((out / "calibration.json").read_text())
    assert set(cal["sets"]) == {"anthropic", "mt", "mts", "toolace"}


def test_sweep(tiny_dir, data_root, tmp_path, capsys):
    args = [
        "sweep",
        "--model",
        str(tiny_dir),
        "--layers",
        "1,2",
        "--folds",
        "3",
        "--data",
        str(data_root),
        "--out",
        str(tmp_path),
        *QUICK,
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["layer"] for r in summary["rows"]] == [1, 2]
    assert all(len(r["fold_aurocs"]) == 3 for r in summary["rows"])
    assert "layer   2: AUROC" in capsys.readouterr().out


def test_clear_errors(tiny_dir, data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--kinds", "mean,bogus"])
    assert exc.value.code == 2
    assert "unknown probe kind(s) ['bogus']" in capsys.readouterr().err
    rc = main(
        [
            "compare",
            "--model",
            str(tmp_path / "nowhere"),
            "--data",
            str(data_root),
            "--out",
            str(tmp_path),
            *QUICK,
        ]
    )
    assert rc == 1
    assert "no default layer for model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def variation_root(data_root, tmp_path_factory):
    """data_root with a `tone` field in the training set, set per pair (both classes in each
    value), like the synthetic set's variation fields."""
    import shutil

    root = tmp_path_factory.mktemp("variation_root")
    shutil.copytree(data_root, root, dirs_exist_ok=True)
    path = root / "mup/training/synthetic_2025-03-25.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    pairs = sorted({r["pair_id"] for r in rows})
    for r in rows:
        r["tone"] = ("casual", "angry")[pairs.index(r["pair_id"]) % 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_devsplit_and_heatmap_write_results_and_plots(tiny_dir, variation_root, tmp_path, capsys):
    import matplotlib.image

    common = _args(tiny_dir, variation_root, tmp_path)
    args = ["--kind", "mean", "--ks", "2,4,64", "--repeats", "2", "--warm-epochs", "3"]
    assert main(["devsplit", *common, *args]) == 0
    printed = capsys.readouterr().out
    # 24 records per dev set cannot provide 64 class-balanced ones: skipped, with a note.
    assert "note: anthropic: k=[64] skipped" in printed
    assert "warm-start      k=4" in printed
    lines = [json.loads(x) for x in (tmp_path / "devsplit.jsonl").read_text().splitlines()]
    # Per dev set and repeat: the synthetic-only reference and 3 modes x 2 k.
    assert len(lines) == 4 * 2 * (1 + 3 * 2)
    for line in lines:
        trained = set(line["train"].get("dev_ids", [])) | set(line["train"].get("val_ids", []))
        assert not trained & set(line["ids"])
    image = matplotlib.image.imread(tmp_path / "devsplit.png")
    assert image.ndim == 3 and image.shape[1] > 4 * image.shape[0]  # 4 sets + their mean

    n_stores = len(list((tmp_path / "stores").rglob("zarr.json")))
    heat = ["--field", "tone", "--kind", "logreg", "--min-per-class", "3"]
    assert main(["heatmap", *common, *heat]) == 0
    # Both training splits were extracted for devsplit already: nothing new.
    assert len(list((tmp_path / "stores").rglob("zarr.json"))) == n_stores
    printed = capsys.readouterr().out
    assert "train \\ eval" in printed and "casual" in printed
    summary = json.loads((tmp_path / "heatmap-tone.json").read_text())
    assert summary["values"] == ["angry", "casual"]
    assert all(x is not None for row in summary["auroc"] for x in row)
    assert len((tmp_path / "heatmap-tone.jsonl").read_text().splitlines()) == 4
    image = matplotlib.image.imread(tmp_path / "heatmap-tone.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 200
