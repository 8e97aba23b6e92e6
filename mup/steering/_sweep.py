"""Behaviour sweep of steering vectors: generate, score and summarise across multipliers.

Axis letters: B prompts in a generate call, M multipliers, R rows (B * M), T tokens, D width.

Multiplier convention: RAW. Row multiplier m adds ``m * v`` to the output of block `block`, v
being the vector exactly as stored in its file (the convention of the steering study, whose
BiPO vectors were swept over -20..+20). The file's norm is recorded in every row
(`vector_norm`, `added_norm` = |m| * norm, `unit` = "raw") so that sweeps of vectors with
different norms can be compared. The multiplier 0 is always part of the grid (it is added when
missing): it is the reference for `propensity_delta` and for the coherent range.

Per answer (one `sweep.jsonl` row):
  answer, n_tokens   the new tokens decoded; their count, the stop token excluded.
  hit_limit          the row produced max_new_tokens tokens without a stop token.
  perplexity         exp(mean NLL) of the answer tokens (the generated ids, stop token
                     excluded) under the UNSTEERED model, the chat-templated prompt as context;
                     None for an empty answer.
  propensity         pairs only: log p(chosen) - log p(rejected) of the prompt's pair under the
                     model steered with m (summed over response tokens, `_bipo.pair_margins`).
  propensity_delta   propensity minus its value at m = 0.

Summary per (vector, multiplier): mean propensity, mean delta with a 95% t-interval, mean and
median perplexity, hit-limit rate, mean answer length. The coherent range of a vector is the
contiguous run of multipliers around 0 whose median perplexity is within `coherence_factor` of
the median at m = 0 (ratio in [1/f, f]).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mup._renamed import renamed_field
from mup.steering._pairs import PreferencePair
from mup.steering._vector import SteeringVector

DEFAULT_MULTIPLIERS = tuple(float(m) for m in range(-20, 21, 2))
UNIT = "raw"
# Perplexity rows are padded to a multiple of this many tokens (few compiled programs).
PPL_LENGTH_MULTIPLE = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepPrompt:
    """One prompt of the sweep; `pair` is set when it comes from a pairs file."""

    id: str
    messages: tuple[dict[str, str], ...]
    pair: PreferencePair | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepVector:
    """A vector to sweep, with the file name rows refer to it by."""

    name: str
    vector: SteeringVector


def parse_multipliers(text: str) -> tuple[float, ...]:
    """'-2,0,2' or 'start:stop:step' (stop included), e.g. '-20:20:2'. Raises ValueError."""
    text = text.strip()
    if not text:
        raise ValueError("--multipliers: empty list")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"--multipliers: {text!r} is not start:stop:step")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"--multipliers: {text!r} has a part that is not a number") from None
        if not step > 0 or not math.isfinite(start) or not math.isfinite(stop):
            raise ValueError(f"--multipliers: {text!r} needs finite bounds and a step > 0")
        if stop < start:
            raise ValueError(f"--multipliers: {text!r} has stop < start")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        if n > 1000:
            raise ValueError(f"--multipliers: {text!r} gives {n} values, more than 1000")
        values = [round(start + i * step, 10) for i in range(n)]
    else:
        values = []
        for item in text.split(","):
            try:
                v = float(item)
            except ValueError:
                raise ValueError(f"--multipliers: {item.strip()!r} is not a number") from None
            if not math.isfinite(v):
                raise ValueError(f"--multipliers: {item.strip()!r} is not finite")
            values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f"--multipliers: {text!r} repeats a value")
    return tuple(values)


def with_zero(multipliers: Sequence[float]) -> tuple[float, ...]:
    """The grid, sorted, with 0 added when missing."""
    return tuple(sorted({float(m) for m in multipliers} | {0.0}))


def prompts_from_pairs(pairs: Sequence[PreferencePair]) -> list[SweepPrompt]:
    return [SweepPrompt(id=p.id, messages=tuple(p.prompt), pair=p) for p in pairs]


def prompts_from_records(path) -> list[SweepPrompt]:
    """Prompts from a chat data set (`mup.data.load_records`): each record's messages up to and
    including its last user message (a trailing assistant answer is what the sweep replaces)."""
    from mup.data import load_records

    out = []
    for rec in load_records(path).records:
        msgs = [m.as_dict() for m in rec.messages]
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError(f"{rec.source}: record {rec.id!r} has no user message")
        out.append(SweepPrompt(id=rec.id, messages=tuple(msgs[: last_user + 1])))
    return out


def row_key(vector: str, multiplier: float, prompt_id: str) -> tuple[str, float, str]:
    return (vector, float(multiplier), prompt_id)


def read_rows(path: Path) -> list[dict]:
    """Rows of an existing sweep.jsonl; a torn last line (a killed run) is dropped. Rows written
    before the rename name the steered block ``layer``; they are read as ``block``."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(renamed_field(json.loads(line), "layer", "block"))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line, cut by a kill: it is redone
                continue
            raise ValueError(
                f"{path}:{i + 1}: not valid JSON; delete the file to start over"
            ) from None
    return rows


