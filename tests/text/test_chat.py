"""Chat encoding with the real SmolLM2 tokenizer: ids, roles, truncation, prompts."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mup.data import Message, find_dataset, load_records
from mup.text import (
    ROLE_ASSISTANT,
    ROLE_SYSTEM,
    ROLE_TEMPLATE,
    ROLE_TOOL,
    ROLE_USER,
    SMOLLM2_CHAT_TEMPLATE,
    encode_chats,
    encode_prompts,
    load_tokenizer,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


def _reference_ids(tokenizer, conversation, generation_prompt=False):
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _decode_role(tokenizer, encoded, row, role):
    ids, roles = encoded.row(row)
    return tokenizer.decode(ids[roles == role])


def test_gguf_carries_the_known_smollm2_template(tokenizer):
    # The fallback for GGUF files without a template must be the model's real template.
    assert tokenizer.is_fast
    assert tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE


def test_hand_checked_roles(tokenizer):
    encoded = encode_chats(tokenizer, [CHAT])
    ids, roles = encoded.row(0)
    tokens = [tokenizer.decode([t]) for t in ids]
    # <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n
    # <|im_start|>assistant\nHello!<|im_end|>\n
    assert tokens[:8] == ["<|im_start|>", "system", "\n", "Be", " brief", ".", "<|im_end|>", "\n"]
    assert roles[:8].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert tokens[8:14] == ["<|im_start|>", "user", "\n", "Hi", " there", "<|im_end|>"]
    assert roles[8:14].tolist() == [0, 0, 0, 2, 2, 0]
    assert roles.dtype == np.uint8 and ids.dtype == np.int32
    assert _decode_role(tokenizer, encoded, 0, ROLE_ASSISTANT) == "Hello!"
    assert ids.tolist() == _reference_ids(tokenizer, CHAT)
    assert tokenizer.decode(ids[roles == ROLE_TEMPLATE]).count("<|im_start|>") == 3


def test_content_equal_to_a_role_name_is_not_the_header(tokenizer):
    chat = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "assistant"}]
    encoded = encode_chats(tokenizer, [chat])
    ids, roles = encoded.row(0)
    assert _decode_role(tokenizer, encoded, 0, ROLE_USER) == "user"
    assert _decode_role(tokenizer, encoded, 0, ROLE_ASSISTANT) == "assistant"
    # the "user" / "assistant" of the role headers stay template tokens
    header = [tokenizer.decode([t]) for t in ids[roles == ROLE_TEMPLATE]]
    assert "user" in header


def test_plain_text_is_one_user_message_after_the_default_system_prompt(tokenizer):
    encoded = encode_chats(tokenizer, ["plain text here", [Message(role="user", content="x")]])
    assert _decode_role(tokenizer, encoded, 0, ROLE_USER) == "plain text here"
    assert _decode_role(tokenizer, encoded, 0, ROLE_SYSTEM) == DEFAULT_SYSTEM
    ids, _ = encoded.row(0)
    assert ids.tolist() == _reference_ids(
        tokenizer, [{"role": "user", "content": "plain text here"}]
    )
    assert encoded.ids is None
    assert encoded.lengths.tolist() == [len(encoded.row(0)[0]), len(encoded.row(1)[0])]


def _stakes_sets():
    names = ["mini"]
    if SHARED.is_dir():
        names += ["training", "dev/anthropic", "dev/mt", "dev/mts", "dev/toolace"]
    return names


@pytest.mark.parametrize("name", _stakes_sets())
def test_ids_and_roles_on_data_sets(tokenizer, name):
    """The whole set is encoded; on 200 records spread over it each role's tokens decode to
    exactly that role's contents, and on 15 the ids equal apply_chat_template(tokenize=True)."""
    dataset = load_records(find_dataset(name, SHARED / "data" if name != "mini" else None))
    encoded = encode_chats(tokenizer, dataset)
    assert len(encoded) == len(dataset) and encoded.ids == dataset.ids
    assert encoded.offsets[-1] == len(encoded.input_ids) == len(encoded.roles)
    assert encoded.n_truncated == 0
    np.testing.assert_array_equal(encoded.lengths_before_truncation, encoded.lengths)
    roles_seen = set()
    for i in np.linspace(0, len(dataset) - 1, min(200, len(dataset))).astype(int):
        record = dataset[i]
        for code, role in [(ROLE_USER, "user"), (ROLE_ASSISTANT, "assistant"), (ROLE_TOOL, "tool")]:
            want = "".join(m.content for m in record.messages if m.role == role)
            assert _decode_role(tokenizer, encoded, i, code) == want, (record.source, role)
        has_system = any(m.role == "system" for m in record.messages)
        system = "".join(m.content for m in record.messages if m.role == "system")
        assert _decode_role(tokenizer, encoded, i, ROLE_SYSTEM) == (
            system if has_system else DEFAULT_SYSTEM
        )
        roles_seen.update(np.unique(encoded.row(i)[1]).tolist())
    assert {ROLE_TEMPLATE, ROLE_SYSTEM, ROLE_USER} <= roles_seen
    if name == "dev/toolace":
        assert ROLE_TOOL in roles_seen
    for i in range(0, len(dataset), max(1, len(dataset) // 15)):
        conversation = [m.as_dict() for m in dataset[i].messages]
        assert encoded.row(i)[0].tolist() == _reference_ids(tokenizer, conversation)


def test_truncation_left_and_right(tokenizer):
    chats = [CHAT, "short", CHAT + [{"role": "user", "content": "one more question please"}]]
    full = encode_chats(tokenizer, chats)
    limit = 20
    left = encode_chats(tokenizer, chats, max_tokens=limit)
    right = encode_chats(tokenizer, chats, max_tokens=limit, truncate="right")
    lengths = full.lengths
    expected_truncated = int(np.count_nonzero(lengths > limit))
    assert expected_truncated == 3  # the SmolLM2 default system prompt makes "short" long
    for encoded, keep in [(left, slice(-limit, None)), (right, slice(0, limit))]:
        assert encoded.n_truncated == expected_truncated
        np.testing.assert_array_equal(encoded.lengths_before_truncation, lengths)
        np.testing.assert_array_equal(encoded.lengths, np.minimum(lengths, limit))
        for i in range(len(chats)):
            ids, roles = full.row(i)
            np.testing.assert_array_equal(encoded.row(i)[0], ids[keep])
            np.testing.assert_array_equal(encoded.row(i)[1], roles[keep])
    # "left" keeps the end: the last user turn survives, the system prompt does not
    assert _decode_role(tokenizer, left, 2, ROLE_USER).endswith("one more question please")
    assert _decode_role(tokenizer, left, 2, ROLE_SYSTEM) == ""
    assert _decode_role(tokenizer, right, 2, ROLE_SYSTEM) == "Be brief."
    roomy = encode_chats(tokenizer, chats, max_tokens=int(lengths.max()))
    assert roomy.n_truncated == 0
    with pytest.raises(ValueError, match="truncate must be 'left' or 'right'"):
        encode_chats(tokenizer, chats, max_tokens=5, truncate="middle")
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        encode_chats(tokenizer, chats, max_tokens=0)


def test_more_conversations_than_one_chunk(tokenizer):
    chats = [f"question number {i}" for i in range(600)]
    encoded = encode_chats(tokenizer, chats)
    assert len(encoded) == 600
    for i in (0, 255, 256, 599):
        assert _decode_role(tokenizer, encoded, i, ROLE_USER) == f"question number {i}"


def test_encode_prompts_matches_generation_template(tokenizer):
    prompts = encode_prompts(tokenizer, [CHAT[:2], "What is 2 + 2?"])
    assert prompts[0] == _reference_ids(tokenizer, CHAT[:2], generation_prompt=True)
    assert tokenizer.decode(prompts[1]).endswith(
        "What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = encode_prompts(tokenizer, [CHAT], add_generation_prompt=False)
    assert no_prompt[0] == _reference_ids(tokenizer, CHAT)


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ValueError, match="conversation 1, message 0: unknown role 'robot'"):
        encode_chats(tokenizer, ["ok", [{"role": "robot", "content": "x"}]])
    with pytest.raises(ValueError, match="conversation 0: no messages"):
        encode_chats(tokenizer, [[]])
    with pytest.raises(TypeError, match="content must be a string"):
        encode_chats(tokenizer, [[{"role": "user", "content": None}]])
    with pytest.raises(TypeError, match="expected a Record, text, or a list of messages"):
        encode_chats(tokenizer, [42])


def _with_template(tokenizer, template):
    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone


def test_template_that_trims_contents(tokenizer):
    trimming = _with_template(
        tokenizer,
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
        "<|im_end|>\n{% endfor %}",
    )
    chat = [
        {"role": "user", "content": "  padded question \n"},
        {"role": "assistant", "content": "a"},
    ]
    encoded = encode_chats(trimming, [chat])
    assert _decode_role(trimming, encoded, 0, ROLE_USER) == "padded question"
    assert _decode_role(trimming, encoded, 0, ROLE_SYSTEM) == ""  # no default system prompt
    assert encoded.row(0)[0].tolist() == _reference_ids(trimming, chat)


def test_template_that_rewrites_or_repeats_contents_is_refused(tokenizer):
    upper = _with_template(
        tokenizer,
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}",
    )
    with pytest.raises(ValueError, match="changes message contents"):
        encode_chats(upper, ["hello"])
    twice = _with_template(
        tokenizer, "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="does not render each message once and in order"):
        encode_chats(twice, ["hello"])


def test_load_tokenizer_from_checkpoint_dir_and_cache(tokenizer, tmp_path):
    from mup._resolve import default_gguf_path

    assert load_tokenizer("smollm2-135m") is tokenizer  # cached per spec
    assert load_tokenizer(default_gguf_path()) is tokenizer  # and per resolved location
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from_dir = load_tokenizer(tmp_path)
    assert from_dir is not tokenizer and from_dir.is_fast
    a, b = encode_chats(tokenizer, [CHAT, "x"]), encode_chats(from_dir, [CHAT, "x"])
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.roles, b.roles)


def test_template_refusing_a_role_names_the_conversation(tokenizer):
    no_system = _with_template(
        tokenizer,
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    )
    encoded = encode_chats(no_system, ["fine"])
    assert _decode_role(no_system, encoded, 0, ROLE_USER) == "fine"
    with pytest.raises(
        ValueError, match=r"conversation 1: the chat template refused .*System role"
    ):
        encode_chats(no_system, ["fine", CHAT])


def test_cached_conversion_equals_the_gguf_conversion(tokenizer, caplog):
    from mup._resolve import default_gguf_path
    from mup.text._tokenizer import _gguf_tokenizer

    path = default_gguf_path()
    _gguf_tokenizer(path)  # a cache hit, unless another test area loaded the tokenizer first
    with caplog.at_level(logging.INFO, logger="mup.text"):
        cached = _gguf_tokenizer(path)
    assert "loading the converted copy" in caplog.text
    assert cached is not tokenizer and cached.is_fast
    assert cached.chat_template == tokenizer.chat_template
    assert cached.get_vocab() == tokenizer.get_vocab()
    assert cached.all_special_tokens == tokenizer.all_special_tokens
    dataset = load_records(find_dataset("mini"))
    a, b = encode_chats(tokenizer, dataset), encode_chats(cached, dataset)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.roles, b.roles)
    assert encode_prompts(cached, [CHAT]) == encode_prompts(tokenizer, [CHAT])
