"""Steering vector files: safetensors with metadata, or a plain ``.npy`` array.

Axis letters: D model width.

Block convention (the one `mup.models.Steering` uses): a vector for block L is added to the
OUTPUT of block L, which is transformers' ``hidden_states[L + 1]``, i.e. layer L + 1 (a
`layer` is always a hidden_states index in mup). Every vector mup builds for block L is
therefore measured at layer L + 1 (the residual stream that block L's output is), so that
adding it moves the activations along the direction it was measured in. The file's ``block``
field is the steered block; ``source_hidden_state`` records where a difference of means was
measured.

A safetensors file holds one tensor ``vector`` float32 [D] and string metadata: model, block,
method, epoch, norm, created, plus any extra fields the builder adds (metrics as JSON). Files
written before the rename carry ``layer`` (the same number: the steered block) instead of
``block``; they are read as well.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mup._renamed import old_keywords

TENSOR_KEY = "vector"
# Metadata keys every mup vector file carries (values are strings in safetensors).
REQUIRED_METADATA = ("model", "block", "method", "epoch", "norm", "created")
# What older files call the steered block (the same number, written before the rename).
OLD_BLOCK_KEY = "layer"


class VectorFileError(ValueError):
    """A vector file that cannot be read as a steering vector (names the file and the field)."""


@old_keywords(layer="block")
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SteeringVector:
    """One steering vector and where it applies.

    vector:  float32 [D].
    block:   the block whose output it is added to (see the module docstring); `layer` is its
             old name, kept as a read-only property.
    model:   the model it was built on (a readable name or spec); "" when unknown (.npy files).
    method:  how it was built: "dom-store", "dom-mean", "dom-last", "dom-pca", "bipo", "npy".
    epoch:   BiPO epoch (1-based) that produced it; 0 for closed-form vectors.
    created: ISO-8601 UTC time of creation.
    extra:   further metadata (JSON-serialisable values), e.g. training metrics.
    """

    vector: np.ndarray
    block: int
    model: str = ""
    method: str = ""
    epoch: int = 0
    created: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        v = np.asarray(self.vector, dtype=np.float32)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"a steering vector must have shape [D], got {v.shape}")
        if not np.all(np.isfinite(v)):
            bad = int(np.argmax(~np.isfinite(v)))
            raise ValueError(f"steering vector has a non-finite value at index {bad}: {v[bad]}")
        if int(self.block) < 0:
            raise ValueError(f"block must be >= 0, got {self.block}")
        object.__setattr__(self, "vector", v)
        object.__setattr__(self, "block", int(self.block))
        if not self.created:
            object.__setattr__(self, "created", now_iso())

    @property
    def layer(self) -> int:
        """The old name of `block` (deprecated; read-only): the steered block, not a layer."""
        return self.block

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.vector))

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (every value a string)."""
        meta = {
            "model": str(self.model),
            "block": str(self.block),
            "method": str(self.method),
            "epoch": str(int(self.epoch)),
            "norm": repr(self.norm),
            "created": self.created,
        }
        for key, value in self.extra.items():
            if key in meta:
                raise ValueError(f"extra metadata key {key!r} clashes with a required field")
            meta[key] = value if isinstance(value, str) else json.dumps(value)
        return meta


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def save_vector(path: str | os.PathLike, vector: SteeringVector) -> Path:
    """Write `vector` as safetensors (``.safetensors``) or a bare array (``.npy``)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, vector.vector)
    elif path.suffix == ".safetensors":
        # Write then rename: a reader never sees half a file (BiPO overwrites per epoch).
        tmp = path.with_name(path.name + ".tmp")
        save_file({TENSOR_KEY: vector.vector}, str(tmp), metadata=vector.metadata())
        os.replace(tmp, path)
    else:
        raise ValueError(f"{path}: a vector file must end in .safetensors or .npy")
    return path


@old_keywords(layer="block")
def load_vector(
    path: str | os.PathLike,
    *,
    block: int | None = None,
    d_model: int | None = None,
) -> SteeringVector:
    """Read a vector file (``.safetensors`` from mup, or a plain ``.npy`` [D] array).

    block: the steered block; required for ``.npy`` files (they carry no metadata); for
      safetensors files it overrides nothing and must equal the stored block when given.
    d_model: when given, the vector must have shape [d_model] (the model it will steer).
    ``layer=`` is the old name of ``block=``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vector file {path} does not exist")
    if path.suffix == ".npy":
        sv = _load_npy(path, block)
    elif path.suffix == ".safetensors":
        sv = _load_safetensors(path, block)
    else:
        raise VectorFileError(f"{path}: a vector file must end in .safetensors or .npy")
    if d_model is not None and sv.d_model != int(d_model):
        raise VectorFileError(
            f"{path}: vector has shape ({sv.d_model},) but the model has d_model={d_model}, "
            f"so shape ({d_model},) is expected"
        )
    return sv


