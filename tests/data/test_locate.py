"""find_dataset: explicit path > $MUP_DATA > ../shared/data > hub > bundled set."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from mup.data import _locate, bundled_path, dataset_names, find_dataset, load_records

TRAINING = "mup/training/synthetic_2025-03-25.jsonl"


def _root(base: Path, marker: str) -> Path:
    """A data root holding the training set (a copy of the bundled set, tagged by path)."""
    target = base / marker / TRAINING
    target.parent.mkdir(parents=True)
    shutil.copy(bundled_path(), target)
    return base / marker


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $MUP_DATA, a current dir without ../shared, and no source checkout to fall back on."""
    monkeypatch.delenv("MUP_DATA", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(_locate, "_CHECKOUT", tmp_path / "nowhere" / "repo")
    return tmp_path


def test_order_explicit_then_env_then_shared(isolated, monkeypatch, caplog):
    shared = _root(isolated / "shared", "data")  # ../shared/data seen from work/
    env = _root(isolated, "env")
    explicit = _root(isolated, "explicit")
    caplog.set_level(logging.INFO, logger="mup.data")

    assert find_dataset("training", allow_hub=False) == Path.cwd() / "../shared/data" / TRAINING
    assert "../shared/data from the current directory" in caplog.text
    monkeypatch.setenv("MUP_DATA", str(env))
    assert find_dataset("training", allow_hub=False) == env / TRAINING
    assert "($MUP_DATA)" in caplog.text
    assert find_dataset("training", explicit, allow_hub=False) == explicit / TRAINING
    assert "explicit data root" in caplog.text
    assert find_dataset("training", explicit / TRAINING) == explicit / TRAINING
    # A $MUP_DATA root without the file falls through to ../shared/data, and says so.
    monkeypatch.setenv("MUP_DATA", str(isolated / "empty"))
    assert find_dataset("training", allow_hub=False).resolve() == (shared / TRAINING).resolve()


def test_env_root_may_be_the_mup_folder(isolated, monkeypatch):
    root = _root(isolated, "env")
    monkeypatch.setenv("MUP_DATA", str(root / "mup"))
    assert find_dataset("training", allow_hub=False) == root / "mup/training" / Path(TRAINING).name


def test_checkout_relative_shared(isolated, monkeypatch):
    _root(isolated / "checkout" / "shared", "data")
    (isolated / "checkout" / "repo").mkdir()
    monkeypatch.setattr(_locate, "_CHECKOUT", isolated / "checkout" / "repo")
    found = find_dataset("training", allow_hub=False)
    assert found.resolve() == (isolated / "checkout/shared/data" / TRAINING).resolve()


def test_bundled_fallback_and_errors(isolated, caplog):
    with caplog.at_level(logging.WARNING, logger="mup.data"):
        path = find_dataset("dev/anthropic", allow_hub=False)
    assert path == bundled_path()
    assert "using the small bundled set stakes_mini.jsonl" in caplog.text
    assert len(caplog.records) == 1  # one line, whatever was tried
    assert len(load_records(path)) == 80
    assert find_dataset("mini") == bundled_path()
    with pytest.raises(FileNotFoundError, match="'benchmarks/gsm8k' not found; tried: "):
        find_dataset("benchmarks/gsm8k", allow_hub=False)
    with pytest.raises(FileNotFoundError, match="explicit path .* does not exist"):
        find_dataset("training", isolated / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="explicit data root .* has no"):
        find_dataset("training", isolated)
    with pytest.raises(ValueError, match="unknown data set 'nope'; known names: training"):
        find_dataset("nope")


def test_every_name_resolves_in_shared(monkeypatch):
    shared = Path(__file__).resolve().parents[2].parent / "shared"
    if not shared.is_dir():
        pytest.skip("../shared is absent")
    monkeypatch.delenv("MUP_DATA", raising=False)
    # shared/data holds the April 2025 sets; the later published ones come from the hub.
    in_shared = [n for n in dataset_names() if not n.startswith("test/") and "_raw" not in n]
    assert len(in_shared) == 9  # with benchmarks/gsm8k, xstest, humaneval
    for name in in_shared:
        path = find_dataset(name, shared / "data" if name != "mini" else None)
        assert path.is_file(), name
