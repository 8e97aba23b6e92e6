"""Steered generation throughput on the embedded default (SmolLM2-135M-Instruct), CPU.

Seven steering strengths (-1.5 ... 1.5) of one vector added to the middle block's output, one
chat prompt:

  mup batched   one `generate` call, one row per multiplier (per-row multipliers)
  mup separate  seven `generate` calls, one multiplier each
  HF hook       seven `transformers` `generate` calls with a forward hook on the decoder
                layer adding multiplier * vector to its output (what users write by hand)

Every run generates exactly --new-tokens tokens per row (no stop token, HF forced with
min_new_tokens). The vector is a random unit vector scaled to the mean residual norm of the
middle block's output on the prompt. Prints tokens/s and the ratios batched/separate (target >= 3x)
and batched/HF (target >= 2x).

    python benchmarks/bench_generate.py            # 64 new tokens, best of 2 repeats
    python benchmarks/bench_generate.py --quick    # smoke run (< 30 s after loading)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

MULTIPLIERS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
PROMPT = [{"role": "user", "content": "Tell me about your favourite place to visit and why."}]


def _best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from mup._resolve import default_gguf_path
    from mup.models import Steering, generate, jit_forward, load_model
    from mup.text import encode_prompts

    model = load_model("smollm2-135m")
    config = model.config
    block = config.n_layers // 2
    prompt_ids = encode_prompts(model.tokenizer, [PROMPT])[0]

    # A random direction at the typical residual norm of the steered block's output
    # (layer block + 1: the residual stream after the block).
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    positions = jnp.arange(len(prompt_ids), dtype=jnp.int32)[None]
    hidden = jit_forward(
        model.params, tokens, positions, config=config, capture=(block + 1,), logits=False
    ).hidden[block + 1]
    norm = float(jnp.linalg.norm(hidden[0, 1:], axis=-1).mean())  # skip the outlier first token
    direction = np.random.default_rng(0).normal(size=config.d_model).astype(np.float32)
    vector = direction / np.linalg.norm(direction) * norm
    steering = Steering(block, vector)
    n_rows = len(MULTIPLIERS)
    total = n_rows * new_tokens

    def ours_batched():
        return generate(
            model,
            [PROMPT] * n_rows,
            max_new_tokens=new_tokens,
            stop_tokens=(),
            steering=steering,
            multipliers=list(MULTIPLIERS),
        )

    def ours_separate():
        return [
            generate(
                model,
                [PROMPT],
                max_new_tokens=new_tokens,
                stop_tokens=(),
                steering=steering,
                multipliers=[m],
            )
            for m in MULTIPLIERS
        ]

    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_vector = torch.from_numpy(vector)
    strength = {"m": 0.0}
    # Our "steer block L" adds to block L's output, which is HF decoder layer L's output.
    hf.model.layers[block].register_forward_hook(
        lambda module, inputs, output: output + strength["m"] * hf_vector
    )
    hf_input = torch.tensor([prompt_ids])

    def hf_run(m: float):
        strength["m"] = m
        with torch.no_grad():
            return hf.generate(
                hf_input,
                attention_mask=torch.ones_like(hf_input),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=model.tokenizer.pad_token_id,
            )

    def hf_hooked():
        return [hf_run(m) for m in MULTIPLIERS]

    # Warm-up: compiles (ours) and allocator / thread pools (HF); also a correctness check:
    # the batched rows equal the separate runs, and HF's multiplier-0 run equals ours.
    batched = ours_batched()
    separate = ours_separate()
    assert batched.token_ids == [g.token_ids[0] for g in separate], "rows depend on the batch"
    zero = MULTIPLIERS.index(0.0)
    hf_zero = hf_run(0.0)[0, len(prompt_ids) :].tolist()
    agree = sum(a == b for a, b in zip(hf_zero, batched.token_ids[zero], strict=True))
    jax.block_until_ready(model.params)

    t_batched = _best_of(repeats, ours_batched)
    t_separate = _best_of(repeats, ours_separate)
    t_hf = _best_of(repeats, hf_hooked)

    print(
        f"model smollm2-135m float32, CPU ({jax.device_count()} jax device, "
        f"{torch.get_num_threads()} torch threads); steered block {block}, |v| = {norm:.1f}"
    )
    print(
        f"{n_rows} multipliers x {new_tokens} new tokens, prompt {len(prompt_ids)} tokens, "
        f"best of {repeats}"
    )
    print(f"multiplier-0 row vs HF greedy: {agree}/{new_tokens} tokens equal")
    for name, seconds in (
        ("mup batched (1 call)", t_batched),
        ("mup separate (7 calls)", t_separate),
        ("HF generate + hook (7 calls)", t_hf),
    ):
        print(f"  {name:30s} {seconds:8.3f} s  {total / seconds:9.1f} tokens/s")
    print(f"ratio batched / separate: {t_separate / t_batched:.2f}x (target >= 3x)")
    print(f"ratio batched / HF hook:  {t_hf / t_batched:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
