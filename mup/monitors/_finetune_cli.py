"""Command line of the finetuned baseline: `finetune` (train a checkpoint) and `score` (write
score files with it).

finetune --model smollm2-135m --train training --out runs/ft [--lora-rank 8 | --full] ...
score --checkpoint runs/ft --dataset dev/anthropic --dataset dev/mt --out runs/scores

`add_parsers(subparsers)` adds both subcommands to any argparse subparsers object and `run(args)`
executes a parsed one; `mup baselines` (mup.monitors._cli) is where they are wired.

Data: ``--train`` / ``--val`` / ``--dataset`` take a name of `mup.data.find_dataset` (``training``,
``dev/mt``, ...) or a .jsonl/.csv path. A file with a ``split`` field gives ``--train-split``
(default ``train``) for training; validation defaults to the same file's ``test`` split, or to
the whole ``--val`` file when one is named.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from mup._cli_args import config_from_args

log = logging.getLogger("mup.monitors.finetune")

COMMANDS = ("finetune", "score")


def add_parsers(subparsers) -> None:
    """Add the `finetune` and `score` subcommands to an argparse subparsers object."""
    ft = subparsers.add_parser(
        "finetune",
        help="finetune the LLM as a high-stakes classifier (LoRA or full)",
        description="Finetune an LLM with a 2-way head on its last token's final hidden state.",
    )
    ft.set_defaults(finetune_command="finetune")
    ft.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    ft.add_argument("--train", default="training", help="data set name or path (default training)")
    ft.add_argument(
        "--train-split",
        default=None,
        help="split of --train to use (default: 'train' when the file has a split field)",
    )
    ft.add_argument(
        "--val",
        default=None,
        help="validation set name or path (default: the test split of --train); 'none' = no "
        "validation and no early stopping",
    )
    ft.add_argument("--val-split", default=None, help="split of --val to use")
    ft.add_argument("--out", required=True, help="checkpoint directory")
    ft.add_argument("--data", default=None, help="data root for named sets (default: search)")
    group = ft.add_mutually_exclusive_group()
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank R (default 8)")
    group.add_argument("--full", action="store_true", help="full finetuning instead of LoRA")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * R)")
    ft.add_argument(
        "--lora-targets",
        default="q,v",
        help="comma-separated modules to adapt among q,k,v,o,gate,up,down (default q,v)",
    )
    ft.add_argument("--max-records", type=int, default=None, help="cap on train records")
    ft.add_argument("--max-val-records", type=int, default=None, help="cap on val records")
    ft.add_argument("--max-tokens", type=int, default=512, help="tokens kept per record (end)")
    ft.add_argument("--epochs", type=int, default=1)
    ft.add_argument("--lr", type=float, default=None, help="peak lr (default 2e-4 LoRA, 2e-5 full)")
    ft.add_argument("--weight-decay", type=float, default=0.01)
    ft.add_argument("--warmup-ratio", type=float, default=0.06)
    ft.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    ft.add_argument("--eval-batch-size", type=int, default=16)
    ft.add_argument("--eval-every", type=int, default=None, help="steps (default: per epoch)")
    ft.add_argument("--patience", type=int, default=3, help="evaluations without improvement")
    ft.add_argument("--min-bucket", type=int, default=32, help="shortest padded length")
    ft.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (bfloat16 is faster on accelerators; float32 is exact)",
    )
    ft.add_argument("--seed", type=int, default=0)
    state = ft.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue an interrupted run")
    state.add_argument("--overwrite", action="store_true", help="replace a checkpoint in --out")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")

    sc = subparsers.add_parser(
        "score",
        help="score data sets with a finetuned checkpoint (writes score files)",
        description="Write one score file per data set with a finetuned checkpoint.",
    )
    sc.set_defaults(finetune_command="score")
    sc.add_argument("--checkpoint", required=True, help="a `finetune` output directory")
    sc.add_argument(
        "--dataset", action="append", required=True, help="name or path; repeat for several"
    )
    sc.add_argument("--out", required=True, help="directory for the score files")
    sc.add_argument("--data", default=None, help="data root for named sets")
    sc.add_argument("--split", default=None, help="score only this split of each data set")
    sc.add_argument("--max-records", type=int, default=None, help="cap per data set (seeded)")
    sc.add_argument(
        "--limit",
        type=int,
        default=None,
        help="the first N records of each set, as every other command's --limit (so that "
        "score files of different monitors cover the same records)",
    )
    sc.add_argument("--batch-size", type=int, default=None)
    sc.add_argument("--model", default=None, help="base model spec, if it moved since training")
    sc.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    sc.add_argument("--seed", type=int, default=0, help="seed of --max-records sampling")
    sc.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `finetune` or `score` command; returns the exit status."""
    from mup import _compile_cache

    command = getattr(args, "finetune_command", None)
    if command not in COMMANDS:
        raise ValueError(f"run: not a finetune/score namespace (finetune_command={command!r})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _compile_cache.enable()
    prog = f"mup baselines {command}"
    try:
        return _finetune(args) if command == "finetune" else _score(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


# ---- data ------------------------------------------------------------------------------------


def _load(name_or_path: str, data_root: str | None):
    """(records, display name) of a named set or a file; ambiguous records dropped."""
    from mup.data import dataset_names, find_dataset, load_records

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load_records(path, binary=True), path.stem
    if name_or_path not in dataset_names():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a file nor a data set name ({', '.join(dataset_names())})"
        )
    return load_records(find_dataset(name_or_path, data_root), binary=True), name_or_path


def _split(dataset, split: str | None, default: str | None):
    """The chosen split; the default split only when the file has split fields."""
    if split is not None:
        return dataset.split(split)
    if default is not None and dataset.splits():
        return dataset.split(default)
    return dataset


def _cap(records, n: int | None, seed: int):
    """At most n records, a seeded random subset in file order (balanced files stay ~balanced)."""
    from mup.data import Dataset

    if n is not None and n < 1:
        raise ValueError(f"--max-records must be >= 1, got {n}")
    if n is None or n >= len(records):
        return records
    keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:n])
    # Still a Dataset: the checkpoint metadata records which file the subset came from.
    return Dataset([records[int(i)] for i in keep], path=records.path, sha256=records.sha256)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# ---- commands --------------------------------------------------------------------------------


