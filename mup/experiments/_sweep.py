"""`mup probes sweep`: cross-validated AUROC of one probe kind at several layers.

Folds are grouped by `pair_id`: the high- and low-stakes versions of one prompt are never split
between training and held-out records, so a probe cannot score well by recognising the pair.

Axis letters: N records, K folds, L layers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mup._resolve import DEFAULT_MODEL
from mup.experiments._common import (
    ExtractOptions,
    describe,
    extract,
    find,
    new_figure,
    progress_bar,
    record_field,
    save_figure,
)


def grouped_folds(groups, k: int, seed: int = 0) -> list[np.ndarray]:
    """Split record indices into `k` folds so that each group lies in exactly one fold.

    Groups are shuffled (seeded) and assigned greedily to the currently smallest fold, which
    keeps fold sizes within one group size of each other.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be [N], got shape {groups.shape}")
    uniq, inverse = np.unique(groups, return_inverse=True)
    if k < 2:
        raise ValueError(f"k must be >= 2 folds, got {k}")
    if uniq.size < k:
        raise ValueError(f"{uniq.size} distinct groups cannot fill {k} folds")
    order = np.random.default_rng(seed).permutation(uniq.size)
    sizes = np.bincount(inverse, minlength=uniq.size)
    fold_of_group = np.empty(uniq.size, np.int64)
    load = np.zeros(k, np.int64)
    for g in order[np.argsort(-sizes[order], kind="stable")]:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += sizes[g]
    fold = fold_of_group[inverse]  # [N]
    return [np.nonzero(fold == f)[0] for f in range(k)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepRow:
    """Cross-validated AUROC of one probe kind at one layer."""

    layer: int
    kind: str
    auroc_mean: float
    auroc_std: float
    fold_aurocs: tuple[float, ...]


def sweep(
    data,
    groups,
    *,
    layers,
    kind: str = "logreg",
    k: int = 5,
    seed: int = 0,
    progress: bool = True,
    results=None,
    model: str = "",
    **overrides,
) -> list[SweepRow]:
    """K-fold AUROC of `kind` at each layer, folds grouped by `groups` ([N], e.g. pair_id).

    `data` is a store holding every layer in `layers` (or a dict layer -> Activations). Records
    labelled -1 are left out of training and scoring. No validation set is used for early
    stopping: the held-out fold is only scored, never used to pick parameters.
    """
    from mup import metrics, probes
    from mup.probes import Activations

    groups = np.asarray(groups)
    folds = grouped_folds(groups, k, seed)
    rows = []
    with progress_bar(len(layers) * k, f"sweep: {kind}", progress) as bar:
        for layer in layers:
            acts = data[layer] if isinstance(data, dict) else Activations.from_store(data, layer)
            if acts.n_records != groups.shape[0]:
                raise ValueError(
                    f"{groups.shape[0]} groups for {acts.n_records} records at layer {layer}"
                )
            scores = np.zeros(acts.n_records, np.float64)  # [N] out-of-fold probabilities
            aurocs = []
            for f, held in enumerate(folds):
                bar.set_postfix_str(f"layer {layer} fold {f + 1}/{k}")
                train_rows = np.setdiff1d(np.arange(acts.n_records), held)
                probe = probes.fit(kind, acts.select(train_rows), seed=seed, **overrides)
                test = acts.select(held)
                scores[held] = probe.predict(test)
                aurocs.append(metrics.auroc(scores[held], test.labels))
                bar.update(1)
            row = SweepRow(
                layer=int(layer),
                kind=kind,
                auroc_mean=float(np.mean(aurocs)),
                auroc_std=float(np.std(aurocs)),
                fold_aurocs=tuple(float(a) for a in aurocs),
            )
            rows.append(row)
            if results is not None:
                labels = np.asarray(acts.labels)
                keep = labels != -1
                probes.append_result(
                    results,
                    probe={"kind": kind, "overrides": overrides, "cv_folds": k, "seed": seed},
                    model=model,
                    layer=int(layer),
                    train=describe(data, "training (k-fold, grouped by pair_id)"),
                    eval=describe(data, "training (out-of-fold)"),
                    metrics=metrics.evaluate(scores[keep], labels[keep])
                    | {
                        "fold_aurocs": list(row.fold_aurocs),
                        "auroc_mean": row.auroc_mean,
                        "auroc_std": row.auroc_std,
                    },
                    scores=scores[keep],
                    labels=labels[keep],
                    ids=None
                    if acts.ids is None
                    else [i for i, m in zip(acts.ids, keep, strict=True) if m],
                )
    return rows


def plot_sweep(rows: list[SweepRow], path) -> Path:
    """AUROC (mean over folds, error bars one standard deviation) against layer."""
    fig, ax = new_figure(figsize=(7, 4))
    x = [r.layer for r in rows]
    ax.errorbar(
        x, [r.auroc_mean for r in rows], yerr=[r.auroc_std for r in rows], marker="o", capsize=3
    )
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("AUROC (grouped k-fold)")
    ax.set_title(f"layer sweep: {rows[0].kind} probe" if rows else "layer sweep")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """One `sweep` run: one extraction holding every layer, then k folds per layer."""

    model: str = DEFAULT_MODEL
    layers: tuple[int, ...] = (5, 10, 15, 20, 25)
    kind: str = "logreg"
    k: int = 5
    out: str = "runs/sweep"
    data: str | None = None
    max_tokens: int | None = 512
    limit: int | None = None  # first records of the whole training file (both splits)
    seed: int = 0
    progress: bool = True


def run_sweep(config: SweepConfig) -> tuple[list[SweepRow], dict]:
    out = Path(config.out)
    options = ExtractOptions.of(config, out)
    (store,) = extract(
        [find("training", config.data)], layers=config.layers, split=None, options=options
    )
    groups = record_field(store, "pair_id")
    rows = sweep(
        store,
        groups,
        layers=config.layers,
        kind=config.kind,
        k=config.k,
        seed=config.seed,
        progress=config.progress,
        results=out / "sweep.jsonl",
        model=config.model,
    )
    plot_sweep(rows, out / "sweep.png")
    summary = {
        "results": str(out / "sweep.jsonl"),
        "plot": str(out / "sweep.png"),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    return rows, summary
