"""Tiny random checkpoints saved as real directories (weights + tokenizer), and a word-level
chat tokenizer for models whose vocabulary is a handful of words."""

from __future__ import annotations

from pathlib import Path

import pytest

# transformers config kwargs of the tiny reference models of the parity and generation tests.
TINY_HF = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def save_tiny_llama(
    path: Path,
    *,
    d_model: int = 32,
    d_ff: int | None = None,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    max_positions: int = 4096,
    std: float | None = None,
    embed_std: float | None = None,
    special_tokens: bool = True,
) -> Path:
    """A random 2-block llama with SmolLM2's vocabulary and tokenizer, saved in `path`.

    d_ff: the MLP width, 2 * d_model by default.
    std: re-draw every non-norm weight from N(0, std) (embeddings from N(0, embed_std), default
      std), so that greedy choices are far from ties and steering visibly changes them; None
      keeps transformers' 0.02 init.
    special_tokens: write the tokenizer's bos / eos ids into the config (else LlamaConfig's).
    """
    torch = pytest.importorskip("torch", reason="torch builds the tiny reference checkpoint")
    import transformers

    from mup.text import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    ids = (
        dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if special_tokens
        else {}
    )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model if d_ff is None else d_ff,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **ids,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.normal_(0.0, std if "embed" not in name else (embed_std or std))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over SPECIALS + `words` with a ChatML-like template."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=TEMPLATE,
    )
