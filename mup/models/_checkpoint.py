"""Checkpoint readers: HF safetensors directories and GGUF files -> HF-named numpy tensors.

Every reader yields ``(hf_name, array)`` pairs one tensor at a time so that the caller
(`params_from_hf`) can cast and shard each tensor as it arrives; nothing here ever holds
more than one tensor of a checkpoint in memory.

* safetensors: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
  The files are memory-mapped and each tensor is copied out when it is reached. The header
  is parsed here (it is a length-prefixed JSON table) rather than through
  ``safetensors.safe_open(framework="numpy")``, because the numpy backend of safetensors
  0.8 cannot decode bfloat16 -- the dtype most checkpoints ship in. bfloat16 (and float8)
  tensors arrive as ``ml_dtypes`` arrays.
* GGUF (llama.cpp): tensors are dequantized with ``gguf.quants.dequantize`` to float32,
  renamed to HF names, and the rotary Q/K row permutation that llama.cpp's converter applies
  is undone, so the result equals what ``transformers`` loads from the same file.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mup._resolve import ResolvedSpec

__all__ = ["CheckpointError", "iter_hf_tensors", "read_hf_config"]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# safetensors dtype tag -> numpy dtype (https://github.com/huggingface/safetensors format).
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or in a form this reader does not handle."""


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def read_hf_config(resolved: ResolvedSpec) -> dict[str, Any]:
    """The HF ``config.json`` dict of a checkpoint directory, or one built from GGUF metadata."""
    if resolved.kind == "gguf":
        return _gguf_config(_open_gguf(resolved.path), resolved.path)
    path = Path(resolved.path) / "config.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist: an HF checkpoint needs config.json"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def iter_hf_tensors(
    resolved: ResolvedSpec, *, names: Iterable[str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every tensor (or only ``names``), one at a time.

    Raises `CheckpointError` when a requested name is absent, a shard is missing, or a file
    is truncated or malformed.
    """
    wanted = None if names is None else set(names)
    if resolved.kind == "gguf":
        source = _iter_gguf(Path(resolved.path), wanted)
    else:
        source = _iter_safetensors_dir(Path(resolved.path), wanted)
    seen: set[str] = set()
    for name, array in source:
        seen.add(name)
        yield name, array
    if wanted is not None and (missing := sorted(wanted - seen)):
        raise CheckpointError(
            f"{resolved.path}: requested tensors are not in the checkpoint: {', '.join(missing)}"
        )


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def _iter_safetensors_dir(
    directory: Path, wanted: set[str] | None
) -> Iterator[tuple[str, np.ndarray]]:
    index_path = directory / SAFETENSORS_INDEX
    single_path = directory / SAFETENSORS_SINGLE
    if index_path.is_file():
        shards = _read_index(index_path)
    elif single_path.is_file():
        shards = {SAFETENSORS_SINGLE: None}
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        others = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {', '.join(found)} without an index)" if found else ""
        if others and not found:
            hint = f" (found {', '.join(others)}: PyTorch pickles are not read; use safetensors)"
        raise CheckpointError(
            f"{directory} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}{hint}"
        )
    # Check every shard before reading any, so a missing one fails fast, not after 60 GB.
    for shard in shards:
        if not (directory / shard).is_file():
            held = shards[shard] or []
            raise CheckpointError(
                f"shard {directory / shard} is missing; {index_path.name} lists it for "
                f"{len(held)} tensors (e.g. {', '.join(sorted(held)[:3])})"
            )
    for shard, expected in shards.items():
        path = directory / shard
        header, data_start = _read_safetensors_header(path)
        if expected is not None and (absent := sorted(set(expected) - set(header))):
            raise CheckpointError(
                f"{path} lacks tensors that {SAFETENSORS_INDEX} assigns to it: "
                f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
            )
        names = [n for n in header if expected is None or n in expected]
        if wanted is not None:
            names = [n for n in names if n in wanted]
        if not names:
            continue
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        # Read in file order: sequential I/O on network file systems and spinning disks.
        for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
            entry = header[name]
            start, end = entry["data_offsets"]
            raw = mapped[data_start + start : data_start + end]
            yield name, np.array(raw).view(entry["dtype"]).reshape(entry["shape"])
        del mapped


def _read_index(index_path: Path) -> dict[str, list[str]]:
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{index_path} is not valid JSON (line {error.lineno}: {error.msg})"
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' object mapping tensor -> file")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard:
            raise CheckpointError(
                f"{index_path}: weight_map[{name!r}] = {shard!r} is not a file name"
            )
        shards.setdefault(shard, []).append(name)
    return shards


def _read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse and validate the JSON header; returns (name -> entry, byte offset of the data)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, no safetensors header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{path} is not a safetensors file or is truncated: header length {header_len} "
                f"exceeds the file size {size}"
            )
        try:
            raw = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(
                f"{path}: safetensors header is not valid JSON ({error})"
            ) from None
    data_start = 8 + header_len
    data_size = size - data_start
    header: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has a malformed or unsupported header entry {entry!r}"
            ) from None
        if end - start != math.prod(shape) * dtype.itemsize or not 0 <= start <= end:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} "
                f"has data_offsets {start}..{end} of the wrong length"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": (start, end)}
    return header, data_start


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------

# Architectures whose tensors and metadata this reader maps. Qwen2/Gemma GGUFs use other
# metadata prefixes and tensor layouts; load their HF safetensors checkpoints instead.
GGUF_ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# llama.* metadata keys that change the computation and are understood here.
_GGUF_LLAMA_KEYS = {
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "vocab_size",
}


def _open_gguf(path: Path):
    # GGUFReader walks every metadata field (the whole vocabulary) in Python, seconds per file:
    # load_model reads the config and then the tensors, so parse each file version once.
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from None
    return _open_gguf_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf_cached(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from None


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _gguf_config(reader, path: Path) -> dict[str, Any]:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}); load the model's HF safetensors checkpoint instead"
        )
    prefix = f"{arch}."
    unknown = sorted(
        key
        for key in reader.fields
        if key.startswith(prefix) and key.removeprefix(prefix) not in _GGUF_LLAMA_KEYS
    )
    # Keys that only restate defaults are harmless; anything else (rope scaling, experts,
    # sliding windows, ...) would change the computation and is refused by name.
    harmless = {f"{prefix}expert_count": 0, f"{prefix}expert_used_count": 0}
    refused = [k for k in unknown if harmless.get(k, object()) != _gguf_field(reader, k)]
    if refused:
        values = ", ".join(f"{k}={_gguf_field(reader, k)!r}" for k in refused)
        raise CheckpointError(f"{path}: unsupported GGUF metadata for {arch}: {values}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
            f"{path}: the GGUF carries rope_freqs.weight (llama3-style rope scaling), which "
            "cannot be turned back into an HF rope_scaling config; load the HF checkpoint instead"
        )

    def need(key: str) -> Any:
        value = _gguf_field(reader, prefix + key)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata key {prefix + key!r} is missing")
        return value

    n_heads = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    head_dim = int(_gguf_field(reader, prefix + "rope.dimension_count", d_model // n_heads))
    for key in ("attention.key_length", "attention.value_length"):
        value = _gguf_field(reader, prefix + key)
        if value is not None and int(value) != head_dim:
            raise CheckpointError(
                f"{path}: {prefix + key}={value} differs from the rope dimension {head_dim}; "
                "partial rotary embeddings are not supported"
            )
    vocab = _gguf_field(reader, prefix + "vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{path}: neither {prefix}vocab_size nor a tokenizer vocabulary")
        vocab = len(tokens.data)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(
            _gguf_field(reader, prefix + "attention.head_count_kv", n_heads)
        ),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_gguf_field(reader, prefix + "context_length", 2048)),
        # The float32 value as stored: transformers' GGUF loader uses exactly this number.
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_gguf_field(reader, prefix + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for gguf_key, hf_key in (
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ):
        value = _gguf_field(reader, gguf_key)
        if value is not None:
            config[hf_key] = int(value)
    return config


def _gguf_hf_name(name: str, n_layers: int, path: Path) -> str:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    match = _GGUF_BLOCK_RE.fullmatch(name)
    if match and match.group(2) in _GGUF_BLOCK_NAMES and int(match.group(1)) < n_layers:
        return f"model.layers.{match.group(1)}.{_GGUF_BLOCK_NAMES[match.group(2)]}"
    raise CheckpointError(f"{path}: GGUF tensor {name!r} has no HF llama counterpart")


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order ([N, 2, H/2] -> [N, H/2, 2]) back to HF's rotate-half."""
    half = weight.shape[0] // n_heads // 2
    rows = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _iter_gguf(path: Path, wanted: set[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = _open_gguf(path)
    config = _gguf_config(reader, path)
    n_layers = config["num_hidden_layers"]
    for tensor in reader.tensors:
        hf_name = _gguf_hf_name(tensor.name, n_layers, path)
        if wanted is not None and hf_name not in wanted:
            continue
        qtype = GGMLQuantizationType(tensor.tensor_type)
        try:
            array = dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} uses quantisation {qtype.name}, which the "
                "installed gguf package cannot dequantize"
            ) from None
        array = np.asarray(array, dtype=np.float32)
        if hf_name.endswith("q_proj.weight"):
            array = _unpermute_rope_rows(array, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            array = _unpermute_rope_rows(array, config["num_key_value_heads"])
        yield hf_name, np.ascontiguousarray(array)
