"""`mup steering sweep`: generate with a steering vector across multipliers and measure it.

Multipliers are RAW: m adds m x the vector as stored in its file (the steering study's
convention); 0 is always added to the grid (the reference of propensity_delta and of the
coherent range). Writes DIR/sweep.jsonl (one row per answer, resumable), DIR/summary.csv,
DIR/summary.json and DIR/<vector>.png; with --vectors also DIR/best.png and a printed table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP_MULTIPLIERS = (
    "comma list (--multipliers=-4,0,4: use '=' when it starts with '-') or start:stop:step, "
    "stop included ('-20:20:2', the default: the study's 21 values). RAW units: m adds m x the "
    "vector as stored (not scaled by its norm; each row records vector_norm and added_norm). "
    "0 is always added."
)


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "sweep",
        help="generate across multipliers; perplexity, propensity, coherent range",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--model", default="smollm2-135m", help="model spec")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", help="one vector file (.safetensors, or .npy with --block)")
    src.add_argument(
        "--vectors",
        help="a directory: every *.safetensors in it (e.g. one train-bipo block_L/ folder, or "
        "layer_L/ from before the rename)",
    )
    s.add_argument(
        "--block",
        "--layer",
        dest="block",
        type=int,
        default=None,
        help="steered block (overrides the file's; --layer is the old name)",
    )
    s.add_argument("--multipliers", default="-20:20:2", help=HELP_MULTIPLIERS)
    s.add_argument(
        "--pairs",
        default="bundled",
        help="pairs jsonl ('bundled' = the set shipped with mup) or a chat data set jsonl "
        "(no propensity then)",
    )
    s.add_argument("--split", choices=("train", "test", "all"), default="test", help="pairs split")
    s.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument(
        "--batch-size", type=int, default=4, help="prompts per generate call (x the grid = rows)"
    )
    s.add_argument("--coherence-factor", type=float, default=2.0)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--no-progress", action="store_true")
    return s


def _is_pairs_file(path: Path) -> bool:
    import json

    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                return True  # let the pairs loader name the line
            return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj
    return True


def run(args) -> int:
    from mup.steering._pairs import bundled_pairs_path, load_pairs
    from mup.steering._sweep import (
        SweepVector,
        parse_multipliers,
        prompts_from_pairs,
        prompts_from_records,
        run_sweep,
        with_zero,
    )
    from mup.steering._vector import VectorFileError, load_vector

    # Every check that needs no model first.
    grid = with_zero(parse_multipliers(args.multipliers))
    for name, v, lo in (
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if not args.coherence_factor > 1:
        raise ValueError(f"--coherence-factor must be > 1, got {args.coherence_factor}")
    if args.vector is not None:
        files = [Path(args.vector)]
    else:
        d = Path(args.vectors)
        if not d.is_dir():
            raise FileNotFoundError(f"--vectors {d}: not a directory")
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"--vectors {d}: no *.safetensors files")
    vectors = []
    for f in files:
        sv = load_vector(f, block=args.block if f.suffix == ".npy" else None)
        if args.block is not None and args.block != sv.block:
            import dataclasses

            sv = dataclasses.replace(sv, block=args.block)
        vectors.append(SweepVector(name=f.name, vector=sv))
    path = bundled_pairs_path() if args.pairs == "bundled" else Path(args.pairs)
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path}: no such file")
    if _is_pairs_file(path):
        split = None if args.split == "all" else args.split
        pairs = load_pairs(path, split=split)
        if not pairs:
            raise ValueError(f"{path}: no pairs with split {args.split!r}")
        prompts = prompts_from_pairs(pairs[: args.limit])
    else:
        prompts = prompts_from_records(path)[: args.limit]

    from mup.models import load_model

    model = load_model(args.model)
    for v in vectors:
        if v.vector.d_model != model.config.d_model:
            raise VectorFileError(
                f"{v.name}: vector has width {v.vector.d_model}, the model "
                f"{model.spec.name} has d_model={model.config.d_model}"
            )
        if not 0 <= v.vector.block < model.config.n_layers:
            raise ValueError(
                f"{v.name}: steered block {v.vector.block} out of range "
                f"0..{model.config.n_layers - 1}"
            )
    print(
        f"sweep on {model.spec.name}: {len(vectors)} vector(s) x {len(grid)} multipliers x "
        f"{len(prompts)} prompts, {args.max_new_tokens} new tokens"
    )
    rows = run_sweep(
        model,
        vectors,
        prompts,
        grid,
        args.out,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    write_outputs(rows, args.out, coherence_factor=args.coherence_factor, many=len(vectors) > 1)
    return 0


def write_outputs(rows, out_dir, *, coherence_factor: float, many: bool) -> None:
    from mup.steering._sweep import (
        best_vectors,
        format_best,
        plot_best,
        plot_vector,
        summarise,
        write_summary,
    )

    out = Path(out_dir)
    summary = summarise(rows, coherence_factor=coherence_factor)
    best = best_vectors(summary)
    paths = write_summary(summary, best, out)
    for name in sorted({s["vector"] for s in summary}):
        paths.append(plot_vector(summary, name, out / f"{Path(name).stem}.png"))
    if many:
        paths.append(plot_best(best, out / "best.png"))
    print(format_best(best))
    print(f"wrote {out / 'sweep.jsonl'} ({len(rows)} rows), " + ", ".join(p.name for p in paths))
