"""The device side of an extraction: padded batch shapes and the jitted capture program.

Axis letters: B rows in a batch, P padded length, D model width.

Batches come from geometric length buckets (P) and a small set of row counts (B), so XLA compiles
few programs; each batch runs one jitted forward that stops at the deepest requested layer.
"""

from __future__ import annotations

import numpy as np

from mup import native

# Smallest padded length: shorter rows share one program.
MIN_BUCKET = 32
# Padded lengths grow by this factor (rounded to multiples of 8). Growth 2 pads a uniform length
# mix by ~33% on average, 1.5 by ~20%, for a few more programs, each compiled once: a compile
# costs far less than the padding it saves over a run (benchmarks/bench_extract.py).
BUCKET_GROWTH = 1.5


def _row_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 * 2^(k-1)) that is >= n."""
    power = 1
    while power * 2 < n:
        power *= 2
    # n lies in (power, 2 * power]; at most a third of the rounded batch is padding rows.
    if n <= power:
        return power
    return power * 3 // 2 if power >= 2 and n <= power * 3 // 2 else power * 2


class BatchPlanner:
    """Padded batches from ragged token ids: B rows x P tokens from two small sets of sizes.

    P comes from geometric length buckets; B is the batch's row count rounded up to the next
    of m * (1, 2, 3, 4, 6, 8, 12, ...) (m = the mesh's data-parallel width), capped at the
    full batch `rows_for(P)`. Rounding a part-filled batch up to the full one instead computed
    up to 8192 padded tokens for a handful of rows (4x the real tokens on the mini set).
    """

    def __init__(self, batch_tokens: int, max_len: int, row_multiple: int):
        self.buckets = native.length_buckets(
            max(max_len, 1), min_len=MIN_BUCKET, growth=BUCKET_GROWTH
        )
        self.batch_tokens = batch_tokens
        self.row_multiple = row_multiple

    def rows_for(self, padded_len: int) -> int:
        """Rows of a full batch of padded length P (a multiple of the data-parallel width)."""
        rows = max(1, self.batch_tokens // padded_len)
        return -(-rows // self.row_multiple) * self.row_multiple

    def padded_rows(self, n_rows: int, padded_len: int) -> int:
        """B for a batch of `n_rows` real rows: the next row bucket, at most the full batch."""
        full = self.rows_for(padded_len)
        units = -(-n_rows // self.row_multiple)  # rows in units of the data-parallel width
        return min(_row_bucket(units) * self.row_multiple, full)

    def plan(self, lengths: np.ndarray) -> list[native.Batch]:
        return native.plan_batches(lengths, token_budget=self.batch_tokens, buckets=self.buckets)


class Capture:
    """The jitted capture program: tokens [B, P] -> {layer: [B, P, D]} in the storage dtype."""

    def __init__(
        self, model_config, params, layers: tuple[int, ...], site: str, storage_dtype: str, mesh
    ):
        import jax
        import jax.numpy as jnp

        from mup.models import batch_sharding, forward

        dtype = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}[
            storage_dtype
        ]
        config = model_config

        def capture(params, tokens, valid):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            out = forward(
                params,
                tokens,
                positions,
                config=config,
                valid=valid,
                capture=layers,
                site=site,
                logits=False,
            )
            # Cast on the device: half the bytes to move for float16 storage.
            return {layer: out.hidden[layer].astype(dtype) for layer in layers}

        self._fn = jax.jit(capture)
        self._params = params
        self._sharding = None if mesh is None else batch_sharding(mesh)
        self._jax = jax

    def __call__(self, tokens: np.ndarray, valid: np.ndarray):
        if self._sharding is not None:
            tokens = self._jax.device_put(tokens, self._sharding)
            valid = self._jax.device_put(valid, self._sharding)
        return self._fn(self._params, tokens, valid)  # dispatched asynchronously
