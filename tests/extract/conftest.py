"""Fixtures for the extraction tests: a tiny random llama checkpoint (SmolLM2's tokenizer) and a
bigger copy of the bundled mini set (the subprocess helpers are in `_support.extract`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support.checkpoints import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-block llama (d_model 64, 4 heads, 2 kv heads) saved as safetensors."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), d_model=64, special_tokens=False)


@pytest.fixture(scope="session")
def mini_path() -> Path:
    from mup.data import find_dataset

    return Path(find_dataset("mini"))


@pytest.fixture(scope="session")
def big_path(tmp_path_factory, mini_path) -> Path:
    """The mini set five times over (distinct ids): ~400 records, enough for many shards."""
    lines = mini_path.read_text().splitlines()
    out = []
    for copy in range(5):
        for line in lines:
            record = json.loads(line)
            record["ids"] = f"{record['ids']}-{copy}"
            out.append(json.dumps(record))
    path = tmp_path_factory.mktemp("data") / "stakes_big.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path
