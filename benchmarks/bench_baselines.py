"""Prompted-baseline scoring throughput: mup's jitted log-likelihood scorer vs transformers'
forward on the very same padded batches, and through `mup serve` (echo logprobs) vs in process,
on the embedded default model (SmolLM2-135M-Instruct, float32, CPU or whatever JAX finds).

    python benchmarks/bench_baselines.py            # 64 dev records, default + single_word
    python benchmarks/bench_baselines.py --quick    # 16 records, no server

What a user would do instead is the transformers loop: `model(input_ids, attention_mask)` over
padded batches, log-softmax over the full logits, gather the completion tokens. It gets the
batches mup plans (same rows, same padding), so the ratio is the forward and the scoring alone.
Both sides also check each other: the log-likelihoods must agree to 1e-3 (the issue's parity
bound for float32 on the default model); the largest difference is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import _free_port, _server  # noqa: E402  (one server fixture for the benchmarks)


def _records(n: int):
    from mup.data import find_dataset, load_records

    out = []
    for name in ("dev/anthropic", "dev/mt", "dev/mts", "dev/toolace"):
        path = find_dataset(name, allow_hub=False)
        out += list(load_records(path, binary=True))[: -(-n // 4)]
    return out[:n], path


def _hf_sums(hf, batches, torch) -> dict[int, np.ndarray]:
    sums: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for batch in batches:
            logits = hf(
                input_ids=torch.from_numpy(batch.tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(batch.valid.astype(np.int64)),
            ).logits  # [B, P, V]
            pos = torch.from_numpy(batch.positions.astype(np.int64))
            picked_logits = torch.gather(
                logits, 1, pos[:, :, None].expand(-1, -1, logits.shape[-1])
            )  # [B, C, V]
            logp = torch.log_softmax(picked_logits.double(), -1)
            tg = torch.from_numpy(batch.targets.astype(np.int64))  # [B, 2, C]
            picked = torch.gather(logp[:, None].expand(-1, 2, -1, -1), 3, tg[..., None])[..., 0]
            total = (picked * torch.from_numpy(batch.mask)).sum(-1).numpy()  # [B, 2]
            for b, row in enumerate(batch.rows):
                sums[row.record] = sums.get(row.record, np.zeros(2)) + total[b]
    return sums


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--max-conversation-tokens", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args(argv)
    n = args.records or (16 if args.quick else 64)

    import torch
    import transformers

    from mup._resolve import default_gguf_path
    from mup.models import load_model
    from mup.monitors import _likelihood, _prompted
    from mup.monitors._prompts import LIKELIHOOD_TEMPLATES

    records, _ = _records(n)
    model = load_model("smollm2-135m")
    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    print(f"{len(records)} dev records, conversations cut to {args.max_conversation_tokens} tokens")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}")  # fmt: skip

    results = []
    for name in ("default", "single_word"):
        prompts, high, low = _prompted.template_prompts(
            model.tokenizer,
            records,
            LIKELIHOOD_TEMPLATES[name],
            max_conversation_tokens=args.max_conversation_tokens,
        )
        highs, lows = [high] * n, [low] * n
        batches = _likelihood.padded_batches(prompts, highs, lows, token_budget=args.token_budget)

        def ours(prompts=prompts, highs=highs, lows=lows):
            return _likelihood.pair_logprobs(
                model.params, model.config, prompts, highs, lows, token_budget=args.token_budget
            )

        t0 = time.perf_counter()
        ll = ours()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ll = ours()
        warm = time.perf_counter() - t0
        _hf_sums(hf, batches[:1], torch)  # warm-up
        t0 = time.perf_counter()
        ref = _hf_sums(hf, batches, torch)
        t_hf = time.perf_counter() - t0
        ref_arr = np.array([ref[i] for i in range(n)])
        diff = float(np.max(np.abs(ref_arr - np.stack([ll.high, ll.low], 1))))
        tokens = int(sum(b.valid.sum() for b in batches))
        row = dict(template=name, cold=cold, warm=warm, hf=t_hf, diff=diff, tokens=tokens)
        results.append(row)
        print(
            f"\n[{name}] {len(batches)} batches, {tokens} real tokens: "
            f"mup {n / warm:.2f} records/s "
            f"(cold {n / cold:.2f}), transformers {n / t_hf:.2f} records/s; "
            f"mup/transformers {t_hf / warm:.2f}x; max |LL diff| {diff:.2e}"
        )
        assert diff <= 1e-3, f"parity with transformers broken: {diff}"

    if not (args.quick or args.no_server):
        import openai

        port = _free_port()
        cmd = [sys.executable, "-m", "mup.serve", "--model", "smollm2-135m", "--port", str(port)]
        with tempfile.TemporaryDirectory() as tmp, _server(cmd, Path(tmp), port, "serve") as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="none")
            served = client.models.list().data[0].id
            for row in results:
                name = row["template"]
                prompts, high, low = _prompted.template_prompts(
                    model.tokenizer,
                    records,
                    LIKELIHOOD_TEMPLATES[name],
                    max_conversation_tokens=args.max_conversation_tokens,
                )
                scorer = _prompted.EchoScorer(client, served)
                scorer(prompts[:2], [high] * 2, [low] * 2)  # warm-up (compiles the server's shapes)
                t0 = time.perf_counter()
                remote = scorer(prompts, [high] * n, [low] * n)
                t_srv = time.perf_counter() - t0
                local = _likelihood.pair_logprobs(
                    model.params, model.config, prompts, [high] * n, [low] * n,
                    token_budget=args.token_budget,
                )  # fmt: skip
                diff = float(np.max(np.abs(remote.high - local.high)))
                row["server"] = t_srv
                print(
                    f"[{name}] through mup serve (echo logprobs): {n / t_srv:.2f} records/s; "
                    f"server/in-process {row['warm'] / t_srv:.2f}x; max |LL diff| {diff:.2e}"
                )

    print(
        "\n| template | mup records/s | transformers records/s | mup / transformers |"
        + (" mup serve records/s | serve / in-process |" if "server" in results[0] else "")
    )
    print("|---|---|---|---|" + ("---|---|" if "server" in results[0] else ""))
    for r in results:
        line = (
            f"| {r['template']} | {n / r['warm']:.2f} | {n / r['hf']:.2f} "
            f"| {r['hf'] / r['warm']:.2f}x |"
        )
        if "server" in r:
            line += f" {n / r['server']:.2f} | {r['warm'] / r['server']:.2f}x |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
