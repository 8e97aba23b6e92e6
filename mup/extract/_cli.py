"""`mup extract` (== `python -m mup.extract`): the command line of one extraction job."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

from mup import _compile_cache
from mup.extract._config import MODEL_DTYPES, ExtractConfig
from mup.extract._run import run
from mup.store import DEFAULT_RETRIES, STORAGE_DTYPES, StoreError
from mup.text import MASK_MODES


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m mup.extract` and `mup extract`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
        _compile_cache.enable()
        run(config)
    except (StoreError, OSError, ValueError) as error:
        # One clear line, not a traceback, for problems with the user's input or storage
        # (OSError: a missing file, a full disk).
        print(f"mup.extract: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
