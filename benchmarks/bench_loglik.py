"""Log-likelihood multiple choice in process: the shared-prefix route (each sample's prompt
prefilled once, every choice scored from its KV cache) against the engine-rows route (every
prompt + choice one engine row), on `mc_easy_ll` (73 items, 4 choices) with the embedded default
model (SmolLM2-135M-Instruct), CPU.

One inspect eval per route and repetition, every multiplier of --multipliers a model of that
eval (a random vector of norm --norm at block --block), as `mup evals run` runs a sweep. Each
route first runs the whole task once untimed (its programs compile), then the timed runs
alternate between the routes (rows, prefix, rows, prefix, ...) so that a change of load on the
machine hits both. Checks that both routes give the same accuracy and log-likelihoods.

    python benchmarks/bench_loglik.py                 # 73 items x multipliers -4,0,4, 2 reps
    python benchmarks/bench_loglik.py --quick         # 12 items x multiplier 0, 1 rep
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROUTES = ("rows", "prefix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 items, multiplier 0, 1 rep")
    parser.add_argument("--multipliers", default=None, help="comma list (default -4,0,4)")
    parser.add_argument(
        "--block", "--layer", type=int, default=19, help="steered block (the demo's)"
    )
    parser.add_argument("--norm", type=float, default=8.0, help="the random vector's norm")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per route (2)")
    args = parser.parse_args()
    multipliers = [0.0] if args.quick else [-4.0, 0.0, 4.0]
    if args.multipliers is not None:
        try:
            multipliers = [float(x) for x in args.multipliers.split(",")]
        except ValueError:
            parser.error(f"--multipliers: {args.multipliers!r} is not a comma list of numbers")
    reps = args.reps or (1 if args.quick else 2)

    from inspect_ai import eval
    from inspect_ai.dataset import MemoryDataset
    from inspect_ai.model import get_model

    import mup.evals  # noqa: F401 - registers the mup/ provider
    from mup import _compile_cache
    from mup.evals import mc_easy_ll

    _compile_cache.enable()
    tmp = Path(tempfile.mkdtemp(prefix="bench_loglik_"))
    vector = tmp / "vector.npy"
    v = np.random.default_rng(0).standard_normal(576).astype(np.float32)
    np.save(vector, v / np.linalg.norm(v) * args.norm)
    task = mc_easy_ll()
    if args.quick:
        task.dataset = MemoryDataset(list(task.dataset)[:12], name="mc_easy_ll")
    n_items = len(task.dataset)

    def run(route: str, label: str):
        models = [
            get_model(
                "mup/smollm2-135m", memoize=False, multiplier=m, vector=str(vector),
                block=args.block, loglik=route,
            )
            for m in multipliers
        ]  # fmt: skip
        started = time.perf_counter()
        logs = eval(task, model=models, log_dir=str(tmp / label), display="none")
        seconds = time.perf_counter() - started
        if [log.status for log in logs] != ["success"] * len(models):
            raise SystemExit(f"{label}: {[log.error for log in logs]}")
        scores = {
            (float(log.eval.model_args["multiplier"]), s.id): s.scores["loglik_choice"]
            for log in logs
            for s in log.samples
        }
        print(f"  [{label}] {seconds:.1f} s", flush=True)
        return seconds, scores

    print(
        f"mc_easy_ll: {n_items} items x {len(multipliers)} multipliers {multipliers} "
        f"(random vector, norm {args.norm:g}, block {args.block}); {reps} timed runs per route",
        flush=True,
    )
    results = {route: run(route, f"{route} warm-up")[1] for route in ROUTES}
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    for rep in range(reps):
        for route in ROUTES:
            seconds, _ = run(route, f"{route} {rep + 1}")
            times[route].append(seconds)

    rows, prefix = results["rows"], results["prefix"]
    diff = max(
        float(np.max(np.abs(np.subtract(prefix[k].metadata["loglik"], s.metadata["loglik"]))))
        for k, s in rows.items()
    )
    same = sum(prefix[k].value == s.value for k, s in rows.items())
    for m in multipliers:
        acc = {
            r: np.mean([results[r][k].value["acc"] == "C" for k in results[r] if k[0] == m])
            for r in ROUTES
        }
        print(f"  m = {m:+g}: acc rows {acc['rows']:.3f}, prefix {acc['prefix']:.3f}")
    print(
        f"scores equal on {same}/{len(rows)} samples; largest log-likelihood difference {diff:.2g}"
    )
    n = n_items * len(multipliers)
    for route in ROUTES:
        med = statistics.median(times[route])
        runs = ", ".join(f"{t:.1f}" for t in times[route])
        print(f"  {route:7s} median {med:7.1f} s ({runs}), {n / med:6.1f} samples/s")
    ratio = statistics.median(times["rows"]) / statistics.median(times["prefix"])
    print(f"speed-up prefix / rows: {ratio:.2f}x")
    if diff > 1e-3 or same != len(rows):
        raise SystemExit("the two routes disagree")


if __name__ == "__main__":
    main()
