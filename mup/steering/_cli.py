"""`mup steering` (also `python -m mup.steering`): build steering vectors.

  vector      difference of means, from a labelled store (--store URL) or from paired prompts
              (--pairs FILE --model SPEC, --method mean|last|pca)
  train-bipo  BiPO training on preference pairs; one vector file per epoch + metrics.jsonl;
              --blocks 5,10,15 trains one vector per block (OUT/block_L/ + OUT/summary.json)
  import      a torch .pt vector (the BiPO study's vec_ep{E}_layer{L}.pt) -> .safetensors,
              read without torch
  sweep       generate across multipliers: perplexity, propensity, coherent range, summaries
  judge       LLM judge ratings (and pairwise win rates vs m=0) of a sweep's answers

--block L is always the block whose output the vector is added to; the vector is measured at
layer L + 1, hidden_states[L + 1] (store layer L + 1). --layer / --layers are the old names of
--block / --blocks and still work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mup import _compile_cache
from mup.steering import _import
from mup.steering._bipo import LR_SCHEDULES
from mup.steering._judge_cli import add_parser as add_judge_parser
from mup.steering._judge_cli import run as run_judge
from mup.steering._pairs import bundled_pairs_path, load_pairs

BLOCK_HELP = "steered block L: the vector is added to its output (--layer is the old name)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mup steering", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("vector", help="difference-of-means vector (store or paired prompts)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="activation store URL (local dir or s3://) with labels")
    src.add_argument("--pairs", help="pairs jsonl ('bundled' = the set shipped with mup)")
    v.add_argument(
        "--block",
        "--layer",
        dest="block",
        type=int,
        required=True,
        help=BLOCK_HELP + "; reads layer L + 1",
    )
    v.add_argument("--out", required=True, help="output .safetensors or .npy")
    v.add_argument("--model", default="smollm2-135m", help="model spec (with --pairs)")
    v.add_argument("--method", choices=("mean", "last", "pca"), default="mean")
    v.add_argument("--split", choices=("train", "test", "all"), default="all", help="pairs split")
    v.add_argument("--batch-size", type=int, default=16, help="rows per forward (with --pairs)")
    v.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("train-bipo", help="train BiPO vectors on preference pairs")
    b.add_argument("--model", default="smollm2-135m", help="model spec")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--block", "--layer", dest="block", type=int, help=BLOCK_HELP + "; files in OUT/"
    )
    where.add_argument(
        "--blocks",
        "--layers",
        dest="blocks",
        type=_block_list,
        help="comma-separated blocks, e.g. 5,10,15 or 9-41 (one vector per block in "
        "OUT/block_L/; --layers is the old name)",
    )
    b.add_argument(
        "--pairs",
        default="bundled",
        help="pairs file: mup jsonl, or the study's prompt_arr/chosen_arr/rejected_arr jsonl "
        "or JSON arrays",
    )
    split = b.add_mutually_exclusive_group()
    split.add_argument("--test-pairs", help="held-out pairs file (then all of --pairs trains)")
    split.add_argument(
        "--test-fraction",
        type=float,
        help="hold out this share of a --pairs file that declares no split (seed --split-seed)",
    )
    b.add_argument("--split-seed", type=int, default=0, help="seed of --test-fraction")
    b.add_argument("--epochs", type=int, default=10)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    b.add_argument("--lr", type=float, default=5e-4)
    b.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine", help="after warmup")
    b.add_argument("--beta", type=float, default=0.1)
    b.add_argument("--weight-decay", type=float, default=0.05)
    warm = b.add_mutually_exclusive_group()
    warm.add_argument("--warmup-ratio", type=float, help="share of steps in warmup (default 0.1)")
    warm.add_argument("--warmup-steps", type=int, help="warmup steps (the study used 100)")
    b.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="truncate longer pairs: prompt start first, then response end (default 2048)",
    )
    b.add_argument(
        "--system-prompt",
        help="system message before every pair's prompt: the text, or a file holding it",
    )
    b.add_argument(
        "--score-end-of-turn",
        action="store_true",
        help="also score the end-of-turn token after each response (as TRL scores its EOS)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit-train", type=int, default=None, help="use the first N train pairs")
    b.add_argument("--limit-test", type=int, default=None, help="use the first N test pairs")
    b.add_argument("--no-progress", action="store_true")

    _import.add_parser(sub)
    from mup.steering._sweep_cli import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    add_judge_parser(sub)
    return p


def _block_list(text: str) -> list[int]:
    """ "5,10,15" or "9-41" (inclusive) or a mix -> sorted unique block indices."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--blocks: {part!r} is not a block or a range lo-hi"
            ) from None
    if any(x < 0 for x in out):
        raise argparse.ArgumentTypeError("--blocks: blocks must be >= 0")
    return sorted(set(out))


