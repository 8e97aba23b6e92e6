"""Steered serving under an open-loop load: the continuous-batching engine vs one request at a
time vs the same engine limited to static batches, plus transformers' own continuous-batching
server at multiplier 0, and the cost of probe scoring.

python benchmarks/bench_serve.py            # embedded default SmolLM2-135M, steered block 12
python benchmarks/bench_serve.py --quick    # tiny random llama, smoke run

The load (one fixed draw, identical for every server): N chat requests (prompts from the stakes
data, mixed lengths), max_tokens uniform in 16..128, multipliers cycling over seven values,
Poisson arrivals at --rate requests/s, each request streamed (SSE) so that the time to first
token is measured. Every server first serves the whole load once untimed (its compiled
programs then exist), then once timed. Reported per server: completion tokens/s over the run,
p50/p99 request latency and p50 time to first token, and the ratios

  (a) engine / (c) static batches  throughput (target >= 1.5x), p50 TTFT (target <= 0.25x)
  (a) engine / (b) one at a time   throughput (target >= 3x)
  (a) engine / transformers serve --continuous-batching at multiplier 0 (target >= 2x)
  probe scoring overhead at 7 concurrent streams (target <= 5%)

and whether (a), (b) and (c) produced identical texts (greedy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
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
MAX_PROMPT, MAX_CONTEXT = 384, 512


# ---------------------------------------------------------------------------------------------
# Models, vectors, probes, prompts
# ---------------------------------------------------------------------------------------------


def _tiny_checkpoint(path: Path) -> Path:
    import torch
    import transformers as tf

    from mup.text import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _safetensors_copy(spec: str, out: Path) -> Path:
    """transformers cannot serve our GGUF file directly: save the dequantized model."""
    import torch
    import transformers as tf

    from mup._resolve import resolve_spec

    resolved = resolve_spec(spec)
    path = Path(resolved.path)
    if path.is_dir():
        return path
    model = tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the same weights,
    # already dequantized to float32, go into a plain model built from its config.
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = type(model)(config).to(torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _probe_file(path: Path, d_model: int, layer: int) -> Path:
    from mup import probes

    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 9, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    labels = (np.arange(40) % 2).astype(np.int8)
    acts = rng.normal(size=(int(offsets[-1]), d_model)).astype(np.float32)
    acts += np.repeat(labels, lengths)[:, None] * rng.normal(size=d_model).astype(np.float32)
    data = probes.Activations(acts=acts, offsets=offsets, labels=labels, layers=(layer,))
    return probes.fit("dom", data, layer=layer).save(path)


def _prompts(n: int, seed: int, tokenizer, max_prompt: int) -> list[list[dict]]:
    """n conversations of mixed lengths (at most max_prompt template tokens) from the stakes
    data (the bundled set as a fallback)."""
    from mup.data import find_dataset, load_records
    from mup.text import encode_prompts

    try:
        ds = load_records(find_dataset("training", allow_hub=False))
    except Exception:  # noqa: BLE001 - no data root: the bundled records
        from mup.data import bundled_path

        ds = load_records(bundled_path())
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(np.resize(np.arange(len(ds)), max(len(ds), 4 * n))):
        msgs = [m.as_dict() for m in ds[int(i)].messages]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if msgs and len(encode_prompts(tokenizer, [msgs])[0]) <= max_prompt:
            out.append(msgs)
        if len(out) == n:
            return out
    raise RuntimeError(f"fewer than {n} records of at most {max_prompt} prompt tokens")


# ---------------------------------------------------------------------------------------------
# Servers and the load
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], cwd: Path, port: int, name: str, timeout: float = 900):
    log = open(cwd / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{(cwd / f'{name}.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after {timeout}s")
            time.sleep(0.3)
        try:
            yield base
        except Exception as e:  # a server that dies mid-load: show why, its log goes with tmp
            log.flush()
            tail = (cwd / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"{e}\n--- the last lines of {name}'s log ---\n{tail}") from e
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _stream(base: str, body: dict) -> dict:
    """One streamed chat request: text, completion tokens, first-token and end times."""
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(
            {**body, "stream": True, "stream_options": {"include_usage": True}}
        ).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer -"},
    )
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": tokens, "t0": t0, "first": first or end, "end": end}


def _open_loop(base: str, bodies: list[dict], arrivals: np.ndarray) -> dict:
    """Send body i at arrivals[i] seconds (open loop: arrivals never wait for answers)."""
    out: list = [None] * len(bodies)
    start = time.perf_counter()

    def send(i):
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            out[i] = _stream(base, bodies[i])
        except OSError as e:  # counted below: one clear error, not a thread traceback each
            out[i] = {"error": f"{type(e).__name__}: {e}"}
            return
        out[i]["sched"] = start + arrivals[i]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r["error"] for r in out if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(out)} requests failed; the first: {failed[0]}")
    tokens = sum(r["tokens"] for r in out)
    span = max(r["end"] for r in out) - start
    lat = np.array([r["end"] - r["sched"] for r in out])
    ttft = np.array([r["first"] - r["sched"] for r in out])
    return {
        "tok_s": tokens / span,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "ttft": float(np.percentile(ttft, 50)),
        "texts": [r["text"] for r in out],
        "tokens": tokens,
        "span": span,
    }


def _closed_loop(base: str, bodies: list[dict], streams: int) -> float:
    """`streams` clients each sending its share back to back; wall seconds."""
    t = time.perf_counter()
    threads = [
        threading.Thread(target=lambda k=k: [_stream(base, b) for b in bodies[k::streams]])
        for k in range(streams)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, small load")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block", "--layer", dest="block", type=int, default=12, help="steered block")
    p.add_argument("--requests", type=int, default=None, help="requests in the load (32)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--slots", type=int, default=None, help="engine slots (16; --quick: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="skip transformers serve")
    args = p.parse_args(argv)
    n = args.requests or (24 if args.quick else 32)
    # more requests than slots, so static batches must wait for whole batches
    args.slots = args.slots or (8 if args.quick else 16)
    # Arrivals faster than any of the servers can answer: throughput is then capacity.
    rate = args.rate or (200.0 if args.quick else 4.0)
    lo, hi = (8, 32) if args.quick else (16, 128)

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if args.quick:
        model, block, d_model = str(_tiny_checkpoint(tmp / "tiny")), 1, 64
    else:
        from mup._resolve import resolve_spec
        from mup.models import config_from_hf, read_hf_config

        model, block = args.model, args.block
        d_model = config_from_hf(read_hf_config(resolve_spec(model))).d_model
    v = np.random.default_rng(0).normal(size=d_model).astype(np.float32)
    np.save(tmp / "vector.npy", v / np.linalg.norm(v) * 4.0)
    probe = _probe_file(tmp / "probe.safetensors", d_model, block + 1)  # the block's output

    from mup.text import load_tokenizer

    rng = np.random.default_rng(args.seed)
    # Prompts up to 384 tokens (the stakes data runs to ~1300): slots of 512 tokens then hold
    # every request, and each server's warm-up compiles only the shapes such a load needs.
    chats = _prompts(n, args.seed, load_tokenizer(model), MAX_PROMPT)
    max_tokens = rng.integers(lo, hi + 1, size=n)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    bodies = [
        {"model": "bench", "messages": chats[i], "max_tokens": int(max_tokens[i]),
         "temperature": 0, "steer_multiplier": MULTIPLIERS[i % len(MULTIPLIERS)]}
        for i in range(n)
    ]  # fmt: skip
    print(
        f"load: {n} requests, Poisson {rate:g}/s, max_tokens {lo}..{hi}, "
        f"{len(MULTIPLIERS)} multipliers; model {model}, steered block {block}"
    )

    def mup_cmd(port, *extra):
        return [
            sys.executable, "-m", "mup.serve", "--model", model, "--vector",
            f"v={tmp / 'vector.npy'}", "--block", str(block), "--port", str(port),
            "--served-name", "bench", "--max-tokens-per-request", str(hi),
            "--default-max-tokens", str(lo), "--max-context", str(MAX_CONTEXT), *extra,
        ]  # fmt: skip

    results = {}
    for key, extra, label in [
        ("a", ["--max-batch", str(args.slots)], "(a) engine, continuous batching"),
        ("b", ["--max-batch", "1"], "(b) one request at a time"),
        ("c", ["--max-batch", str(args.slots), "--static-batches"], "(c) static batches"),
    ]:
        port = _free_port()
        with _server(mup_cmd(port, *extra), tmp, port, f"mup-{key}") as base:
            _open_loop(base, bodies, arrivals)  # untimed: compiles every shape the load needs
            results[key] = _open_loop(base, bodies, arrivals)
        r = results[key]
        print(
            f"{label:<34} {r['tok_s']:8.1f} tok/s  p50 {r['p50']:7.2f}s  p99 {r['p99']:7.2f}s  "
            f"TTFT p50 {r['ttft']:6.2f}s"
        )
    a, b, c = results["a"], results["b"], results["c"]
    print(f"throughput (a)/(c): {a['tok_s'] / c['tok_s']:.2f}x (target >= 1.5x)")
    print(f"throughput (a)/(b): {a['tok_s'] / b['tok_s']:.2f}x (target >= 3x)")
    print(f"p50 TTFT (a)/(c):   {a['ttft'] / c['ttft']:.2f}x (target <= 0.25x)")
    same = a["texts"] == b["texts"] == c["texts"]
    print(f"identical texts in (a), (b), (c): {same}")

    # Multiplier 0 against transformers' own continuous-batching server.
    zero = [{**b_, "steer_multiplier": 0.0} for b_ in bodies]
    tf_exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    if args.no_transformers:
        print("transformers serve: skipped (--no-transformers)")
    elif not Path(tf_exe).exists():
        print("transformers serve: skipped (no `transformers` command in this environment)")
    else:
        port = _free_port()
        with _server(mup_cmd(port, "--max-batch", str(args.slots)), tmp, port, "mup-0") as base:
            _open_loop(base, zero, arrivals)
            ours = _open_loop(base, zero, arrivals)
        weights = _safetensors_copy(model, tmp / "hf") if not args.quick else Path(model)
        port = _free_port()
        cmd = [tf_exe, "serve", str(weights), "--continuous-batching", "--port", str(port),
               "--device", "cpu", "--dtype", "float32"]  # fmt: skip
        try:
            with _server(cmd, tmp, port, "transformers") as base:
                theirs_bodies = [{**b_, "model": str(weights)} for b_ in zero]
                for b_ in theirs_bodies:
                    b_.pop("steer_multiplier")
                _open_loop(base, theirs_bodies, arrivals)
                theirs = _open_loop(base, theirs_bodies, arrivals)
            print(
                f"multiplier 0: mup {ours['tok_s']:.1f} tok/s vs transformers serve "
                f"--continuous-batching {theirs['tok_s']:.1f} tok/s: "
                f"{ours['tok_s'] / theirs['tok_s']:.2f}x (target >= 2x); TTFT p50 "
                f"{ours['ttft']:.2f}s vs {theirs['ttft']:.2f}s"
            )
        except (RuntimeError, TimeoutError) as e:
            print(f"transformers serve: skipped ({str(e).splitlines()[0]})")

    # Probe scoring overhead: 7 concurrent streams, with and without --probe.
    times = {}
    for key, extra in [("plain", []), ("probe", ["--probe", str(probe)])]:
        port = _free_port()
        cmd = mup_cmd(port, "--max-batch", str(args.slots), *extra)
        with _server(cmd, tmp, port, f"mup-{key}") as base:
            _closed_loop(base, bodies, 7)
            times[key] = _closed_loop(base, bodies, 7)
    overhead = times["probe"] / times["plain"] - 1
    print(
        f"probe scoring at 7 streams: {times['probe']:.2f}s vs {times['plain']:.2f}s without: "
        f"{100 * overhead:+.1f}% (target <= 5%)"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
