"""Benchmark the activation store against what a user would do instead, in one run.

1. Local write throughput of `mup.store` (rows in random order within windows, the extractor's
   pattern) vs the disk's plain write bandwidth: np.tofile of the same bytes + fsync.
2. Bytes on disk vs the dense padded float16 tensor [N, max_len, D] for the same ragged data.
3. Read-back throughput (iter_row_chunks) vs np.fromfile of the plain file.
4. S3 on a real moto server process on loopback: tensorstore's s3 kvstore vs encoding shards
   locally and uploading them with boto3 (the two `s3_upload` modes), same data.

Activations are synthetic but shaped like real residuals (per-channel offsets and scales with a
few massive channels, float16); real SmolLM2 residuals compress the same (~1.07x with zstd).

usage: python benchmarks/bench_store.py [--quick] [--tokens T] [--d-model D] [--layers K]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

import mup.store as store

JOB = {
    "model": "bench",
    "model_revision": "none",
    "dataset": "synthetic",
    "dataset_sha256": "0" * 64,
    "site": "residual",
    "mask_mode": "all",
    "tokenizer": "bench",
    "max_tokens": None,
}


def make_data(n_tokens: int, d_model: int, n_layers: int, seed: int = 0):
    """Ragged lengths (lognormal, like chat records) and residual-like float16 activations."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n_tokens:
        lengths.append(int(np.clip(rng.lognormal(np.log(180), 0.9), 8, 2048)))
    lengths[-1] -= sum(lengths) - n_tokens
    lengths = np.array([x for x in lengths if x > 0])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [N+1]
    acts = {}
    for layer in range(n_layers):
        center = rng.normal(0, 0.5, d_model).astype(np.float32)  # [D]
        scale = rng.lognormal(0, 0.5, d_model).astype(np.float32)  # [D]
        scale[rng.choice(d_model, 4, replace=False)] *= 30  # massive-activation channels
        a = rng.standard_normal((n_tokens, d_model), dtype=np.float32)  # [T, D]
        acts[layer * 4 + 2] = (a * scale + center).astype(np.float16)
    return offsets, acts


