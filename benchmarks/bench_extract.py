"""End-to-end extraction: `mup.extract` vs the MUP paper's pipeline shape, in one run.

Both sides turn the same stakes records into layer-L activations on disk:

* mup: `mup.extract.run` (chat template + role tokenization, length-bucketed jitted capture that
  stops at layer L, ragged float16 zarr v3 store through tensorstore). Timed wall-clock from the
  call to the return, INCLUDING the GGUF weight load and every XLA compile: what a user waits.
  Run twice: with an empty compilation cache (a first job on a machine) and with the cache
  the first run filled (every later job of this model; `mup extract` keeps it on disk).
* baseline (what a user of HF transformers writes, the paper's code shape): the same weights in
  an HF `LlamaModel` truncated to L blocks (its best case: no LM head, no deeper blocks, torch
  inference mode), `apply_chat_template` per record, padded batches of records sorted
  by length (also its best case), `output_hidden_states=True`, hidden_states[L] cast to float16
  and saved per batch with torch.save, then zstd-compressed (level 3) to disk. The HF model is
  built before its clock starts.

Both sides compute in `--model-dtype` (mup's ``--model-dtype``; the HF model cast to it).

Printed: tokens/s of both and their ratios, cold and warm cache (target >= 1.5x on CPU); bytes
on disk of the mup store vs the dense padded [N, T_max, D] float16 tensor of the same data
(target >= 5x smaller) and vs the baseline's zstd files; the store writer's throughput on these
activations vs the disk's plain write bandwidth (np.tofile + fsync of the same bytes), both
measured here.

usage: python benchmarks/bench_extract.py [--limit 400] [--layer 20] [--max-tokens 4096]
                                          [--model-dtype bfloat16]
       (default: the training set and three dev sets of ../shared/data, ~2100 records)
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import du, plain_write, write_store  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mup"
DATASETS = (
    "training/synthetic_2025-03-25.jsonl",
    "evals/dev/mts_balanced.jsonl",
    "evals/dev/mt_balanced.jsonl",
    "evals/dev/toolace_balanced.jsonl",
)


def run_mup(paths: list[Path], out: Path, args):
    from mup.extract import ExtractConfig, run

    config = ExtractConfig(
        model=args.model,
        layers=(args.layer,),
        datasets=tuple(str(p) for p in paths),
        out=str(out),
        max_tokens=args.max_tokens,
        limit=args.limit,
        batch_tokens=args.batch_tokens,
        model_dtype=args.model_dtype,
        progress=False,
    )
    start = time.perf_counter()
    summary = run(config, out=sys.stderr)
    return time.perf_counter() - start, summary


def build_hf(args):
    """An HF LlamaModel with mup's weights for the model spec, truncated to `args.layer` blocks,
    in `args.model_dtype`."""
    import torch
    from bench_capture import hf_model

    from mup.models import load_model
    from mup.models._checkpoint import read_hf_config

    model = load_model(args.model, dtype="float32")
    base = hf_model(model.config, model.params, args.layer, read_hf_config(model.spec))
    return base.to(getattr(torch, args.model_dtype)), model


def run_hf(base, tokenizer, paths: list[Path], out: Path, args):
    """Tokenize, forward in padded length-sorted batches, save float16 hidden states + zstd."""
    import torch
    import zstandard

    from mup.data import load_records

    start = time.perf_counter()
    conversations = []
    for path in paths:
        records = list(load_records(path))[: args.limit]
        conversations += [[m.as_dict() for m in r.messages] for r in records]
    ids = [
        list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])[
            -args.max_tokens :
        ]
        for c in conversations
    ]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    compressor = zstandard.ZstdCompressor(level=3)
    nbytes = padded_tokens = 0
    batch: list[int] = []
    n_files = 0

    def flush(rows: list[int]) -> None:
        nonlocal nbytes, padded_tokens, n_files
        width = len(ids[rows[-1]])
        tok = torch.zeros((len(rows), width), dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            tok[r, : len(ids[i])] = torch.tensor(ids[i])
            attn[r, : len(ids[i])] = 1
        with torch.inference_mode():
            hidden = base(input_ids=tok, attention_mask=attn, output_hidden_states=True)
        buffer = io.BytesIO()
        torch.save(
            {"acts": hidden.hidden_states[args.layer].half(), "mask": attn.bool(), "rows": rows},
            buffer,
        )
        blob = compressor.compress(buffer.getvalue())
        (out / f"batch_{n_files:05d}.pt.zst").write_bytes(blob)
        nbytes += len(blob)
        padded_tokens += tok.numel()
        n_files += 1

    for i in order:  # batches of at most batch_tokens padded tokens, like mup's budget
        if batch and (len(batch) + 1) * len(ids[i]) > args.batch_tokens:
            flush(batch)
            batch = []
        batch.append(i)
    flush(batch)
    seconds = time.perf_counter() - start
    return seconds, sum(map(len, ids)), max(map(len, ids)), len(ids), nbytes, padded_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="records per data set")
    parser.add_argument(
        "--max-tokens", type=int, default=4096, help="as mup extract (longer chats keep their end)"
    )
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument(
        "--model-dtype", choices=("float32", "bfloat16"), default="float32", help="both sides"
    )
    parser.add_argument("--scratch", default=None, help="directory for the outputs (a tmp dir)")
    args = parser.parse_args()

    paths = [SHARED / rel for rel in DATASETS if (SHARED / rel).is_file()]
    if not paths:
        raise SystemExit(f"no stakes data under {SHARED}; this benchmark needs ../shared/data")
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{args.model}, layer {args.layer}, both sides computing in {args.model_dtype}")
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        scratch = Path(tmp)
        base, model = build_hf(args)
        hf_dir = scratch / "hf"
        hf_dir.mkdir()
        t_hf, hf_tokens, t_max, n, hf_bytes, padded = run_hf(
            base, model.tokenizer, paths, hf_dir, args
        )
        del base
        print(
            f"HF + torch.save + zstd: {n} records, {hf_tokens} tokens ({padded} padded) in "
            f"{t_hf:.1f} s = {hf_tokens / t_hf:.0f} tokens/s",
            flush=True,
        )
        # `mup extract` keeps compiled programs in a persistent cache (mup._compile_cache):
        # the first run on a machine compiles (cold), later runs of the same model and length
        # buckets load them (warm). Both are measured, each into a fresh output directory.
        import os

        from mup import _compile_cache

        os.environ["MUP_CACHE_DIR"] = str(scratch / "cache")
        _compile_cache.enable()
        timings = {}
        for phase in ("cold", "warm"):
            t_mup, summary = run_mup(paths, scratch / f"mup-{phase}", args)
            timings[phase] = t_mup
            print(
                f"mup.extract ({phase} compile cache): {summary.records} records, "
                f"{summary.tokens} tokens in {t_mup:.1f} s = {summary.tokens / t_mup:.0f} "
                "tokens/s (wall, incl. weight load + compiles)",
                flush=True,
            )
        hf_rate = hf_tokens / t_hf
        print(
            f"\ntokens/s ratio mup / HF: cold {summary.tokens / timings['cold'] / hf_rate:.2f}x, "
            f"warm {summary.tokens / timings['warm'] / hf_rate:.2f}x  (target >= 1.5x)"
        )
        store_bytes = du(scratch / "mup-warm")  # every store: all four data sets
        d_model = model.config.d_model
        dense = n * t_max * d_model * 2
        print(
            f"bytes on disk: mup store {store_bytes / 2**20:.1f} MiB; dense padded "
            f"[{n}, {t_max}, {d_model}] float16 {dense / 2**20:.1f} MiB -> "
            f"{dense / store_bytes:.1f}x smaller (target >= 5x); HF zstd files "
            f"{hf_bytes / 2**20:.1f} MiB -> {hf_bytes / store_bytes:.2f}x"
        )

        # The writer alone on these activations vs the disk: is writing ever the bottleneck?
        from mup import store

        parts, offsets = [], [np.zeros(1, np.int64)]
        for url in summary.stores:
            a, o = store.open(url).read_layer(args.layer)
            offsets.append(o[1:] + sum(map(len, parts)))
            parts.append(a)
        acts = {args.layer: np.concatenate(parts)}
        offsets = np.concatenate(offsets)
        t_write = write_store(scratch / "rewrite", offsets, acts)
        t_plain = plain_write(scratch / "plain.bin", acts)
        raw = acts[args.layer].nbytes
        produced = summary.bytes_written / summary.seconds
        print(
            f"store write: {raw / t_write / 1e6:.0f} MB/s vs disk {raw / t_plain / 1e6:.0f} MB/s"
            f" ({t_plain / t_write:.2f}x of plain write bandwidth); extraction produced "
            f"{produced / 1e6:.1f} MB/s, {produced * t_write / raw:.3f} of the writer's capacity"
        )


if __name__ == "__main__":
    main()
