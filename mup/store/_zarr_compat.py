"""Teach zarr-python 3 the `bfloat16` data type that tensorstore writes.

zarr-python 3.1 ships no bfloat16 data type, so `zarr.open_array` on a bfloat16 layer array
fails with "No Zarr data type found that matches 'bfloat16'". `register_zarr_bfloat16()` adds one
backed by ml_dtypes' numpy bfloat16 (the same bits tensorstore stores: little-endian bfloat16).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["register_zarr_bfloat16"]


def register_zarr_bfloat16() -> None:
    """Register a zarr-python data type for bfloat16 (idempotent; a no-op if zarr has one)."""
    import ml_dtypes
    from zarr.core.dtype import data_type_registry

    if "bfloat16" in data_type_registry.contents:
        return
    try:
        from zarr.core.dtype.npy.float import Float16
    except ImportError as e:  # zarr reorganised its internals
        raise RuntimeError(
            f"cannot register bfloat16 with this zarr version ({e}); read bfloat16 stores "
            "with mup.store.open or tensorstore instead"
        ) from None
    bf16 = np.dtype(ml_dtypes.bfloat16)

    @dataclasses.dataclass(frozen=True)
    class BFloat16(Float16):
        # Same 2-byte layout and JSON fill-value rules as float16; only the numpy dtype differs.
        dtype_cls = type(bf16)
        _zarr_v3_name = "bfloat16"
        _zarr_v2_names = ()

        def to_native_dtype(self):
            return bf16

    data_type_registry.register("bfloat16", BFloat16)
