"""`mup steering judge` throughput: ratings/s with many requests in flight (--concurrency 16)
against one at a time (--concurrency 1, what a plain loop over the openai client does), on one
`mup serve` of the embedded default model (SmolLM2-135M-Instruct) as the judge.

    python benchmarks/bench_judge.py            # 64 answers, coherence, max 64 answer tokens
    python benchmarks/bench_judge.py --quick    # 16 answers, max 24 answer tokens

The sweep is synthetic: the bundled mini stakes prompts, each answered with another record's
text (answers of varied length, as a sweep's are). The server first judges the whole load once
untimed at each concurrency (the engine compiles a program per batch shape it meets, and 16
requests in flight meet other shapes than one at a time), then each concurrency judges it into a
fresh output, timed. Ratings from the two runs must agree (temperature 0, same requests): the
largest difference of the expected ratings is printed; the engine's batching may move them
slightly.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _sweep(path: Path, n: int) -> None:
    from mup.data import bundled_path, load_records

    records = list(load_records(bundled_path()))
    rows = []
    for i in range(n):
        prompt, answer = records[i % len(records)], records[(i * 7 + 3) % len(records)]
        rows.append(
            {
                "vector": "bench.safetensors",
                "block": 12,
                "epoch": 0,
                "multiplier": [-1.0, 0.0, 1.0, 2.0][i % 4],
                "prompt_id": f"p{i // 4}",
                "prompt": [m.as_dict() for m in prompt.messages][:1],
                "answer": answer.messages[0].content[:600],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small load")
    p.add_argument("--model", default="smollm2-135m", help="judge model spec for mup serve")
    p.add_argument("--answers", type=int, default=None, help="sweep rows (64; --quick 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="judge answer cap (64; quick 24)")
    args = p.parse_args(argv)
    n = args.answers or (16 if args.quick else 64)
    max_tokens = args.max_tokens or (24 if args.quick else 64)

    from mup.datagen import EndpointConfig, LocalServer, open_endpoint
    from mup.steering._judge import JudgeConfig, judge_sweep, load_rubric, load_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench_judge_"))
    _sweep(tmp / "sweep.jsonl", n)
    rows = load_sweep(tmp / "sweep.jsonl")
    config = JudgeConfig(rubrics=(load_rubric("coherence"),), max_tokens=max_tokens)
    print(f"judge {args.model}: {n} answers, rubric coherence, max_tokens {max_tokens}")
    started = time.monotonic()
    with LocalServer(args.model, ("--max-batch", "16"), timeout_s=1800) as server:
        print(f"server up in {time.monotonic() - started:.0f}s at {server.base_url}")
        results = {}
        runs = (("warm-up16", 16), ("warm-up1", 1), ("c1", 1), ("c16", 16))
        for label, concurrency in runs:
            endpoint_config = EndpointConfig(base_url=server.base_url, concurrency=concurrency)
            with open_endpoint(endpoint_config) as endpoint:
                summary = judge_sweep(
                    endpoint, rows, tmp / f"{label}.jsonl", config, progress=False, plot=False
                )
            rate = summary.n_judged / summary.elapsed_s
            tokens = summary.usage["completion_tokens"] / summary.elapsed_s
            print(
                f"  {label:9s} concurrency {concurrency:2d}: {summary.n_judged} ratings "
                f"({summary.n_rejected} rejected) in {summary.elapsed_s:.1f}s = {rate:.2f} "
                f"ratings/s, {tokens:.0f} completion tok/s"
            )
            results[label] = (rate, {r["key"]: r["score"] for r in _rows(tmp / f"{label}.jsonl")})
    (r1, s1), (r16, s16) = results["c1"], results["c16"]
    common = set(s1) & set(s16)
    diff = max((abs(s1[k] - s16[k]) for k in common), default=float("nan"))
    print(f"concurrency 16 / 1: {r16 / r1:.2f}x ratings/s")
    print(f"largest rating difference between the two runs: {diff:.3g} over {len(common)}")
    return 0


def _rows(path: Path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
