"""`mup steering` (also `python -m mup.steering`): build steering vectors.

  vector      difference of means, from a labelled store (--store URL) or from paired prompts
              (--pairs FILE --model SPEC, --method mean|last|pca)
  train-bipo  BiPO training on preference pairs; one vector file per epoch + metrics.jsonl

--layer L is always the block whose output the vector is added to; the vector is measured at
hidden_states[L + 1] (store layer L + 1).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mup import _compile_cache
from mup.steering._pairs import bundled_pairs_path, load_pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mup steering", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("vector", help="difference-of-means vector (store or paired prompts)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="activation store URL (local dir or s3://) with labels")
    src.add_argument("--pairs", help="pairs jsonl ('bundled' = the set shipped with mup)")
    v.add_argument("--layer", type=int, required=True, help="steered block L (reads L + 1)")
    v.add_argument("--out", required=True, help="output .safetensors or .npy")
    v.add_argument("--model", default="smollm2-135m", help="model spec (with --pairs)")
    v.add_argument("--method", choices=("mean", "last", "pca"), default="mean")
    v.add_argument("--split", choices=("train", "test", "all"), default="all", help="pairs split")
    v.add_argument("--batch-size", type=int, default=16, help="rows per forward (with --pairs)")
    v.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("train-bipo", help="train a BiPO vector on preference pairs")
    b.add_argument("--model", default="smollm2-135m", help="model spec")
    b.add_argument("--layer", type=int, required=True, help="steered block L")
    b.add_argument("--pairs", default="bundled", help="pairs jsonl with train/test splits")
    b.add_argument("--epochs", type=int, default=10)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    b.add_argument("--lr", type=float, default=5e-4)
    b.add_argument("--beta", type=float, default=0.1)
    b.add_argument("--weight-decay", type=float, default=0.05)
    b.add_argument("--warmup-ratio", type=float, default=0.1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit-train", type=int, default=None, help="use the first N train pairs")
    b.add_argument("--limit-test", type=int, default=None, help="use the first N test pairs")
    b.add_argument("--no-progress", action="store_true")
    return p


def _pairs_path(arg: str):
    return bundled_pairs_path() if arg == "bundled" else arg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _compile_cache.enable()
    try:
        if args.command == "vector":
            return _vector(args)
        return _train(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _vector(args) -> int:
    from mup.steering._dom import dom_from_pairs, dom_from_store
    from mup.steering._vector import save_vector

    if args.store is not None:
        res = dom_from_store(args.store, args.layer)
    else:
        from mup.models import load_model

        split = None if args.split == "all" else args.split
        pairs = load_pairs(_pairs_path(args.pairs), split=split)
        model = load_model(args.model)
        res = dom_from_pairs(
            model,
            pairs,
            args.layer,
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
    from mup.steering._bipo import BiPOConfig, train_bipo

    config = BiPOConfig(
        layer=args.layer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        beta=args.beta,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
    )
    path = _pairs_path(args.pairs)
    train = load_pairs(path, split="train")[: args.limit_train]
    test = load_pairs(path, split="test")[: args.limit_test]
    if not train:
        raise ValueError(f"{path}: no pairs with split 'train'")
    model = load_model(args.model)
    print(f"BiPO on {model.spec.name}, layer {args.layer}: {len(train)} train, {len(test)} test")
    res = train_bipo(
        model, train, config, eval_pairs=test, out_dir=args.out, progress=not args.no_progress
    )
    last = res.history[-1]
    print(
        f"done: {len(res.files)} vector files in {args.out}; final norm {last['norm']:.4g}, "
        f"train margin {last['train_margin']:+.3f}"
        + (f", held-out margin {last['test_margin']:+.3f}" if "test_margin" in last else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
