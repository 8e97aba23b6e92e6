"""Generation stage of a steering sweep on the embedded default (SmolLM2-135M-Instruct), CPU.

21 raw multipliers (-20 ... 20, step 2) x 32 prompts (the bundled pairs' prompts) x 64 new
tokens, greedy, one random unit-norm vector added to the middle block's output:

  mup sweep   `generate` calls of --prompts-per-call prompts x all multipliers (per-row
              multipliers), what `mup steering sweep` runs
  HF hook     the study's way: transformers `generate` with a forward hook on the decoder layer
              adding multiplier * vector to its output, one call per multiplier, the 32 prompts
              left-padded in one batch

Every row generates exactly --new-tokens tokens (no stop token; HF forced with min_new_tokens).
Checks that the multiplier-0 greedy tokens of both agree (prints the share of equal rows and
tokens: float32 rounding may flip a near-tie late in a row). Prints the ratio (target >= 5x).
The timed calls of the two sides are interleaved (a shared machine's load hits both alike),
and each prints a line (flushed) as it finishes, so a long run shows where it is.

    python benchmarks/bench_sweep.py            # 21 x 32 x 64
    python benchmarks/bench_sweep.py --quick    # 3 x 4 x 8, for correctness
    python benchmarks/bench_sweep.py --prompts 16 --multipliers=-20:20:4   # a smaller grid
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, for correctness")
    parser.add_argument("--prompts-per-call", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=None, help="prompts (32; --quick 4)")
    parser.add_argument(
        "--multipliers",
        default=None,
        help="comma list or start:stop:step (default -20:20:2; --quick -4,0,4); 0 is added",
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per row (64; quick 8)")
    args = parser.parse_args()
    from mup.steering import parse_multipliers, with_zero

    multipliers, n_prompts, new_tokens = (-4.0, 0.0, 4.0), 4, 8
    if not args.quick:
        multipliers, n_prompts, new_tokens = tuple(float(m) for m in range(-20, 21, 2)), 32, 64
    if args.multipliers is not None:
        try:
            multipliers = with_zero(parse_multipliers(args.multipliers))
        except ValueError as e:
            parser.error(str(e))
    n_prompts = args.prompts or n_prompts
    new_tokens = args.new_tokens or new_tokens
    for flag, value in (("--prompts", n_prompts), ("--new-tokens", new_tokens)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")

    import jax
    import torch
    import transformers

    from mup import _compile_cache
    from mup._resolve import default_gguf_path
    from mup.models import Steering, generate, load_model
    from mup.steering import bundled_pairs_path, load_pairs
    from mup.text import encode_prompts

    _compile_cache.enable()
    model = load_model("smollm2-135m")
    block = model.config.n_layers // 2
    pairs = load_pairs(bundled_pairs_path())
    if n_prompts > len(pairs):
        raise SystemExit(f"--prompts {n_prompts}: the bundled pairs have {len(pairs)} prompts")
    prompts = [list(p.prompt) for p in pairs[:n_prompts]]
    prompt_ids = encode_prompts(model.tokenizer, prompts)
    rng = np.random.default_rng(0)
    vector = rng.standard_normal(model.config.d_model).astype(np.float32)
    vector /= np.linalg.norm(vector)
    steering = Steering(block, vector)
    per_call = min(args.prompts_per_call, n_prompts)
    total = len(multipliers) * n_prompts * new_tokens

    from mup.models._generate import PROMPT_BUCKETS

    def bucket(n: int) -> int:  # generate's prompt length bucket
        return next((b for b in PROMPT_BUCKETS if b >= n), -(-n // 2048) * 2048)

    # mup: prompts per_call at a time, all multipliers of a prompt in the same call.
    mup_calls = [
        list(range(s, min(n_prompts, s + per_call))) for s in range(0, n_prompts, per_call)
    ]

    def ours(idx: list[int]) -> dict:
        rows = [(i, m) for i in idx for m in multipliers]
        g = generate(
            model,
            [prompts[i] for i, _ in rows],
            max_new_tokens=new_tokens,
            stop_tokens=(),
            steering=steering,
            multipliers=[m for _, m in rows],
        )
        return dict(zip(rows, g.token_ids, strict=True))

    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_vector = torch.from_numpy(vector)
    strength = {"m": 0.0}
    hf.model.layers[block].register_forward_hook(
        lambda module, inputs, output: output + strength["m"] * hf_vector
    )
    width = max(len(p) for p in prompt_ids)
    pad = model.tokenizer.pad_token_id or 0
    hf_input = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids])
    hf_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])

    def hf_run(m: float):
        strength["m"] = m
        with torch.no_grad():
            out = hf.generate(
                hf_input,
                attention_mask=hf_mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )
        return out[:, width:].tolist()

    print(
        f"{len(multipliers)} multipliers x {n_prompts} prompts x {new_tokens} new tokens: "
        f"{len(mup_calls)} mup calls, {len(multipliers)} HF calls",
        flush=True,
    )
    # Warm-up: one mup call per program it will meet (rows, prompt bucket) compiles them; one
    # HF call starts torch's thread pools. Untimed.
    seen = set()
    for idx in mup_calls:
        shape = (len(idx), bucket(max(len(prompt_ids[i]) for i in idx)))
        if shape not in seen:
            seen.add(shape)
            t0 = time.perf_counter()
            ours(idx)
            print(f"  [warm-up] mup {shape[0]} prompts, bucket {shape[1]}: "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    hf_run(0.0)
    print(f"  [warm-up] HF one call: {time.perf_counter() - t0:.1f} s", flush=True)
    jax.block_until_ready(model.params)

    # Timed: the two sides' calls interleaved in proportion (call k of a side with n calls
    # at (k + 0.5) / n), so that a change of load on a shared machine hits both alike.
    schedule = sorted(
        [((k + 0.5) / len(mup_calls), "mup", k) for k in range(len(mup_calls))]
        + [((k + 0.5) / len(multipliers), "HF", k) for k in range(len(multipliers))]
    )
    got: dict = {}
    ref: dict = {}
    spent = {"mup": 0.0, "HF": 0.0}
    done = {"mup": 0, "HF": 0}
    call_times: dict[str, list[float]] = {"mup": [], "HF": []}
    started = time.perf_counter()
    for _, side, k in schedule:
        t0 = time.perf_counter()
        if side == "mup":
            got.update(ours(mup_calls[k]))
        else:
            ref[multipliers[k]] = hf_run(multipliers[k])
        call_times[side].append(time.perf_counter() - t0)
        spent[side] += call_times[side][-1]
        done[side] += 1
        n = len(mup_calls) if side == "mup" else len(multipliers)
        print(
            f"  [{side}] {done[side]}/{n} calls, {spent[side]:.1f} s on this side "
            f"({time.perf_counter() - started:.0f} s wall)",
            flush=True,
        )
    t_ours, t_hf = spent["mup"], spent["HF"]

    rows_equal = sum(got[(i, 0.0)] == ref[0.0][i] for i in range(n_prompts))
    tok_equal = sum(
        a == b for i in range(n_prompts) for a, b in zip(got[(i, 0.0)], ref[0.0][i], strict=True)
    )
    print(
        f"model smollm2-135m float32, CPU ({jax.device_count()} jax device, "
        f"{torch.get_num_threads()} torch threads); steered block {block}, |v| = 1 (raw "
        "multipliers)"
    )
    print(
        f"{len(multipliers)} multipliers x {n_prompts} prompts x {new_tokens} new tokens; "
        f"mup: {per_call} prompts x {len(multipliers)} multipliers per call"
    )
    print(
        f"multiplier-0 greedy vs HF: {rows_equal}/{n_prompts} rows equal, "
        f"{tok_equal}/{n_prompts * new_tokens} tokens equal"
    )
    for name, seconds in (("mup sweep (batched)", t_ours), ("HF hook, 1 call / m", t_hf)):
        print(f"  {name:24s} {seconds:8.2f} s  {total / seconds:9.1f} tokens/s")
    print(f"ratio mup / HF: {t_hf / t_ours:.2f}x (target >= 5x)")
    # A loaded machine stalls single calls (torch's thread pools suffer most): the spread of
    # the per-call times, and the ratio with every HF call at the median one, say how much.
    hf_med = float(np.median(call_times["HF"]))
    print(
        "per call: mup " + ", ".join(f"{t:.1f}" for t in call_times["mup"]) + " s; HF min "
        f"{min(call_times['HF']):.1f}, median {hf_med:.1f}, max {max(call_times['HF']):.1f} s"
    )
    print(f"ratio with HF at its median call: {hf_med * len(multipliers) / t_ours:.2f}x")
    if rows_equal < n_prompts // 2:
        raise SystemExit("multiplier-0 greedy texts disagree with transformers")


if __name__ == "__main__":
    main()
