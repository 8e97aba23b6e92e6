"""Residual-capture throughput: mup's jitted forward vs HF transformers, in one run.

What a user would do instead (the MUP paper's code): truncate the HF model to the layers
needed (``model.model.layers = layers[:L]``) and call it with ``output_hidden_states=True``.
We give HF its best case: the base model (no LM head), torch inference mode, the same
length-sorted batches; both sides run in float32 and in bfloat16, with the same weights.

mup: ``forward(params, tokens, positions, valid=..., capture=(L,), logits=False)`` jitted, batches
right-padded to a few power-of-two length buckets (compiled once each, in the warm-up).
Every run is warmed up first; the timed passes (``--repeats``) interleave the four runs and each
keeps its best, so that load from elsewhere on the machine does not land on one side only.

Printed: tokens/s of each side and dtype; the ratios mup / HF per dtype and best dtype vs best
dtype (target >= 1.5x); the largest differences between the captures (mup bfloat16 against both
HF dtypes, and HF bfloat16 vs float32 for scale); and the fraction of the FLOP limit reached:
2 x params-below-layer-L x tokens / the matmul peak of that dtype measured in this run (jnp.dot
of big matrices; bfloat16 accumulating in float32, XLA CPU's fast bfloat16 path).

GPU mode (``--device gpu --config llama-3.2-1b --random``): random bfloat16 weights, fixed-length
batches, capture after the last block; prints MFU against the measured bf16 matmul peak.

usage: python benchmarks/bench_capture.py [--quick] [--layer 20] [--batch 8] [--texts 64]
                                          [--repeats 2]
       python benchmarks/bench_capture.py --device gpu --config llama-3.2-1b --random
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "bfloat16")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXT_FILES = ("mup/evals/dev/mts_balanced.jsonl", "mup/training/synthetic_2025-03-25.jsonl")


def matmul_peak(n: int, dtype, reps: int = 5) -> float:
    """FLOP/s of one big jnp.dot on the default device (best of `reps`), accumulating in
    float32 as the model's projections do (`mup.models._layers.project`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def load_texts(n: int) -> list[str]:
    texts: list[str] = []
    for rel in TEXT_FILES:
        path = SHARED / rel
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            texts.append(str(json.loads(line)["inputs"]))
            if len(texts) >= n:
                return texts
    if not texts:
        raise SystemExit(f"no texts: {SHARED} is absent; use --random")
    return texts


def random_lengths(n: int, max_len: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(150), 0.8, n), 8, max_len)]