def _pairs_path(arg: str):
    return bundled_pairs_path() if arg == "bundled" else arg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "judge":
        return run_judge(args)  # its own logging and errors; no JAX
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _compile_cache.enable()
    try:
        if args.command == "vector":
            return _vector(args)
        if args.command == "import":
            return _import.run(args)
        if args.command == "sweep":
            from mup.steering._sweep_cli import run as run_sweep

            return run_sweep(args)
        return _train(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _vector(args) -> int:
    from mup.steering._dom import dom_from_pairs, dom_from_store
    from mup.steering._vector import save_vector

    if args.store is not None:
        res = dom_from_store(args.store, args.block)
    else:
        from mup.models import load_model

        split = None if args.split == "all" else args.split
        pairs = load_pairs(_pairs_path(args.pairs), split=split)
        model = load_model(args.model)
        res = dom_from_pairs(
            model,
            pairs,
            args.block,
            method=args.method,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    path = save_vector(args.out, res.vector)
    print(res.summary())
    print(f"wrote {path}")
    return 0


def _train(args) -> int:
    from mup.models import load_model
    from mup.steering._bipo import BiPOConfig, train_bipo, train_bipo_blocks

    blocks = args.blocks if args.blocks is not None else [args.block]
    config = BiPOConfig(
        block=blocks[0],
        epochs=args.epochs,
        batch_size=args.batch_size,
        beta=args.beta,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
        max_tokens=args.max_tokens,
        system_prompt=_system_prompt(args.system_prompt),
        score_end_of_turn=args.score_end_of_turn,
    )
    train, test = _train_test(args)
    if not train:
        raise ValueError(f"{args.pairs}: no pairs with split 'train'")
    model = load_model(args.model)
    for block in blocks:  # before any work: a typo in --blocks should not cost a run
        if block >= model.config.n_layers:
            raise ValueError(
                f"block {block} is out of range: {model.spec.name} has {model.config.n_layers} "
                f"blocks (0..{model.config.n_layers - 1})"
            )
    print(
        f"BiPO on {model.spec.name}, steered block{'s' if len(blocks) > 1 else ''} "
        f"{','.join(map(str, blocks))}: {len(train)} train, {len(test)} test"
    )
    progress = not args.no_progress
    if args.blocks is None:
        res = train_bipo(model, train, config, eval_pairs=test, out_dir=args.out, progress=progress)
        last = res.history[-1]
        print(
            f"done: {len(res.files)} vector files in {args.out}; final norm {last['norm']:.4g}, "
            f"train margin {last['train_margin']:+.3f}"
            + (f", held-out margin {last['test_margin']:+.3f}" if "test_margin" in last else "")
        )
        return 0
    train_bipo_blocks(
        model, train, config, blocks, eval_pairs=test, out_dir=args.out, progress=progress
    )
    print(f"done: {len(blocks)} blocks x {args.epochs} epochs in {args.out}/block_L/")
    print(f"{'block':>5} {'norm':>9} {'train margin':>13} {'held-out margin':>16}")
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    for row in summary["blocks"]:
        held = f"{row['test_margin']:+16.3f}" if "test_margin" in row else f"{'-':>16}"
        print(f"{row['block']:>5} {row['norm']:>9.4g} {row['train_margin']:+13.3f} {held}")
    print(f"summary: {args.out}/summary.json")
    return 0


def _system_prompt(arg: str | None) -> str | None:
    """--system-prompt: the contents of the file it names, else the text itself."""
    if arg is None:
        return None
    path = Path(arg)
    try:
        is_file = path.is_file()
    except OSError:  # a long text is not a valid path
        is_file = False
    text = path.read_text(encoding="utf-8").rstrip("\n") if is_file else arg
    if not text.strip():
        raise ValueError(f"--system-prompt {'file ' + arg if is_file else 'text'} is empty")
    return text


def _train_test(args):
    path = _pairs_path(args.pairs)
    if args.test_pairs is not None:
        pairs = load_pairs(path)
        if any(p.split == "test" for p in pairs):
            raise ValueError(
                f"{path}: holds pairs with split 'test'; with --test-pairs every pair of "
                "--pairs trains, so drop one of them"
            )
        train, test = pairs, load_pairs(args.test_pairs)
    else:
        kw = {}
        if args.test_fraction is not None:
            kw = dict(test_fraction=args.test_fraction, seed=args.split_seed)
        pairs = load_pairs(path, **kw)
        train = [p for p in pairs if p.split == "train"]
        test = [p for p in pairs if p.split == "test"]
    return train[: args.limit_train], test[: args.limit_test]


if __name__ == "__main__":
    sys.exit(main())