def _finetune(args) -> int:
    from mup.models import load_model
    from mup.monitors._finetune import FinetuneConfig, check_training_data, finetune
    from mup.monitors._lora import LoraConfig

    lora = None
    if not args.full:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        alpha = 2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha
        lora = LoraConfig(rank=args.lora_rank, alpha=alpha, targets=targets)
    cfg = config_from_args(FinetuneConfig, args, lora=lora)
    # Every data problem is reported before the model loads.
    train_all, train_name = _load(args.train, args.data)
    train = _cap(_split(train_all, args.train_split, "train"), args.max_records, args.seed)
    if args.val is not None and args.val.lower() == "none":
        val = None
    elif args.val is None:
        if not train_all.splits():
            raise ValueError(
                f"{train_name} has no split field to take a validation split from; pass --val "
                "NAME|PATH or --val none"
            )
        val = _split(train_all, args.val_split, "test")
    else:
        val = _split(_load(args.val, args.data)[0], args.val_split, None)
    if val is not None:
        val = _cap(val, args.max_val_records, args.seed + 1)
    check_training_data(train, val)

    t0 = time.perf_counter()
    model = load_model(args.model)
    log.info("loaded %s in %.1fs", model.spec.name, time.perf_counter() - t0)
    result = finetune(
        model,
        train,
        val,
        args.out,
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = {
        "checkpoint": str(result.checkpoint),
        "best_val_auroc": result.best_val_auroc,
        "best_step": result.best_step,
        "steps": result.steps,
        "total_steps": result.total_steps,
        "stopped_early": result.stopped_early,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "n_truncated": result.n_truncated,
        "train_seconds": round(result.train_seconds, 1),
        "eval_seconds": round(result.eval_seconds, 1),
        "wall_seconds": round(result.wall_seconds, 1),
        "records_per_s": round(result.records_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0


def _score(args) -> int:
    from mup import metrics
    from mup.data import Dataset
    from mup.models import load_model
    from mup.monitors._finetune import load_finetuned, score_records

    # Data first: a missing set is reported before the base model loads.
    sets = []
    for name in args.dataset:
        dataset, display = _load(name, args.data)
        chosen = _cap(_split(dataset, args.split, None), args.max_records, args.seed)
        if args.limit is not None:
            if args.limit < 1:
                raise ValueError(f"--limit must be >= 1, got {args.limit}")
            chosen = Dataset(list(chosen)[: args.limit], path=chosen.path, sha256=chosen.sha256)
        sets.append((display, chosen))
    model = None if args.model is None else load_model(args.model)
    ft = load_finetuned(args.checkpoint, model=model, dtype=args.dtype)
    out = Path(args.out)
    report = {}
    for display, records in sets:
        t0 = time.perf_counter()
        path = out / f"{_slug(ft.monitor)}__{_slug(display)}.jsonl"
        probs = score_records(ft, records, dataset=display, out=path, progress=not args.no_progress)
        labels = np.array([r.label if r.label in (0, 1) else -1 for r in records])
        seconds = round(time.perf_counter() - t0, 1)
        entry = {"file": str(path), "n": len(records), "seconds": seconds}
        if len(set(labels[labels >= 0].tolist())) == 2:
            entry["auroc"] = metrics.auroc(probs[labels >= 0], labels[labels >= 0])
        report[display] = entry
        print(f"{display}: {json.dumps(entry)}", flush=True)
    return 0
