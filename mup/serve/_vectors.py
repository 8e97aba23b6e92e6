"""Reading a steering vector file: safetensors with metadata, or a plain .npy [D] plus a layer.

`mup.steering.load_vector` is used when that package provides it, so the server accepts exactly
the files the steering commands write; this reader covers the same two formats otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_steering_vector(path, layer: int | None, d_model: int) -> tuple[np.ndarray, int]:
    """(vector [D] float32, layer) from `path`; errors name the file and what was wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering vector file {path} does not exist")
    if path.suffix == ".npy":
        vector = np.load(path, allow_pickle=False)
        if layer is None:
            raise ValueError(f"{path}: a .npy vector needs --layer (the block it steers)")
        file_layer = None
    elif path.suffix == ".safetensors":
        vector, file_layer = _read_safetensors(path)
    else:
        raise ValueError(f"{path}: expected a .safetensors or .npy steering vector file")
    if file_layer is not None and layer is not None and file_layer != layer:
        raise ValueError(
            f"{path}: the file steers layer {file_layer} but --layer {layer} was given"
        )
    layer = file_layer if layer is None else layer
    if layer is None:
        raise ValueError(f"{path}: no 'layer' in the file's metadata; pass --layer")
    vector = np.asarray(vector)
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.shape != (d_model,):
        raise ValueError(
            f"{path}: steering vector has shape {vector.shape}, the model needs [{d_model}]"
        )
    if not np.issubdtype(vector.dtype, np.floating):
        raise ValueError(f"{path}: steering vector must be floating point, got {vector.dtype}")
    vector = vector.astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"{path}: steering vector contains NaN or inf")
    return vector, int(layer)


def _read_safetensors(path: Path) -> tuple[np.ndarray, int | None]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        if "vector" in keys:
            key = "vector"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise ValueError(
                f"{path}: expected one tensor (or one named 'vector'), found {sorted(keys)}"
            )
        vector = f.get_tensor(key)
    raw = meta.get("layer")
    if raw is None:
        return vector, None
    try:
        return vector, int(raw)
    except ValueError:
        raise ValueError(f"{path}: metadata 'layer' must be an integer, got {raw!r}") from None
