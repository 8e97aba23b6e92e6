"""Rotary position embeddings: reading both HF rope formats, and the inverse frequencies.

Axis letters: H head dim.

HF configs carry rope either flat (``rope_theta`` / ``rope_scaling``, before transformers 5) or
as ``rope_parameters`` (transformers 5, per attention kind for Gemma 3); both give the same
`RopeScaling`. `rope_inv_freq` computes the [H/2] frequencies as transformers does, in float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mup.models._config import ModelConfig, RopeScaling

ROPE_ATTRIBUTES = frozenset(
    {"rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq"}
)
"""The HF attributes `read_hf_rope` reads (of every family)."""


def read_hf_rope(
    hf: dict[str, Any], *, local_rope: bool, problems: list[str]
) -> tuple[float, RopeScaling | None, float | None]:
    """(global theta, global scaling, local theta) from either HF rope format; `local_rope`:
    sliding-window layers have a rope of their own (Gemma 3). Problems are appended, by name."""
    params = hf.get("rope_parameters")
    if local_rope:
        if params and "full_attention" in params:
            full = dict(params["full_attention"] or {})
            local = dict(params.get("sliding_attention") or {})
        else:
            full = dict(params or hf.get("rope_scaling") or {})
            local = {}
            full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        if hf.get("rope_scaling") and params and "full_attention" in params:
            full.update(hf["rope_scaling"])
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        local_kind = local.get("rope_type", local.get("type", "default"))
        if local_kind != "default":
            problems.append(f"rope_parameters.sliding_attention.rope_type={local_kind!r}")
        theta, scaling = _rope_entry(full, "rope_parameters.full_attention", problems)
        return theta, scaling, float(local["rope_theta"])
    entry = dict(params) if params else dict(hf.get("rope_scaling") or {})
    if "rope_theta" not in entry:
        entry["rope_theta"] = hf.get("rope_theta", 10_000.0)
    where = "rope_parameters" if params else "rope_scaling"
    theta, scaling = _rope_entry(entry, where, problems)
    return theta, scaling, None


def _rope_entry(
    entry: dict[str, Any], where: str, problems: list[str]
) -> tuple[float, RopeScaling | None]:
    kind = entry.get("rope_type", entry.get("type", "default"))
    theta = float(entry["rope_theta"])
    if entry.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"{where}.partial_rotary_factor={entry['partial_rotary_factor']!r}")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(entry["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(entry["factor"]),
            low_freq_factor=float(entry["low_freq_factor"]),
            high_freq_factor=float(entry["high_freq_factor"]),
            original_max_position_embeddings=int(entry["original_max_position_embeddings"]),
        )
    problems.append(
        f"{where}.rope_type={kind!r} is not implemented (supported: default, linear, llama3)"
    )
    return theta, None


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse rotary frequencies [H/2] float32, computed as transformers does (in float32)."""
    H = config.head_dim
    if local and config.local_rope_theta is not None:
        theta, scaling = config.local_rope_theta, None
    else:
        theta, scaling = config.rope_theta, config.rope_scaling
    exponent = np.arange(0, H, 2, dtype=np.float32) / np.float32(H)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
