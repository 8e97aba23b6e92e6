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


@pytest.fixture(scope="module")
def compare_run(tiny_dir, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    args = [
        sys.executable,
        "-m",
        "mup.probes",
        "compare",
        "--model",
        str(tiny_dir),
        "--layer",
        "1",
        "--data",
        str(data_root),
        "--out",
        str(out),
        "--kinds",
        "logreg,dom",
        *QUICK,
    ]
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
    common = [
        "--model",
        str(tiny_dir),
        "--layer",
        "1",
        "--data",
        str(data_root),
        "--out",
        str(out),
        *QUICK,
    ]
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
