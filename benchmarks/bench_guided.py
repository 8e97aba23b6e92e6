"""What JSON-constrained decoding costs the engine: the same rows free and constrained, and
free rows beside a constrained batch-mate when the engine runs several decode steps per call.

python benchmarks/bench_guided.py                 # embedded default SmolLM2-135M
python benchmarks/bench_guided.py --quick         # fewer tokens, one repeat
python benchmarks/bench_guided.py --free-only     # only the free rows: runs on any mup tree
                                                  # (PYTHONPATH=<tree>), e.g. main vs a branch

Rows: `--rows` copies of one chat prompt, greedy, `--tokens` new tokens each with no stop
tokens, so that every run decodes the same number of tokens. The constrained rows carry a
json_schema grammar whose one string must be longer than the run can write (minLength), so
they too decode exactly `--tokens` tokens, every one under a mask computed on the host after
the token before it. Each workload runs once untimed (compiles), then `--repeats` times,
interleaved with the others; reported: best-of tokens/s and the ratios

  constrained / free rows                       (the mask's cost per step, decode_steps=1)
  free rows beside one constrained row / alone  (decode_steps=4: the constrained row makes
                                                 every call one step)
"""

from __future__ import annotations

import argparse
import time

import jax

PROMPT = [{"role": "user", "content": "Describe a busy harbour at dawn, in detail."}]
SCHEMA = {
    "type": "object",
    "properties": {"description": {"type": "string", "minLength": 4000}},
    "required": ["description"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--free-only", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 32, 1

    from mup.engine import Engine, EngineConfig, Request
    from mup.models import load_model
    from mup.text import encode_prompts

    model = load_model(args.model)
    ids = tuple(encode_prompts(model.tokenizer, [PROMPT])[0])
    grammar = None
    if not args.free_only:
        from mup.engine import json_schema_grammar

        grammar = json_schema_grammar(SCHEMA)

    def engine(decode_steps: int) -> Engine:
        cfg = EngineConfig(
            max_slots=args.rows, max_len=512, prefill_rows=(1, args.rows),
            decode_steps=decode_steps,
        )  # fmt: skip
        return Engine(model, config=cfg).start()

    def rows(n: int, constrained: bool) -> list[Request]:
        extra = {"grammar": grammar} if constrained else {}
        return [Request(prompt_ids=ids, max_tokens=args.tokens, stop_ids=(), **extra)] * n

    one_step, four_steps = engine(1), engine(4)
    workloads = {"free rows": (one_step, rows(args.rows, False))}
    if not args.free_only:
        workloads["constrained rows"] = (one_step, rows(args.rows, True))
        workloads["free rows, decode_steps=4"] = (four_steps, rows(args.rows, False))
        workloads["free rows + 1 constrained, decode_steps=4"] = (
            four_steps,
            rows(args.rows - 1, False) + rows(1, True),
        )

    def run(name: str) -> tuple[float, int]:
        eng, requests = workloads[name]
        t0 = time.perf_counter()
        results = eng.generate(requests)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results if r.finish_reason == "length")
        assert tokens == len(requests) * args.tokens, "a row stopped early"
        return seconds, tokens

    for name in workloads:  # compile
        run(name)
    best = {name: float("inf") for name in workloads}
    counted = {}
    for _ in range(args.repeats):
        for name in workloads:
            seconds, counted[name] = run(name)
            best[name] = min(best[name], seconds)
    one_step.close()
    four_steps.close()

    print(
        f"model {args.model}, {jax.devices()[0].platform} ({jax.device_count()} device); "
        f"{args.rows} rows x {args.tokens} new tokens, prompt {len(ids)} tokens, "
        f"best of {args.repeats}"
    )
    rate = {name: counted[name] / best[name] for name in workloads}
    for name in workloads:
        print(f"  {name:44s} {best[name]:8.3f} s  {rate[name]:9.1f} tokens/s")
    if not args.free_only:
        print(f"ratio constrained / free rows: {rate['constrained rows'] / rate['free rows']:.3f}")
        mixed = rate["free rows + 1 constrained, decode_steps=4"]
        print(f"ratio beside 1 constrained / alone (decode_steps=4, all rows' tokens): "
              f"{mixed / rate['free rows, decode_steps=4']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
