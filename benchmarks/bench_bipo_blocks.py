"""BiPO block sweep: one `train_bipo_blocks` call vs one `train_bipo` run per steered block.

The steering study trains one BiPO vector per block as separate jobs (its "layers" 9..41 on a
70B model). What a user would do with mup without the sweep is a loop of `train_bipo` calls:
each encodes the pairs, runs the reference pass and compiles its own step and evaluation
programs. `train_bipo_blocks` shares all of that (one compiled step for every block, the block
being a one-hot input). Both paths train identical vectors (checked here); the benchmark prints
wall time of each and the ratio loop / sweep. Compile time is the bulk on small runs, so the
ratio grows with the number of blocks and shrinks with epochs and pairs.

    python benchmarks/bench_bipo_blocks.py            # SmolLM2-135M, 4 blocks, 16 pairs, 2 epochs
    python benchmarks/bench_bipo_blocks.py --quick    # 2 blocks, 4 pairs, 1 epoch

No persistent compile cache is enabled (it would make the second path look faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--blocks",
        "--layers",
        dest="blocks",
        default=None,
        help="comma-separated (default 6,9,12,15)",
    )
    args = parser.parse_args()
    blocks = [int(x) for x in (args.blocks or ("9,12" if args.quick else "6,9,12,15")).split(",")]
    n_train, epochs = (4, 1) if args.quick else (16, 2)

    import jax

    from mup.models import load_model
    from mup.steering import (
        BiPOConfig,
        bundled_pairs_path,
        load_pairs,
        train_bipo,
        train_bipo_blocks,
    )

    model = load_model(args.model)
    pairs = load_pairs(bundled_pairs_path(), split="train")[:n_train]
    test = load_pairs(bundled_pairs_path(), split="test")[:4]
    config = BiPOConfig(block=blocks[0], epochs=epochs, batch_size=4, warmup_steps=1)
    print(
        f"{model.spec.name} on {jax.default_backend()}: steered blocks {blocks}, {len(pairs)} "
        f"train + {len(test)} test pairs, {epochs} epoch(s), batch 4"
    )

    start = time.perf_counter()
    swept = train_bipo_blocks(model, pairs, config, blocks, eval_pairs=test, progress=False)
    t_sweep = time.perf_counter() - start

    start = time.perf_counter()
    loop = {}
    for block in blocks:
        cfg = dataclasses.replace(config, block=block)
        loop[block] = train_bipo(model, pairs, cfg, eval_pairs=test, progress=False)
    t_loop = time.perf_counter() - start

    worst = max(
        float(np.max(np.abs(swept[x].vector.vector - loop[x].vector.vector))) for x in blocks
    )
    print(f"  sweep (train_bipo_blocks): {t_sweep:8.1f} s")
    print(f"  loop of train_bipo:        {t_loop:8.1f} s")
    print(f"  ratio loop / sweep:        {t_loop / t_sweep:8.2f}x")
    print(f"  max |vector difference|:   {worst:.2e}")


if __name__ == "__main__":
    main()
