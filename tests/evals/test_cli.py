"""`python -m mup.evals run` end to end: real inspect evals of the offline suite on a tiny model.

The first run is a subprocess (cwd=tmp_path, the installed package); the reruns call the same
`main` in process, which shares its compiled programs with the other tests of this area.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from inspect_ai.log import read_eval_log, write_eval_log

from mup.evals import COLUMNS, find_successful_log
from mup.evals._cli import main

LIMIT = 3
MULTIPLIERS = "-1,1"
CATEGORIES = {"gsm8k_offline": "math", "xstest_offline": "safety", "mc_general": "knowledge"}


def _logs(log_dir):
    return sorted(p for p in log_dir.rglob("*.eval") if ".staging" not in p.parts)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_dir, vector_file, small_config, shared_data):
    work = tmp_path_factory.mktemp("cli")
    args = [
        sys.executable, "-m", "mup.evals", "run", "--suite", "offline",
        "--model", f"mup/{tiny_dir}", "--vector", str(vector_file), "--block", "1",
        "--multipliers", MULTIPLIERS, "--limit", str(LIMIT), "--log-dir", "logs",
        "--config", str(small_config), "--out", "results.csv", "--plot", "scores.png",
    ]  # fmt: skip
    # cwd is a tmp dir (no ../shared beside it): point the data lookup at the shared data.
    env = {**os.environ, "MUP_DATA": str(shared_data)}
    result = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


@pytest.mark.slow
def test_log_layout_csv_and_plot(first_run):
    log_dir = first_run / "logs"
    logs = _logs(log_dir)
    assert len(logs) == 6  # 3 tasks x 2 multipliers
    for name, category in CATEGORIES.items():
        for m in ("-1.0", "1.0"):
            folder = log_dir / category / f"multiplier_{m}"
            (log,) = list(folder.glob("*.eval"))
            header = read_eval_log(str(log), header_only=True)
            assert header.status == "success"
            assert header.eval.metadata["mup_run"]["benchmark"] == name
            assert float(header.eval.model_args["multiplier"]) == float(m)
    assert not (log_dir / ".staging").exists()

    with (first_run / "results.csv").open() as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    keys = {(r["benchmark"], r["subset"], float(r["multiplier"])) for r in rows}
    for m in (-1.0, 1.0):
        assert ("gsm8k_offline", "main", m) in keys
        # XSTest: the whole task, compliance on safe and refusal on unsafe prompts
        for subset in ("all", "safe", "unsafe"):
            assert ("xstest_offline", subset, m) in keys
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["ci95_low"]) <= float(r["accuracy"]) <= float(r["ci95_high"])
        if r["subset"] in ("all", "main"):
            assert int(r["n_samples"]) == LIMIT
    xs = {r["subset"]: int(r["n_samples"]) for r in rows if r["benchmark"] == "xstest_offline"}
    assert xs["safe"] + xs["unsafe"] == xs["all"] == LIMIT
    png = first_run / "scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_successes_and_reruns_a_failed_log(
    first_run, tiny_dir, vector_file, small_config, shared_data, capsys, monkeypatch
):
    monkeypatch.chdir(first_run)
    monkeypatch.setenv("MUP_DATA", str(shared_data))  # as in first_run: no ../shared beside it
    before = _logs(first_run / "logs")
    # --layer, the old name of --block: the same run, so every log is reused
    argv = [
        "run", "--suite", "offline", "--model", f"mup/{tiny_dir}", "--vector", str(vector_file),
        "--layer", "1", "--multipliers", MULTIPLIERS, "--limit", str(LIMIT), "--log-dir", "logs",
        "--config", str(small_config), "--no-aggregate",
    ]  # fmt: skip
    assert main(argv) == 0
    assert _logs(first_run / "logs") == before  # everything skipped, nothing new
    assert capsys.readouterr().out.count('"status": "skipped"') == 6

    # Turn one successful log into a failed one: that (task, multiplier) alone runs again.
    failed = next(p for p in before if "safety" in p.parts and "multiplier_1.0" in p.parts)
    log = read_eval_log(str(failed))
    log.status = "error"
    write_eval_log(log, str(failed))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count('"status": "skipped"') == 5 and out.count('"status": "success"') == 1
    after = _logs(first_run / "logs")
    assert len(after) == 7 and set(before) < set(after)
    (new,) = set(after) - set(before)
    assert new.parent == failed.parent

    # A changed limit is a different run: its identity matches no existing log.
    header = read_eval_log(str(new), header_only=True)
    identity = dict(header.eval.metadata["mup_run"])
    assert find_successful_log(new.parent, identity) == new
    assert find_successful_log(new.parent, {**identity, "limit": LIMIT - 1}) is None

    # aggregate alone uses the newest successful log per (benchmark, multiplier)
    assert main(["aggregate", "--log-dir", "logs", "--out", "again.csv"]) == 0
    with (first_run / "again.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {int(r["n_samples"]) for r in rows if r["subset"] in ("all", "main")} == {LIMIT}
