"""Steered server throughput: 7 concurrent request streams at 7 multipliers on ONE server vs the
same requests sent one at a time (what 7 single-multiplier deployments run one after another
amount to on one device).

python benchmarks/bench_serve.py            # embedded default SmolLM2-135M, layer 12
python benchmarks/bench_serve.py --quick    # tiny random llama, smoke run (< 30 s warm)

Both phases send identical greedy requests to the same server process; the concurrent phase
lets dynamic batching put the 7 multipliers into one generate call. Reported: completion
tokens/s of each phase and their ratio (target >= 3x), plus a check that both phases produced
the same texts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

MULTIPLIERS = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about autumn.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for learning to code.",
    "Describe a cat to someone who has never seen one.",
    "What happens when water boils?",
]


def _tiny_checkpoint(path: Path) -> tuple[Path, int]:
    import torch
    import transformers as tf

    from mup.text import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, small run")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--requests", type=int, default=None, help="requests per stream")
    p.add_argument("--max-tokens", type=int, default=None)
    args = p.parse_args(argv)
    n_req = args.requests or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (8 if args.quick else 48)

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if args.quick:
        model, d_model = _tiny_checkpoint(tmp / "tiny")
        layer = 1
    else:
        from mup._resolve import resolve_spec
        from mup.models import ModelConfig, read_hf_config

        model, layer = args.model, args.layer
        d_model = ModelConfig.from_hf_config(read_hf_config(resolve_spec(model))).d_model
    v = np.random.default_rng(0).normal(size=d_model).astype(np.float32)
    np.save(tmp / "vector.npy", v / np.linalg.norm(v) * 4.0)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mup.serve", "--model", str(model), "--vector",
         str(tmp / "vector.npy"), "--layer", str(layer), "--port", str(port),
         "--served-name", "bench", "--max-batch", "8"],
        cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "server.log").read_text())
            with contextlib.suppress(OSError):
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            time.sleep(0.2)
        print(f"server up in {time.perf_counter() - t0:.1f}s ({model}, layer {layer})")

        def request(m: float, i: int) -> dict:
            return _post(
                base + "/v1/chat/completions",
                {
                    "model": "bench",
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "steer_multiplier": m,
                },
            )

        def concurrent() -> tuple[dict, float]:
            out: dict = {}

            def stream(m):
                for i in range(n_req):
                    out[(m, i)] = request(m, i)

            threads = [threading.Thread(target=stream, args=(m,)) for m in MULTIPLIERS]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return out, time.perf_counter() - t

        def sequential() -> tuple[dict, float]:
            out: dict = {}
            t = time.perf_counter()
            for m in MULTIPLIERS:
                for i in range(n_req):
                    out[(m, i)] = request(m, i)
            return out, time.perf_counter() - t

        # Warm-up, so that no compile lands in a timed phase: every batch bucket (1, 2, 4, 8
        # rows) that staggered arrivals can produce, every prompt alone (each prompt-length
        # bucket at one row, as the sequential phase sends them) and one untimed concurrent
        # pass (the prompt-length buckets its batches mix).
        for burst in (1, 2, 3, 5, 7):
            threads = [threading.Thread(target=request, args=(m, 0)) for m in MULTIPLIERS[:burst]]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        for i in range(len(PROMPTS)):
            request(0.0, i)
        concurrent()
        conc, t_conc = concurrent()
        seq, t_seq = sequential()
        tokens = sum(r["usage"]["completion_tokens"] for r in seq.values())
        same = all(
            conc[k]["choices"][0]["message"]["content"]
            == seq[k]["choices"][0]["message"]["content"]
            for k in seq
        )
        batch = max(r["batch_rows"] for r in conc.values())
        print(f"{len(MULTIPLIERS)} streams x {n_req} requests, max_tokens {max_tokens}, "
              f"{tokens} completion tokens per phase")  # fmt: skip
        print(f"concurrent (one server, dynamic batching, up to {batch} rows/call): "
              f"{t_conc:7.2f}s  {tokens / t_conc:8.1f} tok/s")  # fmt: skip
        print(f"sequential (one request at a time):                        "
              f"{t_seq:7.2f}s  {tokens / t_seq:8.1f} tok/s")  # fmt: skip
        print(f"throughput ratio concurrent/sequential: {t_seq / t_conc:.2f}x (target >= 3x)")
        print(f"outputs identical in both phases: {same}")
        return 0 if same else 1
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