def _load_npy(path: Path, block: int | None) -> SteeringVector:
    if block is None:
        raise VectorFileError(
            f"{path}: a .npy vector carries no block; pass the block (--block L, the block whose "
            "output it is added to)"
        )
    if path.stat().st_size == 0:
        raise VectorFileError(f"{path}: empty file (0 bytes), not a numpy array")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # EOFError: cut short inside the header
        problem = " ".join(str(e).split()) or type(e).__name__
        raise VectorFileError(f"{path}: not a plain numpy array file: {problem}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive renamed .npy
        raise VectorFileError(f"{path}: holds an .npz archive, not one array")
    if arr.ndim != 1:
        raise VectorFileError(f"{path}: expected an array of shape [d_model], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise VectorFileError(f"{path}: expected a float array, got dtype {arr.dtype}")
    try:
        return SteeringVector(vector=arr, block=block, method="npy", model="")
    except ValueError as e:
        raise VectorFileError(f"{path}: {e}") from None


def _load_safetensors(path: Path, block: int | None) -> SteeringVector:
    from safetensors import safe_open

    if path.stat().st_size == 0:
        raise VectorFileError(f"{path}: empty file (0 bytes), not a safetensors file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            meta = dict(f.metadata() or {})
            if keys != [TENSOR_KEY]:
                raise VectorFileError(
                    f"{path}: expected exactly one tensor named {TENSOR_KEY!r}, found {keys}"
                )
            arr = f.get_tensor(TENSOR_KEY)
    except VectorFileError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own untyped errors
        problem = " ".join(str(e).split()) or type(e).__name__
        raise VectorFileError(f"{path}: not a readable safetensors file: {problem}") from None
    if arr.ndim != 1:
        raise VectorFileError(
            f"{path}: tensor {TENSOR_KEY!r} has shape {arr.shape}, expected [d_model]"
        )
    if "block" not in meta and OLD_BLOCK_KEY in meta:  # a file from before the rename
        meta["block"] = meta.pop(OLD_BLOCK_KEY)
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise VectorFileError(f"{path}: metadata is missing {missing} (have {sorted(meta)})")
    try:
        stored_block = int(meta["block"])
        epoch = int(meta["epoch"])
    except ValueError:
        raise VectorFileError(
            f"{path}: metadata block={meta['block']!r} / epoch={meta['epoch']!r} are not ints"
        ) from None
    if block is not None and int(block) != stored_block:
        raise VectorFileError(
            f"{path}: the file was built for block {stored_block}, but block {block} was asked "
            "for; a vector only makes sense at the block it was measured at"
        )
    extra = {k: _maybe_json(v) for k, v in meta.items() if k not in REQUIRED_METADATA}
    try:
        return SteeringVector(
            vector=arr,
            block=stored_block,
            model=meta["model"],
            method=meta["method"],
            epoch=epoch,
            created=meta["created"],
            extra=extra,
        )
    except ValueError as e:
        raise VectorFileError(f"{path}: {e}") from None


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
