"""Figure 1 and friends: the figure CLI writes its PNGs and a table whose numbers are the
monitors' own; means are over the data sets every monitor covers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.scores import pairwise_auroc, rows_for

from mup.monitors import (
    figure_main,
    markdown_table,
    metrics_table,
    read_scores,
    write_scores,
)
from mup.monitors._cascade_cli import main as cascade_main
from mup.monitors._figures import cascade_means, common_datasets


def _png(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path
    assert image[..., :3].std() > 0, f"{path} is blank"
    return image


def test_figure_cli_writes_pngs_and_table(synthetic, tmp_path, capsys):
    paths, arrays = synthetic
    probe = "probe:attention@20"
    cascade_dir = tmp_path / "cascade"
    assert (
        cascade_main(
            [
                "--first",
                str(paths[probe]),
                "--second",
                str(paths["finetuned:big"]),
                "--fractions",
                "0,0.2,1",
                "--out",
                str(cascade_dir),
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "fig"
    rc = figure_main(
        [
            *map(str, paths.values()),
            "--cascade",
            str(cascade_dir / "cascade.jsonl"),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("figure1.png", "auroc_per_dataset.png", "roc_curves.png"):
        _png(out / name)
    table = json.loads((out / "metrics.json").read_text())
    assert table["mean_over"] == ["dev/a", "dev/b"]
    assert list(table["monitors"]) == [probe, "prompted:big/single_word", "finetuned:big"]
    for (monitor, dataset), (s, y, f) in arrays.items():
        cell = table["monitors"][monitor]["datasets"][dataset]
        keep = y != -1
        assert cell["auroc"] == pytest.approx(pairwise_auroc(s[keep], y[keep]))
        assert cell["mean_flops"] == pytest.approx(f.mean())
        assert cell["n"] == keep.sum()
    mean = table["monitors"][probe]["mean"]
    assert mean["auroc"] == pytest.approx(
        np.mean([table["monitors"][probe]["datasets"][d]["auroc"] for d in ("dev/a", "dev/b")])
    )
    # The cascade line at fraction 0 (remaining=first) is the probe's own point.
    (line,) = table["cascades"].values()
    assert line["fraction"] == [0.0, 0.2, 1.0]
    assert line["auroc"][0] == pytest.approx(mean["auroc"])
    assert line["mean_flops"][0] == pytest.approx(mean["mean_flops"])
    markdown = (out / "metrics.md").read_text()
    assert markdown.startswith("### AUROC")
    assert "### TPR at 1% FPR" in markdown
    assert f"| `{probe}` | {table['monitors'][probe]['datasets']['dev/a']['auroc']:.3f} |" in (
        markdown
    )
    assert markdown in printed


def test_means_are_over_the_data_sets_every_monitor_has(synthetic, tmp_path, capsys):
    paths, arrays = synthetic
    s, y, f = arrays["finetuned:big", "dev/a"]
    only_a = write_scores(tmp_path / "only_a.jsonl", rows_for("finetuned:x", "dev/a", s, y, f))
    scores = read_scores(paths["probe:attention@20"], only_a)
    table = metrics_table(scores)
    assert table["mean_over"] == ["dev/a"]
    assert table["datasets"] == ["dev/a", "dev/b"]
    probe = table["monitors"]["probe:attention@20"]
    assert probe["mean"]["auroc"] == probe["datasets"]["dev/a"]["auroc"]
    assert "dev/b" in probe["datasets"]  # still tabulated, just not averaged
    markdown = markdown_table(table)
    assert "| `finetuned:x` |" in markdown and "–" in markdown  # no cell for dev/b
    rc = figure_main([str(paths["probe:attention@20"]), str(only_a), "--out", str(tmp_path / "f")])
    assert rc == 0
    assert "left out of means: ['dev/b']" in capsys.readouterr().out
    _png(tmp_path / "f" / "roc_curves.png")


def test_no_common_data_set_is_a_clear_error(synthetic, tmp_path, capsys):
    paths, arrays = synthetic
    s, y, f = arrays["finetuned:big", "dev/a"]
    elsewhere = write_scores(tmp_path / "z.jsonl", rows_for("finetuned:x", "dev/z", s, y, f))
    with pytest.raises(ValueError, match="no data set is covered by every monitor"):
        common_datasets({"a": ["dev/a"], "b": ["dev/z"]})
    # A monitor on dev/a and dev/b and one on dev/z alone share nothing.
    rc = figure_main([str(paths["finetuned:big"]), str(elsewhere), "--out", str(tmp_path / "f")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no data set is covered" in err and "finetuned:x: dev/z" in err
    assert not (tmp_path / "f").exists()


def test_cascade_means_refuse_duplicates_and_gaps():
    row = dict(cascade="c", dataset="dev/a", fraction=0.5, auroc=0.8, tpr_at_1pct_fpr=0.2)
    row["mean_flops"] = 10.0
    line = cascade_means([row, {**row, "dataset": "mean"}], ["dev/a"])
    assert line["c"]["auroc"].tolist() == [0.8]
    with pytest.raises(ValueError, match="two rows for data set 'dev/a'"):
        cascade_means([row, row], ["dev/a"])
    with pytest.raises(ValueError, match=r"no rows for data sets \['dev/b'\]"):
        cascade_means([row], ["dev/a", "dev/b"])


def test_figure_cli_bad_cascade_file(synthetic, tmp_path, capsys):
    paths, _ = synthetic
    bad = tmp_path / "cascade.jsonl"
    bad.write_text('{"cascade": "x"}\n')
    rc = figure_main([str(paths["finetuned:big"]), "--cascade", str(bad), "--out", str(tmp_path)])
    assert rc == 1
    assert "cascade.jsonl:1: field" in capsys.readouterr().err