@functools.partial(jax.jit, static_argnames=("config",))
def _answer_logprobs(params, tokens, valid, answer, *, config):
    """Sum of log p(token) over the answer tokens of each row, unsteered: [R] float32."""
    from mup.models import forward

    r, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (r, t))  # right-padded rows
    logits = forward(params, tokens, positions, config=config, valid=valid).logits  # [R, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [R, T-1, V]
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [R, T-1]
    return jnp.sum(jnp.where(answer[:, 1:], picked, 0.0), axis=1)  # [R]


def perplexities(model, prompt_ids: Sequence[Sequence[int]], answer_ids, *, batch_rows: int):
    """exp(mean NLL) of each answer given its prompt ids under the unsteered model: list of
    float (None for an empty answer). Rows run `batch_rows` at a time, padded to one length."""
    n = len(prompt_ids)
    out: list[float | None] = [None] * n
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
    t = -(-max(lengths) // PPL_LENGTH_MULTIPLE) * PPL_LENGTH_MULTIPLE
    for s in range(0, n, batch_rows):
        idx = list(range(s, min(n, s + batch_rows)))
        tokens = np.zeros((batch_rows, t), np.int32)  # [R, T]
        valid = np.zeros((batch_rows, t), bool)
        resp = np.zeros((batch_rows, t), bool)
        for r, i in enumerate(idx):
            p, a = list(prompt_ids[i]), list(answer_ids[i])
            tokens[r, : len(p) + len(a)] = p + a
            valid[r, : len(p) + len(a)] = True
            resp[r, len(p) : len(p) + len(a)] = True
        valid[len(idx) :, 0] = True  # padding rows: one valid token, no response
        logp = np.asarray(
            _answer_logprobs(
                model.params,
                jnp.asarray(tokens),
                jnp.asarray(valid),
                jnp.asarray(resp),
                config=model.config,
            )
        )
        for r, i in enumerate(idx):
            k = len(answer_ids[i])
            if k:
                out[i] = float(math.exp(-float(logp[r]) / k))
    return out


def propensities(model, pairs, vector: SteeringVector, multipliers, *, batch_size: int):
    """{m: float32 [P] chosen-minus-rejected margins at m} for every m of the grid."""
    from mup.steering._bipo import pair_margins
    from mup.steering._pairs import encode_pairs

    encoded = encode_pairs(model.tokenizer, pairs)
    bs = min(batch_size, len(pairs))
    return {
        float(m): pair_margins(model, encoded, vector.vector, vector.block, m, batch_size=bs)
        for m in multipliers
    }


def run_sweep(
    model,
    vectors: Sequence[SweepVector],
    prompts: Sequence[SweepPrompt],
    multipliers: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Sweep every vector over `multipliers` (0 added) on `prompts`; append rows to
    ``out_dir/sweep.jsonl`` as they are made, skipping (vector, multiplier, prompt) rows already
    there. Returns all rows of the requested sweep (old and new).

    batch_size: prompts per generate call; each call has batch_size * len(grid) rows.
    """
    from mup.models import Steering, generate

    if not prompts:
        raise ValueError("no prompts to sweep")
    if len({p.id for p in prompts}) != len(prompts):
        raise ValueError("prompt ids are not unique")
    grid = with_zero(multipliers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.jsonl"
    existing = read_rows(path)
    # Drop a torn tail before appending, so the file stays one row per line.
    if existing or path.exists():
        _rewrite(path, existing)
    done = {row_key(r["vector"], r["multiplier"], r["prompt_id"]): r for r in existing}
    wanted = {row_key(v.name, m, p.id) for v in vectors for m in grid for p in prompts}
    n_todo = len(wanted - set(done))
    if n_todo < len(wanted):
        log(f"resuming: {len(wanted) - n_todo} of {len(wanted)} rows already in {path}")

    bar = None
    if progress and n_todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo, desc="sweep", unit="answer")
    pairs = [p.pair for p in prompts if p.pair is not None]
    has_pairs = len(pairs) == len(prompts)
    with path.open("a") as f:
        for sv in vectors:
            todo = [(p, m) for p in prompts for m in grid if row_key(sv.name, m, p.id) not in done]
            if not todo:
                continue
            margins = None
            if has_pairs:
                margins = propensities(model, pairs, sv.vector, grid, batch_size=batch_size)
                pair_index = {p.id: i for i, p in enumerate(prompts)}
            steering = Steering(sv.vector.block, sv.vector.vector)
            # Whole prompts per call (all their missing multipliers together); fixed row count
            # per call (padded by repeating the first row) so generate compiles once.
            calls = [
                todo[i : i + batch_size * len(grid)]
                for i in range(0, len(todo), batch_size * len(grid))
            ]
            rows_per_call = batch_size * len(grid)
            for call in calls:
                pad = [call[0]] * (rows_per_call - len(call)) if len(calls) > 1 else []
                items = call + pad
                gen = generate(
                    model,
                    [list(p.messages) for p, _ in items],
                    max_new_tokens=max_new_tokens,
                    steering=steering,
                    multipliers=np.asarray([m for _, m in items], np.float32),
                )
                answer_ids = [
                    ids[:-1] if fin else ids
                    for ids, fin in zip(gen.token_ids[: len(call)], gen.finished, strict=False)
                ]
                ppl = perplexities(
                    model, gen.prompt_ids[: len(call)], answer_ids, batch_rows=rows_per_call
                )
                for r, (p, m) in enumerate(call):
                    row: dict[str, Any] = {
                        "vector": sv.name,
                        "block": sv.vector.block,
                        "epoch": sv.vector.epoch,
                        "method": sv.vector.method,
                        "multiplier": float(m),
                        "unit": UNIT,
                        "scale": 1.0,
                        "vector_norm": sv.vector.norm,
                        "added_norm": abs(float(m)) * sv.vector.norm,
                        "prompt_id": p.id,
                        "prompt": list(p.messages),
                        "answer": gen.texts[r],
                        "n_tokens": len(answer_ids[r]),
                        "hit_limit": not gen.finished[r],
                        "max_new_tokens": max_new_tokens,
                        "perplexity": ppl[r],
                    }
                    if margins is not None:
                        i = pair_index[p.id]
                        row["propensity"] = float(margins[float(m)][i])
                        row["propensity_delta"] = float(margins[float(m)][i] - margins[0.0][i])
                    f.write(json.dumps(row) + "\n")
                    done[row_key(sv.name, m, p.id)] = row
                f.flush()
                if bar is not None:
                    bar.update(len(call))
    if bar is not None:
        bar.close()
    return [done[k] for k in sorted(wanted, key=lambda k: (k[0], k[1], k[2]))]


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def summarise(rows: Sequence[dict], *, coherence_factor: float = 2.0) -> list[dict]:
    """One summary row per (vector, multiplier), sorted; see the module docstring."""
    if not coherence_factor > 1:
        raise ValueError(f"coherence_factor must be > 1, got {coherence_factor}")
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["vector"], float(r["multiplier"])), []).append(r)
    out = []
    for (name, m), rs in sorted(groups.items()):
        ppl = np.asarray([r["perplexity"] for r in rs if r["perplexity"] is not None], float)
        s: dict[str, Any] = {
            "vector": name,
            "block": rs[0]["block"],
            "epoch": rs[0]["epoch"],
            "multiplier": m,
            "unit": rs[0].get("unit", UNIT),
            "n": len(rs),
            "mean_perplexity": _none_if_nan(float(ppl.mean())) if ppl.size else None,
            "median_perplexity": _none_if_nan(float(np.median(ppl))) if ppl.size else None,
            "hit_limit_rate": float(np.mean([r["hit_limit"] for r in rs])),
            "mean_tokens": float(np.mean([r["n_tokens"] for r in rs])),
        }
        if all("propensity" in r for r in rs):
            prop = np.asarray([r["propensity"] for r in rs], float)
            delta = np.asarray([r["propensity_delta"] for r in rs], float)
            half = (
                _t95(len(delta)) * delta.std(ddof=1) / math.sqrt(len(delta))
                if len(delta) > 1
                else float("nan")
            )
            s.update(
                mean_propensity=float(prop.mean()),
                mean_delta=float(delta.mean()),
                delta_ci_low=_none_if_nan(float(delta.mean() - half)),
                delta_ci_high=_none_if_nan(float(delta.mean() + half)),
            )
        out.append(s)
    _mark_coherent(out, coherence_factor)
    return out


def _mark_coherent(summary: list[dict], factor: float) -> None:
    """Set `coherent` on every summary row: inside the contiguous run around m = 0."""
    by_vec: dict[str, list[dict]] = {}
    for s in summary:
        by_vec.setdefault(s["vector"], []).append(s)
    for rows in by_vec.values():
        rows.sort(key=lambda s: s["multiplier"])
        for s in rows:
            s["coherent"] = False
        zero = next((i for i, s in enumerate(rows) if s["multiplier"] == 0.0), None)
        if zero is None or rows[zero]["median_perplexity"] is None:
            continue
        ref = rows[zero]["median_perplexity"]

        def ok(s, ref=ref):
            p = s["median_perplexity"]
            return p is not None and ref / factor <= p <= ref * factor

        for step in (1, -1):
            i = zero
            while 0 <= i < len(rows) and ok(rows[i]):
                rows[i]["coherent"] = True
                i += step


def coherent_range(summary: Sequence[dict], vector: str) -> tuple[float, float] | None:
    ms = [s["multiplier"] for s in summary if s["vector"] == vector and s["coherent"]]
    return (min(ms), max(ms)) if ms else None


def best_vectors(summary: Sequence[dict]) -> list[dict]:
    """Per vector: the largest mean propensity gain (mean_delta) within its coherent range, and
    the multiplier it is reached at; sorted best first (propensity needs pairs prompts)."""
    out = []
    for name in sorted({s["vector"] for s in summary}):
        rows = [s for s in summary if s["vector"] == name]
        lo_hi = coherent_range(summary, name)
        inside = [s for s in rows if s["coherent"] and "mean_delta" in s]
        best = max(inside, key=lambda s: s["mean_delta"], default=None)
        out.append(
            {
                "vector": name,
                "block": rows[0]["block"],
                "epoch": rows[0]["epoch"],
                "coherent_low": lo_hi[0] if lo_hi else None,
                "coherent_high": lo_hi[1] if lo_hi else None,
                "best_multiplier": best["multiplier"] if best else None,
                "best_gain": best["mean_delta"] if best else None,
                "best_gain_ci_low": best.get("delta_ci_low") if best else None,
                "best_gain_ci_high": best.get("delta_ci_high") if best else None,
                "median_perplexity": best["median_perplexity"] if best else None,
            }
        )
    out.sort(key=lambda r: -math.inf if r["best_gain"] is None else -r["best_gain"])
    return out


def write_summary(summary: Sequence[dict], best: Sequence[dict], out_dir) -> list[Path]:
    """summary.csv (one row per vector and multiplier) and summary.json (with `best`)."""
    import csv
    import io

    out = Path(out_dir)
    fields: list[str] = []
    for s in summary:
        fields += [k for k in s if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for s in summary:
        w.writerow({k: "" if s.get(k) is None else s.get(k) for k in fields})
    paths = []
    for name, text in (
        ("summary.csv", buf.getvalue()),
        ("summary.json", json.dumps({"rows": list(summary), "best": list(best)}, indent=1)),
    ):
        p = out / name
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def plot_vector(summary: Sequence[dict], vector: str, path) -> Path:
    """Propensity delta (with its 95% CI) and median perplexity vs multiplier, the coherent
    range shaded."""
    from mup._plots import new_figure, save_figure

    rows = sorted((s for s in summary if s["vector"] == vector), key=lambda s: s["multiplier"])
    ms = [s["multiplier"] for s in rows]
    fig, ax = new_figure(figsize=(7, 4))
    lo_hi = coherent_range(summary, vector)
    if lo_hi is not None:
        ax.axvspan(lo_hi[0], lo_hi[1], color="tab:green", alpha=0.12, label="coherent range")
    if all("mean_delta" in s for s in rows):
        d = [s["mean_delta"] for s in rows]
        lo = [s["delta_ci_low"] if s["delta_ci_low"] is not None else s["mean_delta"] for s in rows]
        hi = [
            s["delta_ci_high"] if s["delta_ci_high"] is not None else s["mean_delta"] for s in rows
        ]
        ax.plot(ms, d, "o-", color="tab:blue", label="propensity delta")
        ax.fill_between(ms, lo, hi, color="tab:blue", alpha=0.2)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylabel("propensity delta (log-prob margin)")
    ax.set_xlabel(f"multiplier ({UNIT}: m x vector)")
    ax2 = ax.twinx()
    ppl = [np.nan if s["median_perplexity"] is None else s["median_perplexity"] for s in rows]
    ax2.plot(ms, ppl, "s--", color="tab:red", label="median perplexity")
    ax2.set_yscale("log")
    ax2.set_ylabel("median perplexity (unsteered model)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    ax.set_title(f"{vector} (block {rows[0]['block']}, epoch {rows[0]['epoch']})", fontsize=9)
    return save_figure(fig, path)


def plot_best(best: Sequence[dict], path) -> Path:
    """Best in-range propensity gain per vector, as a bar chart with its 95% CI."""
    from mup._plots import new_figure, save_figure

    rows = [b for b in best if b["best_gain"] is not None]
    fig, ax = new_figure(figsize=(max(4, 0.5 * len(rows) + 2), 4))
    labels = [f"B{b['block']} e{b['epoch']}\n{b['vector']}" for b in rows]
    gains = [b["best_gain"] for b in rows]
    err = [
        [
            g - (b["best_gain_ci_low"] if b["best_gain_ci_low"] is not None else g)
            for g, b in zip(gains, rows, strict=True)
        ],
        [
            (b["best_gain_ci_high"] if b["best_gain_ci_high"] is not None else g) - g
            for g, b in zip(gains, rows, strict=True)
        ],
    ]
    ax.bar(range(len(rows)), gains, yerr=err, color="tab:blue", capsize=3)
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("best propensity gain in coherent range")
    return save_figure(fig, path)


def format_best(best: Sequence[dict]) -> str:
    """The best-vector table as fixed-width text."""

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"{'vector':<32} {'block':>5} {'epoch':>5} {'coherent':>15} {'best m':>7} "
        f"{'gain':>8} {'95% CI':>19} {'ppl':>7}"
    ]
    for b in best:
        rng = (
            "-" if b["coherent_low"] is None else f"[{b['coherent_low']:g}, {b['coherent_high']:g}]"
        )
        ci = (
            "-"
            if b["best_gain_ci_low"] is None
            else f"[{b['best_gain_ci_low']:+.3f}, {b['best_gain_ci_high']:+.3f}]"
        )
        lines.append(
            f"{b['vector'][:32]:<32} {b['block']:>5} {b['epoch']:>5} {rng:>15} "
            f"{f(b['best_multiplier'], 'g'):>7} {f(b['best_gain'], '+.3f'):>8} {ci:>19} "
            f"{f(b['median_perplexity'], '.3g'):>7}"
        )
    return "\n".join(lines)
