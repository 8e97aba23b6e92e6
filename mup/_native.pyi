"""Type stub of the compiled extension (csrc/module.cpp); use it through `mup.native`.

Axis letters: T tokens, N sequences, D width, B batch rows, P padded length, M batches.
`kind` names how acts are stored: "float32" (float32 array) or "float16" / "bfloat16"
(uint16 bit patterns). Inputs are validated by `mup.native`; the checks here only keep
direct calls memory-safe.
"""

import numpy as np
import numpy.typing as npt

def pool(
    acts: npt.NDArray[np.float32] | npt.NDArray[np.uint16],  # [T, D], unit stride along D
    kind: str,
    offsets: npt.NDArray[np.int64],  # [N+1]
    mask: npt.NDArray[np.uint8] | None,  # [T]
    scores: npt.NDArray[np.float32] | None,  # [T], for "softmax"
    methods: list[str],
    temperature: float,
    window: int,
    num_threads: int,
) -> list[npt.NDArray[np.float32]]:  # one [N, D] per method
    ...
def gather_padded(
    acts: npt.NDArray[np.float32] | npt.NDArray[np.uint16],  # [T, D]
    kind: str,
    offsets: npt.NDArray[np.int64],  # [N+1]
    rows: npt.NDArray[np.int64],  # [B]
    padded_len: int,
    mask: npt.NDArray[np.uint8] | None,  # [T]
    out_kind: str,  # == kind or "float32"
    num_threads: int,
) -> tuple[npt.NDArray[np.float32] | npt.NDArray[np.uint16], npt.NDArray[np.uint8]]:
    """(block [B, P, D], block_mask [B, P])."""
    ...

def scatter_padded(
    block: npt.NDArray[np.float32] | npt.NDArray[np.uint16],  # [B, P, D], C-contiguous
    block_kind: str,
    offsets: npt.NDArray[np.int64],  # [N+1]
    rows: npt.NDArray[np.int64],  # [B]
    out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],  # [T, D], written in place
    out_kind: str,  # == block_kind or "float32"
    num_threads: int,
) -> None: ...
def plan_batches(
    lengths: npt.NDArray[np.int64],  # [N]
    order: npt.NDArray[np.int64],  # [N], the order rows are visited in
    buckets: npt.NDArray[np.int64],  # [K], increasing
    token_budget: int,
    max_rows: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(rows [N], starts [M+1], padded_len [M])."""
    ...

def default_num_threads() -> int: ...
