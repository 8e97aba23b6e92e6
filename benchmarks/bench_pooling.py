"""Pooling over ragged float16 activations: mup's C++ kernels vs the numpy fallback vs JAX.

Axis letters: T tokens, N sequences, D width, G tokens of one JAX group, R rows of a group.

The data: N sequences of 50..2000 tokens (uniform), D = 2048, float16, about 1 GiB (64 MiB
with --quick), pooled to [N, D] float32 by every method. Reported per kernel: GB/s of
activations read (bytes of acts / wall time) for

  native  mup.native.pool with --threads threads (default 2, this machine's cores)
  numpy   the same call forced onto the numpy fallback (what runs without the build)
  jax     a jitted jax.ops.segment_* version over groups of rows (one compiled program per
          method; the activations are put on the device before timing)

and the ratios native/copy (a plain np.copyto of the same bytes, measured in the same run),
native/numpy and native/jax. Every path is warmed up first (JAX: compiled); timed stages end
with block_until_ready. The three results are compared so that a fast wrong kernel shows.

    python benchmarks/bench_pooling.py            # full run, ~1 GiB
    python benchmarks/bench_pooling.py --quick    # ~64 MiB smoke run, < 30 s
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import mup.native as mn

METHODS = mn.POOL_METHODS
WINDOW = 40
TEMPERATURE = 1.0


def make_data(target_bytes: int, d: int, pad: int, seed: int = 0):
    """acts [T + pad, D] float16 (the last `pad` rows zero, for JAX's fixed-size slices),
    offsets [N+1], scores [T + pad]."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) * d * 2 < target_bytes:
        lengths.append(int(rng.integers(50, 2001)))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    t = int(offsets[-1])
    acts = np.zeros((t + pad, d), np.float16)
    step = 8192  # fill in slices: a float32 temporary of the whole set would be 2x its size
    for i in range(0, t, step):
        j = min(t, i + step)
        acts[i:j] = rng.standard_normal((j - i, d), dtype=np.float32)
    scores = np.zeros(t + pad, np.float32)
    scores[:t] = rng.standard_normal(t, dtype=np.float32)
    return acts, offsets, scores


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest of `repeats` calls of fn (which must block until
    done); cpu is this process's CPU time, all threads together."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


# ------------------------------------------------------------------ JAX version


def jax_groups(offsets: np.ndarray, g: int):
    """Split rows into consecutive groups of <= g tokens; per group the arrays a jitted
    segment-op program needs, padded to fixed shapes [G] / [R] so one program serves all."""
    n = offsets.shape[0] - 1
    bounds = [0]
    while bounds[-1] < n:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(offsets, offsets[r0] + g, side="right")) - 1
        bounds.append(max(r1, r0 + 1))
    r = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    groups = []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        start = int(offsets[r0])
        local = offsets[r0 : r1 + 1] - start  # [rows + 1]
        lens = np.diff(local)
        seg = np.full(g, r, np.int32)  # padding tokens get segment r: dropped by segment ops
        seg[: local[-1]] = np.repeat(np.arange(r1 - r0, dtype=np.int32), lens)
        row_start = np.zeros(r, np.int32)
        row_start[: r1 - r0] = local[:-1]
        last = np.zeros(r, np.int32)
        last[: r1 - r0] = local[1:] - 1
        counts = np.ones(r, np.float32)
        counts[: r1 - r0] = lens
        arrays = tuple(jnp.asarray(a) for a in (seg, row_start, last, counts))
        groups.append((r0, r1, np.int32(start), arrays))
    return groups, r


@functools.partial(jax.jit, static_argnames=("method", "g", "r", "window"))
def jax_pool_group(x, scores, start, seg, row_start, last, counts, *, method, g, r, window):
    xs = jax.lax.dynamic_slice_in_dim(x, start, g, axis=0).astype(jnp.float32)  # [G, D]
    segc = jnp.minimum(seg, r - 1)  # [G] gather-safe segment ids
    if method in ("sum", "mean"):
        s = jax.ops.segment_sum(xs, seg, num_segments=r)  # [R, D]
        return s if method == "sum" else s / counts[:, None]
    if method == "max":
        return jax.ops.segment_max(xs, seg, num_segments=r)
    if method == "min":
        return jax.ops.segment_min(xs, seg, num_segments=r)
    if method == "last":
        return xs[last]
    if method == "softmax":
        z = jax.lax.dynamic_slice_in_dim(scores, start, g) / TEMPERATURE  # [G]
        e = jnp.exp(z - jax.ops.segment_max(z, seg, num_segments=r)[segc])
        w = e / jax.ops.segment_sum(e, seg, num_segments=r)[segc]
        return jax.ops.segment_sum(xs * w[:, None], seg, num_segments=r)
    if method == "rolling_mean_max":
        cs = jnp.concatenate([jnp.zeros((1, xs.shape[1])), jnp.cumsum(xs, axis=0)])  # [G+1, D]
        t = jnp.arange(g)
        lo = t + 1 - window  # first token of the window ending at t
        valid = (lo >= row_start[segc]) & (seg < r)
        win = (cs[t + 1] - cs[jnp.maximum(lo, 0)]) / window  # [G, D]
        best = jax.ops.segment_max(jnp.where(valid[:, None], win, -jnp.inf), seg, num_segments=r)
        mean = jax.ops.segment_sum(xs, seg, num_segments=r) / counts[:, None]
        return jnp.where((counts <= window)[:, None], mean, best)
    raise ValueError(method)


