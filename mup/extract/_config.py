"""What one extraction job does: `ExtractConfig`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from mup.store import DEFAULT_RETRIES, STORAGE_DTYPES
from mup.text import MASK_MODES

Site = Literal["residual", "normed"]
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """One extraction job: a model, the layers to keep, data sets in, a store location out."""

    model: str  # model spec: short name, .gguf, checkpoint dir or hub id (see mup.resolve_spec)
    layers: tuple[int, ...] | None  # HF hidden_states indices; None = the model's config default
    datasets: tuple[str, ...]  # jsonl / csv paths (globs already expanded)
    out: str  # local directory or s3://bucket/prefix; one store per (model, dataset, site)
    site: Site = "residual"  # residual stream entering block L, or its input-normed version
    mask_mode: str = "all"  # which tokens probes see (stored as a mask; every token is kept)
    max_tokens: int | None = 4096  # longer conversations keep their last max_tokens tokens
    dtype: str = "float16"  # storage dtype of the activations
    model_dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    batch_tokens: int = 8192  # padded tokens per forward pass, summed over the batch
    split: str | None = None  # keep only records whose `split` field equals this
    limit: int | None = None  # keep only the first `limit` records of each data set
    resume: bool = False  # continue an incomplete store
    overwrite: bool = False  # delete and recreate existing stores
    model_parallel: int = 1  # devices sharing one model replica; the rest split the batch
    s3_retries: int = DEFAULT_RETRIES  # transient shard-write failures retried before failing
    coordinator_address: str | None = None  # multi-host: host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.site not in ("residual", "normed"):
            raise ValueError(f"site must be 'residual' or 'normed', got {self.site!r}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.s3_retries < 0:
            raise ValueError(f"s3_retries must be >= 0, got {self.s3_retries}")
        if self.batch_tokens < 16:
            raise ValueError(f"batch_tokens must be >= 16, got {self.batch_tokens}")
        if not self.datasets:
            raise ValueError("at least one --dataset is needed")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be non-negative ints, got {self.layers}")