def bucket(n: int) -> int:
    """Padded length: a multiple of 16 up to 128, of 32 up to 256, then of 64. At most ~12%
    padding above 128 tokens, and a fixed set of shapes (one compile each)."""
    step = 16 if n <= 128 else 32 if n <= 256 else 64
    return -(-n // step) * step


def make_batches(ids: list[list[int]], batch: int):
    """Length-sorted batches: (token lists, true lengths). Same grouping for both sides."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [[ids[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]


def pad(rows: list[list[int]], width: int, batch: int):
    tok = np.zeros((batch, width), np.int32)
    valid = np.zeros((batch, width), bool)
    for r, row in enumerate(rows):
        tok[r, : len(row)] = row
        valid[r, : len(row)] = True
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width)).copy()
    return tok, pos, valid


def mup_runner(params, config, batches, layer: int, batch: int):
    """Compile every bucket (the warm-up); returns a call that captures every batch."""
    from mup.models._transformer import forward

    fn = jax.jit(functools.partial(forward, config=config, capture=(layer,), logits=False))
    for width in sorted({bucket(max(map(len, b))) for b in batches}):
        tok, pos, valid = pad([[0] * width], width, batch)
        fn(params, tok, pos, valid=valid).hidden[layer].block_until_ready()

    def run():
        outs = []
        for rows in batches:
            tok, pos, valid = pad(rows, bucket(max(map(len, rows))), batch)
            outs.append(np.asarray(fn(params, tok, pos, valid=valid).hidden[layer]))
        return outs

    return run


def hf_model(config, params, layer: int, hf_config: dict):
    import torch
    import transformers

    from mup.models._params import hf_tensors_from_params

    cfg = transformers.AutoConfig.for_model(**hf_config)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    state = {
        k: torch.from_numpy(np.array(v, np.float32))
        for k, v in hf_tensors_from_params(config, params)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    base = model.model.float().eval()
    base.layers = base.layers[:layer]  # the MUP paper's truncation
    base.norm = torch.nn.Identity()  # hidden_states[L] is then the raw residual, as mup's
    return base


def hf_runner(base, batches, layer: int):
    """Warm up `base` on the first batch; returns a call that captures every batch."""
    import torch

    def call(rows):
        width = max(map(len, rows))
        tok, _, valid = pad(rows, width, len(rows))
        with torch.inference_mode():
            out = base(
                input_ids=torch.from_numpy(tok).long(),
                attention_mask=torch.from_numpy(valid).long(),
                output_hidden_states=True,
            )
        return out.hidden_states[layer].float().numpy()

    call(batches[0])
    return lambda: [call(rows) for rows in batches]


def cpu_main(args) -> None:
    from mup.models import NAMED_CONFIGS
    from mup.models._params import init_params

    if args.random:
        config = NAMED_CONFIGS[args.config]
        params = init_params(config, jax.random.key(0), jnp.float32)
        rng = np.random.default_rng(1)
        ids = [
            rng.integers(0, config.vocab_size, n).tolist()
            for n in random_lengths(args.texts, args.max_len)
        ]
        hf_config = _hf_config_dict(config)
        source = f"{args.config} (random weights)"
    else:
        from mup.models import load_model
        from mup.models._checkpoint import read_hf_config

        model = load_model(args.config, dtype="float32")
        config, params = model.config, model.params
        ids = [
            model.tokenizer(t, add_special_tokens=False)["input_ids"][: args.max_len]
            for t in load_texts(args.texts)
        ]
        hf_config = read_hf_config(model.spec)
        source = f"{args.config} ({model.spec.path.name})"
    layer = args.layer
    batches = make_batches(ids, args.batch)
    tokens = sum(map(len, ids))
    print(
        f"model {source}: capture layer {layer} of {config.n_layers}; {len(ids)} texts, "
        f"{tokens} tokens, batch {args.batch}, lengths {min(map(len, ids))}..{max(map(len, ids))}",
        flush=True,
    )

    peak = {dtype: matmul_peak(args.peak_n, getattr(jnp, dtype)) for dtype in DTYPES}
    print(
        f"matmul peak (jnp.dot {args.peak_n}^2, float32 accumulation): "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()),
        flush=True,
    )
    import torch

    runs = {}
    for dtype in DTYPES:
        cast = jax.tree.map(lambda a, d=dtype: a.astype(d), params)
        runs["mup", dtype] = mup_runner(cast, config, batches, layer, args.batch)
    base = hf_model(config, params, layer, hf_config)
    for dtype in DTYPES:
        runs["HF", dtype] = hf_runner(copy.deepcopy(base).to(getattr(torch, dtype)), batches, layer)
    # Repeats interleave the four runs and keep each one's best: a load burst from elsewhere on
    # the machine then slows one repeat of every run, not every repeat of one.
    seconds, outs = dict.fromkeys(runs, float("inf")), {}
    for r in range(args.repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            outs[key] = run()
            t = time.perf_counter() - start
            seconds[key] = min(seconds[key], t)
            print(f"pass {r + 1}: {' '.join(key):12s} {tokens / t:7.0f} tokens/s", flush=True)
    print("best: " + ", ".join(f"{' '.join(k)} {tokens / t:.0f}" for k, t in seconds.items()))

    rate = {key: tokens / t for key, t in seconds.items()}
    best = {side: max(DTYPES, key=lambda d, s=side: rate[s, d]) for side in ("mup", "HF")}
    print("ratios (target >= 1.5x):")
    for (a, da), (b, db) in [
        (("mup", "float32"), ("HF", "float32")),
        (("mup", "bfloat16"), ("HF", "bfloat16")),
        (("mup", "bfloat16"), ("HF", "float32")),
        (("mup", best["mup"]), ("HF", best["HF"])),
    ]:
        print(f"  {a} {da:8s} / {b} {db:8s}: {rate[a, da] / rate[b, db]:.2f}x")
    flops = 2 * config.param_count(layer, embeddings=False) * tokens
    print("fraction of the FLOP limit (same-dtype matmul peak):")
    for (side, dtype), t in seconds.items():
        print(f"  {side:3s} {dtype:8s}: {flops / t / peak[dtype]:.1%}")
    scale = max(float(np.abs(h).max()) for h in outs["HF", "float32"])
    print(
        f"differences over real tokens at layer {layer}: max |a - b| (max |HF float32| "
        f"{scale:.1f}); max ||a - b|| / ||b|| of a token:"
    )
    for a, b in [
        (("mup", "float32"), ("HF", "float32")),
        (("mup", "bfloat16"), ("HF", "bfloat16")),
        (("mup", "bfloat16"), ("HF", "float32")),
        (("mup", "bfloat16"), ("mup", "float32")),
        (("HF", "bfloat16"), ("HF", "float32")),
    ]:
        worst, rel = _diffs(outs[a], outs[b], batches)
        print(f"  {' '.join(a):12s} vs {' '.join(b):12s}: {worst:.2e}; {rel:.2e}")


def _diffs(outs_a, outs_b, batches) -> tuple[float, float]:
    """(largest |a - b|, largest ||a - b|| / ||b|| of one token) over the real tokens of every
    batch (outputs may be padded wider)."""
    worst = worst_rel = 0.0
    for a, b, rows in zip(outs_a, outs_b, batches, strict=True):
        width = max(map(len, rows))
        mask = _mask(rows, width)
        a = np.asarray(a[: len(rows), :width], np.float32)[mask]  # [tokens, D]
        b = np.asarray(b[: len(rows), :width], np.float32)[mask]
        worst = max(worst, float(np.abs(a - b).max()))
        rel = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)
        worst_rel = max(worst_rel, float(rel.max()))
    return worst, worst_rel


def _mask(rows, width):
    m = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        m[r, : len(row)] = True
    return m


def _hf_config_dict(config) -> dict:
    """A transformers llama config dict for a llama-family ModelConfig (random-weight runs)."""
    if config.norm_plus_one or config.attention_bias or config.has_local_layers:
        raise SystemExit("--random with the HF comparison supports llama-family configs only")
    d = dict(
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
    )
    if config.rope_scaling is not None:
        s = config.rope_scaling
        d["rope_scaling"] = dict(
            rope_type=s.kind,
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return d


def gpu_main(args) -> None:
    from mup.models import NAMED_CONFIGS
    from mup.models._params import init_params
    from mup.models._transformer import forward

    if not args.random:
        raise SystemExit("--device gpu runs with --random weights")
    config = NAMED_CONFIGS[args.config]
    layer = config.n_layers if args.layer is None else args.layer
    params = jax.jit(lambda k: init_params(config, k, jnp.bfloat16))(jax.random.key(0))
    B, T = args.batch, args.max_len
    tok = jax.random.randint(jax.random.key(1), (B, T), 0, config.vocab_size, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    fn = jax.jit(functools.partial(forward, config=config, capture=(layer,), logits=False))
    fn(params, tok, pos).hidden[layer].block_until_ready()
    steps = 3 if args.quick else 10
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(params, tok, pos)
    out.hidden[layer].block_until_ready()
    dt = (time.perf_counter() - start) / steps
    peak = matmul_peak(8192, jnp.bfloat16)
    flops = config.flops_per_token(layer, seq_len=T) * B * T
    print(
        f"{args.config} random bf16 on {jax.devices()[0].device_kind}: capture layer {layer}, "
        f"batch {B} x {T}"
    )
    print(f"{B * T / dt:.0f} tokens/s, {flops / dt / 1e12:.1f} TFLOP/s")
    print(
        f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s; MFU {flops / dt / peak:.1%} "
        "(target >= 40%)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 30 s)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--config", default=None, help="model spec / named config")
    ap.add_argument("--random", action="store_true", help="random weights of a named config")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--texts", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--peak-n", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed passes, best kept")
    args = ap.parse_args()
    if args.device == "gpu":
        args.config = args.config or "llama-3.2-1b"
        args.batch = args.batch or 16
        args.max_len = args.max_len or 2048
        gpu_main(args)
        return
    args.config = args.config or "smollm2-135m"
    if args.quick:
        args.random = True  # skip the GGUF load: throughput does not depend on the weights
    args.layer = args.layer if args.layer is not None else (4 if args.quick else 20)
    args.batch = args.batch or 8
    args.texts = args.texts or (8 if args.quick else 64)
    args.max_len = args.max_len or (64 if args.quick else 256)
    args.peak_n = args.peak_n or (512 if args.quick else 2048)
    args.repeats = args.repeats or (1 if args.quick else 2)
    cpu_main(args)


if __name__ == "__main__":
    main()
