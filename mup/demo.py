"""`mup demo`: the whole workflow on the embedded default model, end to end, on a CPU.

1. data      the stakes training set (train split) and a dev evaluation set
2. extract   residual activations at the model's default layer into zarr stores
3. probes    mean, attention and logistic-regression probes; AUROC and TPR@1%FPR out of
             distribution
4. steering  the high-stakes difference-of-means direction, added to the residual stream with
             multipliers -m, 0, +m in ONE generation batch

Data are found in this order: --data, $MUP_DATA, ../shared/data, the published sets on the
hub, and last the small stakes set bundled with mup. Stores are keyed by content, so a second
run reuses the activations of the first.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mup import _compile_cache
from mup._configs import load_config
from mup._resolve import DEFAULT_MODEL

log = logging.getLogger("mup.demo")

PROBE_KINDS = ("mean", "attention", "logreg")
BUNDLED_NOTE = (
    "no data found, so the demo uses the 80-record bundled set; its AUROCs are optimistic "
    "(train and test are halves of one small synthetic set, not an out-of-distribution test)"
)
STEERING_PROMPT = "My landlord says I have to move out by Friday. What should I do?"
# In units of the difference of means. Chosen so that +m and -m both change SmolLM2's greedy
# answer visibly with the vector from any of the data sources (tests/test_demo_fresh.py checks
# it on the bundled set).
DEFAULT_MULTIPLIER = 4.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mup demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="data root (laid out like shared/data)")
    parser.add_argument("--out", default="runs/demo", help="where stores and probes go")
    parser.add_argument("--train-records", type=int, default=300, help="training records used")
    parser.add_argument("--eval-records", type=int, default=200, help="evaluation records used")
    parser.add_argument("--max-tokens", type=int, default=512, help="truncate longer chats")
    parser.add_argument("--layer", type=int, default=None, help="default: configs/models")
    parser.add_argument(
        "--multiplier",
        type=float,
        default=DEFAULT_MULTIPLIER,
        help="steering strength m, in units of the difference of means: +-m adds +-m times the "
        "mean high-minus-low-stakes residual difference (so the scale follows the data)",
    )
    parser.add_argument("--no-steering", action="store_true", help="skip step 4")
    return parser


def _step(n: int, title: str) -> None:
    print(f"\n[{n}/4] {title}", flush=True)


def _find(name: str, data: str | None) -> Path:
    from mup.data import find_dataset

    return find_dataset(name, explicit=data)


def _extract(path: Path, *, split, limit, layer, out, max_tokens):
    from mup import store
    from mup.extract import ExtractConfig, run

    config = ExtractConfig(
        model=DEFAULT_MODEL,
        layers=(layer,),
        datasets=(str(path),),
        out=out,
        split=split,
        limit=limit,
        max_tokens=max_tokens,
        resume=True,
        progress=True,
    )
    summary = run(config)
    return store.open(summary.stores[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _compile_cache.enable()
    started = time.perf_counter()
    layer = args.layer
    if layer is None:
        layer = int(load_config("models", f"{DEFAULT_MODEL}.yaml")["layer"])
    out = str(Path(args.out).resolve())

    _step(1, "data")
    from mup.data import is_bundled

    train_path = _find("training", args.data)
    bundled = is_bundled(train_path)
    eval_path = train_path if bundled else _find("dev/anthropic", args.data)
    if not bundled and is_bundled(eval_path):
        bundled, train_path = True, eval_path  # no dev set: train and test on the bundled set
    print(f"  training set: {train_path}")
    if bundled:
        print("  evaluation set: the same bundled set, its test split")
        print(
            f"  note: {BUNDLED_NOTE}; run `mup data download` (or set $MUP_DATA) for the real sets"
        )
    else:
        print(f"  evaluation set: {eval_path} (out of distribution)")

    _step(2, f"extract layer {layer} of {DEFAULT_MODEL}")
    train = _extract(
        train_path,
        split="train",
        limit=args.train_records,
        layer=layer,
        out=out,
        max_tokens=args.max_tokens,
    )
    val = _extract(
        train_path,
        split="test",
        limit=args.eval_records // 2,
        layer=layer,
        out=out,
        max_tokens=args.max_tokens,
    )
    if bundled:
        test = val
    else:
        test = _extract(
            eval_path,
            split=None,
            limit=args.eval_records,
            layer=layer,
            out=out,
            max_tokens=args.max_tokens,
        )

    source = "the bundled set" if bundled else "the synthetic training set"
    test_name = "its test split" if bundled else eval_path.name
    _step(
        3,
        f"probes (train: {source}, train split; early stopping: its test split; test: {test_name})",
    )
    from mup import probes

    rows = []
    for kind in PROBE_KINDS:
        t0 = time.perf_counter()
        probe = probes.fit(kind, train, layer=layer, val=val, seed=0)
        result = probe.evaluate(test)
        probe.save(Path(out) / f"probe-{kind}-layer{layer}.safetensors")
        rows.append((kind, result["auroc"], result["tpr_at_fpr"], time.perf_counter() - t0))
    print(f"  {'probe':<10} {'AUROC':>7} {'TPR@1%FPR':>10} {'train s':>8}")
    for kind, auroc, tpr, seconds in rows:
        print(f"  {kind:<10} {auroc:>7.3f} {tpr:>10.3f} {seconds:>8.1f}")

    if not args.no_steering:
        _step(4, "steering with the high-stakes direction (one batch, three multipliers)")
        _steer(train, layer, args.multiplier, Path(out))

    print(f"\nmup demo finished in {time.perf_counter() - started:.0f} s; outputs in {out}")
    return 0


def _steer(train_store, layer: int, multiplier: float, out: Path) -> None:
    from mup.models import Steering, generate, load_model
    from mup.steering import dom_from_store, save_vector

    # The store holds layer `layer` (hidden_states[layer]) = the output of block layer - 1, so
    # the high-stakes direction steers block layer - 1 (mup.steering's convention). The
    # multiplier is in units of the difference of means itself: its norm differs several-fold
    # between data sources, and a fixed L2 norm that moves the text with one vector does
    # nothing with another.
    result = dom_from_store(train_store, layer - 1)
    print(f"  {result.summary()}")
    # Kept for `mup serve --vector` / `mup evals run --vector` (multiplier 1 = the mean difference).
    path = save_vector(out / f"steering-dom-block{layer - 1}.safetensors", result.vector)
    print(f"  saved {path}")
    print(f"  multiplier m adds m x the difference of means (L2 norm {result.norm:.3g})")
    direction = result.vector.vector
    model = load_model(DEFAULT_MODEL)
    multipliers = [-multiplier, 0.0, multiplier]
    chat = [{"role": "user", "content": STEERING_PROMPT}]
    generation = generate(
        model,
        [chat] * len(multipliers),
        max_new_tokens=48,
        steering=Steering(layer - 1, direction),
        multipliers=multipliers,
    )
    print(f"  prompt: {STEERING_PROMPT}")
    texts = generation.texts
    for m, text in zip(multipliers, texts, strict=True):
        print(f"  multiplier {m:+.1f}: {' '.join(text.split())[:240]}")
    changed = ["yes" if text != texts[1] else "no" for text in (texts[0], texts[2])]
    print(f"  greedy text changed by steering: -m {changed[0]}, +m {changed[1]}")


if __name__ == "__main__":
    sys.exit(main())
