"""Pooling and padded batching over ragged activations (C++ core with a numpy fallback).

Ragged layout: N sequences of T tokens in total are acts [T, D] plus offsets int64 [N+1];
sequence i is acts[offsets[i]:offsets[i+1]]. The compiled `mup._native` runs the kernels
(float32 accumulation, GIL released, threads across sequences); without it, or for a dtype
it does not handle, the numpy reference in `mup.native._reference` gives the same results.
"""

# Pooling of ragged sequences to one vector each.
from mup.native._pooling import POOL_METHODS, pool, pool_many

# Padded batches: plan them, gather rows into a block, scatter a block back.
from mup.native._batching import (  # isort: skip
    Batch,
    gather_padded,
    length_buckets,
    plan_batches,
    scatter_padded,
)

# Which implementation runs.
from mup.native._backend import backend, native_available, use_backend  # isort: skip

__all__ = [
    "POOL_METHODS",
    "Batch",
    "backend",
    "gather_padded",
    "length_buckets",
    "native_available",
    "plan_batches",
    "pool",
    "pool_many",
    "scatter_padded",
    "use_backend",
]
