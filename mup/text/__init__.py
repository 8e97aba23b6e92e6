"""Chat encoding: chat template -> ragged token ids, a role per token, and role masks.

tokenizer = load_tokenizer("smollm2-135m")
enc = encode_chats(tokenizer, dataset, max_tokens=1024)   # truncate="left" keeps the end
mask = token_mask(enc.roles, enc.offsets, "last_user")    # bool [T]
"""

# Tokenizers
from mup.text._tokenizer import SMOLLM2_CHAT_TEMPLATE, load_tokenizer, tokenizer_cache_dir

# isort: split
# Encoding conversations
from mup.text._chat import (
    ROLE_ASSISTANT,
    ROLE_CODES,
    ROLE_NAMES,
    ROLE_SYSTEM,
    ROLE_TEMPLATE,
    ROLE_TOOL,
    ROLE_USER,
    Encoded,
    encode_chats,
    encode_prompts,
)

# isort: split
# Masks by role
from mup.text._mask import MASK_MODES, MaskMode, empty_mask_rows, token_mask

__all__ = [
    "MASK_MODES",
    "ROLE_ASSISTANT",
    "ROLE_CODES",
    "ROLE_NAMES",
    "ROLE_SYSTEM",
    "ROLE_TEMPLATE",
    "ROLE_TOOL",
    "ROLE_USER",
    "SMOLLM2_CHAT_TEMPLATE",
    "Encoded",
    "MaskMode",
    "empty_mask_rows",
    "encode_chats",
    "encode_prompts",
    "load_tokenizer",
    "token_mask",
    "tokenizer_cache_dir",
]
