"""`mup probes calibration`: a probe's predicted probability against the 1-10 stakes score.

Two views on the dev sets: the mean predicted probability for each `scale_labels` value (a
well-ordered probe rises with the labeller's score), and a reliability diagram (mean predicted
probability against the fraction of high-stakes records, in equal-width probability bins).

Axis letters: N records, B bins.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mup._resolve import DEFAULT_MODEL
from mup.experiments._common import (
    ExtractOptions,
    config_layer,
    extract_train_val_dev,
    find_training_and_dev,
    new_figure,
    record_field,
    save_figure,
)


def scale_bins(probs, scales) -> list[dict]:
    """Per distinct scale value: count, mean and standard deviation of the predicted probability."""
    probs, scales = np.asarray(probs, np.float64), np.asarray(scales, np.float64)
    if probs.shape != scales.shape or probs.ndim != 1:
        raise ValueError(f"probs {probs.shape} and scales {scales.shape} must both be [N]")
    if not (np.isfinite(probs).all() and np.isfinite(scales).all()):
        raise ValueError("probs and scales must be finite")
    out = []
    for s in np.unique(scales):
        p = probs[scales == s]
        out.append(
            {
                "scale": float(s),
                "n": int(p.size),
                "mean_prob": float(p.mean()),
                "std_prob": float(p.std()),
            }
        )
    return out


def reliability_bins(probs, labels, n_bins: int = 10) -> list[dict]:
    """Equal-width probability bins (non-empty ones): count, mean probability, positive rate.

    Records labelled -1 are left out.
    """
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    keep = labels != -1
    probs, labels = probs[keep], labels[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # [B+1]
    # The binning of mup.metrics.ece, so the plotted bins add up to the reported ECE.
    idx = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)  # [N]
    out = []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            out.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "n": int(sel.sum()),
                    "mean_prob": float(probs[sel].mean()),
                    "frac_positive": float(labels[sel].mean()),
                }
            )
    return out


def plot_calibration(per_set: dict, path) -> Path:
    """Left: mean probability per stakes score; right: reliability diagram; one line per set."""
    fig, (ax0, ax1) = new_figure(1, 2, figsize=(11, 4.5))
    for name, res in per_set.items():
        sb = res["scale_bins"]
        ax0.errorbar(
            [b["scale"] for b in sb],
            [b["mean_prob"] for b in sb],
            yerr=[b["std_prob"] for b in sb],
            marker="o",
            capsize=2,
            label=name,
        )
        rb = res["reliability_bins"]
        ax1.plot(
            [b["mean_prob"] for b in rb],
            [b["frac_positive"] for b in rb],
            marker="o",
            label=f"{name} (ECE {res['ece']:.3f})",
        )
    ax0.set_xlabel("scale_labels (1-10 stakes score)")
    ax0.set_ylabel("mean predicted P(high stakes)")
    ax0.set_ylim(0, 1)
    ax1.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax1.set_xlabel("mean predicted probability (bin)")
    ax1.set_ylabel("fraction high-stakes")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    model: str = DEFAULT_MODEL
    layer: int | None = None
    kind: str = "attention"
    n_bins: int = 10
    out: str = "runs/calibration"
    data: str | None = None
    max_tokens: int | None = 512
    limit: int | None = None
    seed: int = 0
    progress: bool = True


def calibration(probe, evals: dict, scales: dict, *, n_bins: int = 10) -> dict:
    """Per evaluation set: scale bins, reliability bins, ECE, Brier, AUROC, Spearman's rho."""
    from mup import metrics

    out = {}
    for name, data in evals.items():
        probs = probe.predict(data)
        labels = np.asarray(data.labels)
        m = metrics.evaluate(probs, labels, n_bins=n_bins)
        s = np.asarray(scales[name], np.float64)
        out[name] = {
            "scale_bins": scale_bins(probs, s),
            "reliability_bins": reliability_bins(probs, labels, n_bins),
            "ece": float(m["ece"]),
            "brier": float(m["brier"]),
            "auroc": float(m["auroc"]),
            "spearman_scale": spearman(probs, s),
            "probs": probs,
            "labels": labels,
        }
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    uniq, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties averaged); an error when either input is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"spearman: need two [N] arrays with N >= 2, got {a.shape}, {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        raise ValueError("spearman: an input is constant, the correlation is undefined")
    return float(np.corrcoef(ra, rb)[0, 1])


def run_calibration(config: CalibrationConfig) -> dict:
    from mup import probes

    layer = config_layer(config)
    out = Path(config.out)
    options = ExtractOptions.of(config, out)
    training, dev = find_training_and_dev(config.data)
    train, val, evals = extract_train_val_dev(training, dev, layer=layer, options=options)
    scales = {name: record_field(s, "scale_labels") for name, s in evals.items()}
    probe = probes.fit(config.kind, train, layer=layer, val=val, seed=config.seed)
    per_set = calibration(probe, evals, scales, n_bins=config.n_bins)
    results = out / "calibration.jsonl"
    for name, res in per_set.items():
        probes.append_result(
            results,
            probe=probe,
            model=config.model,
            layer=layer,
            train=train,
            eval=evals[name],
            metrics={k: v for k, v in res.items() if k not in ("probs", "labels")},
            scores=res["probs"],
            labels=res["labels"],
            ids=evals[name].ids,
        )
    plot_calibration(per_set, out / "calibration.png")
    summary = {
        "layer": layer,
        "kind": config.kind,
        "results": str(results),
        "plot": str(out / "calibration.png"),
        "sets": {
            n: {k: v for k, v in r.items() if k not in ("probs", "labels")}
            for n, r in per_set.items()
        },
    }
    (out / "calibration.json").write_text(json.dumps(summary, indent=2))
    return summary
