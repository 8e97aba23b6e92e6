"""The on-disk format of an activation store: names, attributes, array specs, content key.

Axis letters: N records, T tokens (all records concatenated), D model width, S shards, W bytes
of the longest record id.

One zarr v3 group:
  zarr.json            group; attributes below (`complete` is written last)
  offsets              int64 [N+1]   record i owns tokens offsets[i]:offsets[i+1]
  ids                  uint8 [N, W]  UTF-8 record ids, zero-padded on the right
  input_ids            int32 [T]
  roles                uint8 [T]
  mask                 bool  [T]
  labels               int8  [N]     1 high, 0 low, -1 none/ambiguous (optional)
  done                 uint8 [S]     1 = shard s of every layer array is durable (resume)
  layers/<L>           [T, D] storage dtype, sharded along T (sharding_indexed + zstd)

Format versions (both readable):
  1  inner chunks: bytes + zstd; only the shard index carried a crc32c, so a flipped bit in a
     chunk decoded to wrong numbers without an error.
  2  every chunk of every array ends in a crc32c (the zarr v3 `crc32c` codec, last in the chain,
     over the compressed bytes; read by tensorstore and zarr-python, both of which raise on a
     mismatch), and the group records `has_labels`, so that the set of objects a complete store
     must hold is known from its attributes alone (see `expected_objects`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

FORMAT_NAME = "mup.activations"
FORMAT_VERSION = 2
# Versions this code reads (and resumes: a version 1 store keeps its own codec chains).
READABLE_VERSIONS = (1, 2)
# The format version hashed into `store_key`. Version 2 only adds checksums: the stored values,
# and so the content key, are those of version 1, and existing stores keep their names.
KEY_FORMAT_VERSION = 1

STORAGE_DTYPES = ("float16", "bfloat16", "float32")

# Attributes the caller (the extractor) must describe the job with; they make a store
# self-describing for the probe side and for other tools.
JOB_ATTRS = (
    "model",
    "model_revision",
    "dataset",
    "dataset_sha256",
    "site",
    "mask_mode",
    "tokenizer",
    "max_tokens",
)
# Attributes the store itself owns; callers may not set them.
RESERVED_ATTRS = (
    "format",
    "format_version",
    "layers",
    "d_model",
    "dtype",
    "n_records",
    "n_tokens",
    "chunk_tokens",
    "shard_tokens",
    "ids_encoding",
    "mup_version",
    "created",
    "complete",
    "completed",
    "has_labels",
)

# Inner chunk = the unit of compression and of random reads. ~1 MiB uncompressed keeps zstd's
# ratio near its plateau while a single record read (hundreds of tokens) touches 1-2 chunks.
CHUNK_BYTES = 1 << 20
# Shard = one object/file = the unit of writing, resume and upload. ~32 MiB objects stream at
# full S3/R2 bandwidth with a single PUT (below the multipart threshold), while the writer
# buffers at most a few shards per layer in host memory (see StoreWriter).
SHARD_BYTES = 32 << 20
# Chunk length of the small token-level arrays (input_ids, roles, mask): 1 Mi elements.
TOKEN_META_CHUNK = 1 << 20
# Chunk length of the record-level arrays (offsets, ids, labels).
RECORD_META_CHUNK = 1 << 16
# Compressor of the layer arrays: plain zstd level 1. On real residuals higher levels and blosc
# shuffles compressed no better and ran slower (the exponent byte carries most of the
# redundancy either way); `benchmarks/bench_store.py` prints the ratio it reaches. Residuals are
# near-incompressible; the big saving is storing them ragged (no padding).
LAYER_ZSTD_LEVEL = 1
# The token/record arrays (ids, roles, mask, offsets) are very compressible; level 3 is cheap.
ZSTD_LEVEL = 3


def itemsize(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def default_chunk_tokens(d_model: int, dtype: str) -> int:
    return max(16, _pow2_floor(CHUNK_BYTES // (d_model * itemsize(dtype))))


def default_shard_tokens(d_model: int, dtype: str, chunk_tokens: int) -> int:
    per_shard = max(1, SHARD_BYTES // (chunk_tokens * d_model * itemsize(dtype)))
    return chunk_tokens * per_shard


def store_key(
    *,
    dataset_sha256: str,
    model: str,
    site: str,
    layers,
    mask_mode: str,
    max_tokens: int | None,
    dtype: str,
    compute_dtype: str = "float32",
) -> str:
    """A short content hash naming a store: the same job gives the same key.

    The key covers everything that changes the stored values (dataset content, model, capture
    site, layers, mask mode, truncation, storage dtype, the model's compute dtype) and the
    version of the stored values (`KEY_FORMAT_VERSION`). The float32 compute dtype is left out
    of the hashed job so that stores written before it was part of the key keep their names.
    """
    job = {
        "format": FORMAT_NAME,
        "format_version": KEY_FORMAT_VERSION,
        "dataset_sha256": str(dataset_sha256),
        "model": str(model),
        "site": str(site),
        "layers": sorted(int(layer) for layer in layers),
        "mask_mode": str(mask_mode),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "dtype": str(dtype),
    }
    if compute_dtype != "float32":
        job["compute_dtype"] = str(compute_dtype)
    blob = json.dumps(job, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The checksum codec that ends every chunk's codec chain from format version 2 on. It covers the
# compressed bytes, so a flipped bit anywhere in an object fails the read instead of decoding.
CRC32C = {"name": "crc32c"}


def _plain_codecs(level: int = ZSTD_LEVEL, version: int = FORMAT_VERSION) -> list[dict[str, Any]]:
    codecs = [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "zstd", "configuration": {"level": level, "checksum": False}},
    ]
    return codecs + [CRC32C] if version >= 2 else codecs


def meta_array_metadata(
    dtype: str, shape: list[int], chunk: list[int], version: int = FORMAT_VERSION
) -> dict[str, Any]:
    """zarr v3 metadata for a small unsharded array (offsets, ids, input_ids, ...)."""
    chunk = meta_chunk_shape(shape, chunk)
    return {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": _plain_codecs(version=version),
        "fill_value": False if dtype == "bool" else 0,
    }


def meta_chunk_shape(shape: list[int], chunk: list[int]) -> list[int]:
    return [max(1, min(c, s)) for c, s in zip(chunk, shape, strict=True)]


def done_array_metadata(n_shards: int, version: int = FORMAT_VERSION) -> dict[str, Any]:
    # One object per shard flag: marking shard s done never rewrites another shard's flag, so
    # concurrent writers (one per host) never contend on an object.
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return {
        "shape": [n_shards],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1]}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": codecs + [CRC32C] if version >= 2 else codecs,
        "fill_value": 0,
    }


def layer_array_metadata(
    *,
    n_tokens: int,
    d_model: int,
    dtype: str,
    chunk_tokens: int,
    shard_tokens: int,
    version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """zarr v3 metadata for one layer array [T, D]: shards of whole inner chunks along T."""
    inner = _plain_codecs(LAYER_ZSTD_LEVEL, version)
    return {
        "shape": [n_tokens, d_model],
        "data_type": dtype,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [shard_tokens, d_model]},
        },
        "chunk_key_encoding": {"name": "default"},
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [chunk_tokens, d_model],
                    "codecs": inner,
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "fill_value": 0.0,
    }


def encode_ids(ids) -> np.ndarray:
    """Record ids -> uint8 [N, W], UTF-8, zero-padded (readable by zarr-python and tensorstore)."""
    encoded = []
    for i, rid in enumerate(ids):
        if not isinstance(rid, str):
            raise ValueError(f"ids[{i}] must be a str, got {type(rid).__name__}")
        b = rid.encode("utf-8")
        if b"\x00" in b:
            raise ValueError(f"ids[{i}] contains a NUL character, which the id encoding reserves")
        encoded.append(b)
    width = max([len(b) for b in encoded] + [1])
    out = np.zeros((len(encoded), width), np.uint8)  # [N, W]
    for i, b in enumerate(encoded):
        out[i, : len(b)] = np.frombuffer(b, np.uint8)
    return out


def decode_ids(raw: np.ndarray) -> list[str]:
    """uint8 [N, W] -> list of str (inverse of encode_ids)."""
    return [bytes(row).rstrip(b"\x00").decode("utf-8") for row in np.asarray(raw, np.uint8)]


def rows_done(offsets: np.ndarray, shard_done: np.ndarray, shard_tokens: int) -> np.ndarray:
    """bool [N]: records all of whose shards are done; records with no tokens count as done."""
    prefix = np.concatenate([[0], np.cumsum(~np.asarray(shard_done, bool))])  # [S+1]
    starts, ends = offsets[:-1], offsets[1:]
    first = starts // shard_tokens
    end = np.where(ends > starts, -(-ends // shard_tokens), first)  # one past the last shard
    return prefix[end] - prefix[first] == 0


def _meta_keys(name: str, length: int, chunk: int, two_d: bool = False) -> list[str]:
    c = max(1, min(chunk, length))
    suffix = "/0" if two_d else ""  # ids [N, W]: one chunk spans every column
    return [f"{name}/zarr.json"] + [f"{name}/c/{i}{suffix}" for i in range(-(-length // c))]


def creation_objects(attrs: dict, *, labels: bool | None = None) -> list[str]:
    """The objects `create` writes: metadata and the small token/record arrays (not shards).

    labels: whether the store has a labels array; version 2 stores record it (`has_labels`),
    version 1 stores need the caller to say (from a listing: `labels/zarr.json` present).
    """
    n, t = int(attrs["n_records"]), int(attrs["n_tokens"])
    keys = ["zarr.json", "layers/zarr.json"]
    keys += _meta_keys("offsets", n + 1, RECORD_META_CHUNK)
    keys += _meta_keys("ids", n, RECORD_META_CHUNK, two_d=True)
    for name in ("input_ids", "roles", "mask"):
        keys += _meta_keys(name, t, TOKEN_META_CHUNK)
    if attrs.get("has_labels", labels):
        keys += _meta_keys("labels", n, RECORD_META_CHUNK)
    keys.append("done/zarr.json")
    keys += [f"layers/{int(layer)}/zarr.json" for layer in attrs["layers"]]
    return keys


def n_shards(attrs: dict) -> int:
    return -(-int(attrs["n_tokens"]) // int(attrs["shard_tokens"]))


def shard_key(layer: int, s: int) -> str:
    """The object of shard s of a layer array (zarr v3 default chunk keys: c/<t>/<d>)."""
    return f"layers/{int(layer)}/c/{int(s)}/0"


def shard_objects(attrs: dict, shards) -> list[str]:
    """The objects of `shards` (indices): every layer's shard object and its `done` flag."""
    keys = []
    for s in shards:
        keys += [shard_key(layer, s) for layer in attrs["layers"]]
        keys.append(f"done/c/{int(s)}")
    return keys


def expected_objects(attrs: dict, *, labels: bool | None = None) -> list[str]:
    """Every object a complete store holds, from its attributes (see `creation_objects`)."""
    return creation_objects(attrs, labels=labels) + shard_objects(attrs, range(n_shards(attrs)))