def jax_pool(x, scores, groups, r, g, method, n, d):
    outs = [
        jax_pool_group(x, scores, start, *arrs, method=method, g=g, r=r, window=WINDOW)
        for _, _, start, arrs in groups
    ]
    jax.block_until_ready(outs)
    return outs


def assemble(outs, groups, n, d):
    res = np.empty((n, d), np.float32)
    for (r0, r1, _, _), o in zip(groups, outs, strict=True):
        res[r0:r1] = np.asarray(o)[: r1 - r0]
    return res


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~64 MiB smoke run (< 30 s)")
    ap.add_argument("--mib", type=float, default=1024.0, help="size of the activations, MiB")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the fast stages")
    args = ap.parse_args()
    target = (64 << 20) if args.quick else int(args.mib * (1 << 20))
    repeats = 1 if args.quick else args.repeats
    d = args.dim
    g = max(2048, (32 << 20) // (2 * d))  # JAX group: 32 MiB of float16, >= the longest row

    acts_padded, offsets, scores_padded = make_data(target, d, pad=g)
    n, t = offsets.shape[0] - 1, int(offsets[-1])
    acts, scores = acts_padded[:t], scores_padded[:t]
    nbytes = acts.nbytes
    print(
        f"acts: {t} tokens x D={d} float16 = {nbytes / 2**30:.3f} GiB in N={n} sequences; "
        f"native threads={args.threads}; backend available: {mn.native_available()}"
    )

    copy_dst = [np.empty_like(acts)]
    np.copyto(copy_dst[0], acts)  # warm-up: page in the destination
    t_copy, cpu_copy = best_time(lambda: np.copyto(copy_dst[0], acts), repeats)
    copy_dst.clear()  # free the second GiB before the other stages
    copy_gbs = nbytes / t_copy / 1e9

    def call(method, **kw):
        sc = scores if method == "softmax" else None
        return mn.pool(acts, offsets, method=method, scores=sc, window=WINDOW, **kw)

    # Stages run one after the other (native, numpy, then JAX) so that no JAX thread pool or
    # asynchronous device_put competes with the native timings for the CPU.
    native, numpy_res, t_native, cpu_native, t_numpy = {}, {}, {}, {}, {}
    for m in METHODS:
        t_native[m] = cpu_native[m] = float("nan")
        if mn.native_available():
            with mn.use_backend("native"):
                native[m] = call(m, num_threads=args.threads)  # warm-up
                t_native[m], cpu_native[m] = best_time(
                    lambda m=m: call(m, num_threads=args.threads), repeats
                )
        with mn.use_backend("numpy"):
            t0 = time.perf_counter()
            numpy_res[m] = call(m)  # no warm-up needed: nothing to compile, minutes to run
            t_numpy[m] = time.perf_counter() - t0

    x_dev = jax.block_until_ready(jax.device_put(acts_padded))
    s_dev = jax.block_until_ready(jax.device_put(scores_padded))
    groups, r = jax_groups(offsets, g)
    rows = []
    for m in METHODS:
        jax_pool(x_dev, s_dev, groups[:1], r, g, m, n, d)  # compile
        t0 = time.perf_counter()
        outs = jax_pool(x_dev, s_dev, groups, r, g, m, n, d)
        t_jax = time.perf_counter() - t0
        jax_res = assemble(outs, groups, n, d)
        ref = numpy_res[m]
        scale = float(np.abs(ref).max())
        err_native = float(np.abs(native[m] - ref).max()) / scale if m in native else float("nan")
        err_jax = float(np.abs(jax_res - ref).max()) / scale
        rows.append((m, t_native[m], t_numpy[m], t_jax, err_native, err_jax, cpu_native[m]))

    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    print(f"\ncopy (np.copyto of the same bytes): {copy_gbs:.2f} GB/s\n")
    head = (
        f"{'kernel':<18}{'native GB/s':>12}{'numpy GB/s':>12}{'jax GB/s':>10}"
        f"{'native/copy':>13}{'native/numpy':>14}{'native/jax':>12}{'err native':>11}"
        f"{'err jax':>9}{'per core':>10}"
    )
    print(head)
    print("-" * len(head))
    for m, tn, tp, tj, en, ej, cn in rows:
        print(
            f"{m:<18}{gbs(tn):>12.2f}{gbs(tp):>12.2f}{gbs(tj):>10.2f}{gbs(tn) / copy_gbs:>12.0%}"
            f"{tp / tn:>13.1f}x{tj / tn:>11.1f}x{en:>11.1e}{ej:>9.1e}{cpu_copy / cn:>10.0%}"
        )
    print(
        "\nerr = max |result - numpy fallback| / max |numpy fallback| per kernel. GB/s = bytes "
        "of float16 activations read per second; 'last' reads one token per sequence, so its "
        "GB/s is nominal. per core = copy CPU seconds / native CPU seconds (all threads): "
        "the native/copy ratio a core achieves when the machine is shared (wall ratios then "
        "depend on how much CPU the other processes leave)."
    )


if __name__ == "__main__":
    main()
