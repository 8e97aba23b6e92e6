"""What one extraction job does: `ExtractConfig`, and its command-line form."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mup extract",
        description="Extract residual-stream activations of a model over chat data sets into "
        "chunked zarr v3 stores (local directory or s3://bucket/prefix).",
    )
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="short name, .gguf file, checkpoint dir or hub id")
    add(
        "--layers",
        default=None,
        help="comma-separated hidden_states indices, e.g. 11 or 11,20 (default: from "
        "configs/models/<model>.yaml)",
    )
    add("--dataset", action="append", required=True, help="jsonl/csv path or glob; repeatable")
    add("--out", required=True, help="output directory or s3://bucket/prefix")
    add(
        "--site",
        choices=("residual", "normed"),
        default="residual",
        help="residual = HF hidden_states[L]; normed = input of block L after its input norm "
        "(the MUP paper's site)",
    )
    add("--mask-mode", choices=MASK_MODES, default="all", help="tokens that probes see")
    add(
        "--max-tokens",
        type=int,
        default=4096,
        help="truncate longer conversations, keeping their END (0 = no limit)",
    )
    add("--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype")
    add("--model-dtype", choices=MODEL_DTYPES, default="float32", help="compute dtype")
    add("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    add("--split", default=None, help="keep records whose `split` field equals this")
    add("--limit", type=int, default=None, help="first N records of each data set only")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an incomplete store")
    mode.add_argument("--overwrite", action="store_true", help="recreate existing stores")
    add("--model-parallel", type=int, default=1, help="devices per model replica")
    add(
        "--s3-retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="times a shard write that failed for a transient reason (endpoint unreachable, "
        "throttled) is retried, after 1, 2, 4 ... 60 s, each retry shown above the progress "
        "bar, before the run fails (default %(default)s: about 5 minutes)",
    )
    add(
        "--coordinator-address",
        default=None,
        help="multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS)",
    )
    add("--num-processes", type=int, default=None, help="multi-host: number of processes")
    add("--process-id", type=int, default=None, help="multi-host: this process's index")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def expand_datasets(patterns: list[str]) -> tuple[str, ...]:
    """Expand globs; a pattern that matches nothing is an error, not an empty job."""
    paths: list[str] = []
    for pattern in patterns:
        if pattern.startswith("s3://"):
            raise ValueError(f"--dataset {pattern}: data sets are read from local files")
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"--dataset {pattern}: no such file")
        paths += matches
    return tuple(dict.fromkeys(paths))


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated integers") from None
    if not layers:
        raise ValueError(f"--layers {text!r}: no layer given")
    return tuple(dict.fromkeys(layers))


def config_from_args(argv: list[str] | None) -> ExtractConfig:
    args = build_parser().parse_args(argv)
    return ExtractConfig(
        model=args.model,
        layers=parse_layers(args.layers),
        datasets=expand_datasets(args.dataset),
        out=args.out,
        site=args.site,
        mask_mode=args.mask_mode,
        max_tokens=args.max_tokens or None,
        dtype=args.dtype,
        model_dtype=args.model_dtype,
        batch_tokens=args.batch_tokens,
        split=args.split,
        limit=args.limit,
        resume=args.resume,
        overwrite=args.overwrite,
        model_parallel=args.model_parallel,
        s3_retries=args.s3_retries,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        progress=not args.no_progress,
    )