def cpu_seconds() -> float:
    """CPU time of this process, all threads (tensorstore encodes on its own thread pool)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_store(url, offsets, acts, *, window_tokens=32768, batch_tokens=8192, **kw) -> float:
    """Write every record the way the extractor does; return seconds."""
    n = offsets.size - 1
    t = int(offsets[-1])
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    w = store.create(
        url,
        layers=list(acts),
        d_model=next(iter(acts.values())).shape[1],
        offsets=offsets,
        ids=[str(i) for i in range(n)],
        input_ids=np.zeros(t, np.int32),
        roles=np.zeros(t, np.uint8),
        mask=np.ones(t, bool),
        attrs=JOB,
        overwrite=True,
        **kw,
    )
    row = 0
    while row < n:
        end = int(np.searchsorted(offsets, offsets[row] + window_tokens, side="right"))
        window = rng.permutation(np.arange(row, max(end - 1, row + 1)))
        batch: list[int] = []
        for r in window.tolist() + [None]:
            if r is not None:
                batch.append(r)
            size = sum(int(offsets[x + 1] - offsets[x]) for x in batch)
            if batch and (r is None or size >= batch_tokens):
                b = np.array(batch)
                w.write(
                    b,
                    {
                        k: np.concatenate([a[offsets[x] : offsets[x + 1]] for x in b])
                        for k, a in acts.items()
                    },
                )
                batch = []
        row = max(end - 1, row + 1)
    w.finalize()
    return time.perf_counter() - t0


def plain_write(path: Path, acts) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for a in acts.values():
            a.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def moto_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    return proc, endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 30 s)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=576, help="576 = SmolLM2-135M")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    n_tokens = args.tokens or (16384 if args.quick else 262144)
    s3_tokens = min(n_tokens, 8192 if args.quick else 65536)
    scratch = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        offsets, acts = make_data(n_tokens, args.d_model, args.layers)
        n, nbytes = offsets.size - 1, sum(a.nbytes for a in acts.values())
        lengths = np.diff(offsets)
        print(
            f"data: N={n} records, T={n_tokens} tokens (mean {lengths.mean():.0f}, max "
            f"{lengths.max()}), D={args.d_model}, {args.layers} layers, "
            f"{nbytes / 1e6:.1f} MB float16"
        )
        # warm-up: first tensorstore open / thread pools, not timed
        warm_off, warm_acts = make_data(2048, args.d_model, args.layers, seed=9)
        write_store(scratch / "warm", warm_off, warm_acts)

        c0 = cpu_seconds()
        t_store = write_store(scratch / "store", offsets, acts)
        c1 = cpu_seconds()
        t_plain = plain_write(scratch / "plain.bin", acts)
        c2 = cpu_seconds()
        on_disk = du(scratch / "store")
        print(
            f"local write: mup.store {nbytes / t_store / 1e6:.0f} MB/s "
            f"({n_tokens / t_store:,.0f} tok/s) | np.tofile+fsync {nbytes / t_plain / 1e6:.0f} MB/s"
            f" | store/plain = {t_plain / t_store:.2f}x"
        )
        print(
            f"local write CPU: mup.store {c1 - c0:.2f} s ({nbytes / (c1 - c0) / 1e6:.0f} MB per "
            f"CPU-second: copy, finiteness check, zstd) | np.tofile+fsync {c2 - c1:.2f} s; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        dense = n * int(lengths.max()) * args.d_model * 2 * args.layers
        print(
            f"bytes on disk: store {on_disk / 1e6:.1f} MB, dense padded float16 [N, max_len, D] "
            f"{dense / 1e6:.1f} MB -> {dense / on_disk:.2f}x smaller "
            f"(ragged {dense / nbytes:.2f}x * compression {nbytes / on_disk:.3f}x)"
        )
        st = store.open(scratch / "store")
        t0 = time.perf_counter()
        for layer in st.layers:
            for _ in st.iter_row_chunks(layer, max_bytes=64 << 20):
                pass
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.fromfile(scratch / "plain.bin", np.float16)
        t_fread = time.perf_counter() - t0
        print(
            f"read (page cache warm): iter_row_chunks {nbytes / t_read / 1e6:.0f} MB/s | "
            f"np.fromfile {nbytes / t_fread / 1e6:.0f} MB/s"
        )
        if args.no_s3:
            return
        proc, endpoint = moto_server()
        try:
            os.environ.update(
                AWS_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
            )
            for name in ("R2_ACCOUNT_ID", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
                os.environ.pop(name, None)
            loc = store.parse_location("s3://bench/x")
            loc.boto3_client().create_bucket(Bucket="bench")
            s3_off = offsets[: int(np.searchsorted(offsets, s3_tokens)) + 1]
            s3_t = int(s3_off[-1])
            s3_acts = {k: a[:s3_t] for k, a in acts.items()}
            s3_bytes = sum(a.nbytes for a in s3_acts.values())
            # Shards of ~4 MiB so that both paths move several objects even in --quick.
            kw = dict(chunk_tokens=512, shard_tokens=4096)
            times = {}
            for mode in ("tensorstore", "boto3", "tensorstore", "boto3"):  # 2 rounds, keep best
                t = write_store(f"s3://bench/{mode}", s3_off, s3_acts, s3_upload=mode, **kw)
                times[mode] = min(times.get(mode, 1e9), t)
            print(
                f"S3 (moto, loopback, {s3_bytes / 1e6:.1f} MB): tensorstore kvstore "
                f"{s3_bytes / times['tensorstore'] / 1e6:.1f} MB/s | boto3 upload "
                f"{s3_bytes / times['boto3'] / 1e6:.1f} MB/s | tensorstore/boto3 = "
                f"{times['boto3'] / times['tensorstore']:.2f}x (default: {store.DEFAULT_S3_UPLOAD})"
            )
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
