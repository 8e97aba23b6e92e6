"""`mup probes efficiency`: out-of-distribution AUROC against the number of training records.

Axis letters: N records, S evaluation sets.
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
    describe,
    extract_train_val_dev,
    find_training_and_dev,
    new_figure,
    progress_bar,
    save_figure,
)


def stratified_subsample(labels, size: int, seed: int) -> np.ndarray:
    """`size` record indices with both classes in their training proportion (at least one each).

    Records labelled -1 are never drawn.
    """
    labels = np.asarray(labels)
    pos, neg = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    if size < 2:
        raise ValueError(f"a training subset needs at least 2 records (one per class), got {size}")
    if size > pos.size + neg.size:
        raise ValueError(
            f"subset size {size} exceeds the {pos.size + neg.size} labelled training records"
        )
    rng = np.random.default_rng(seed)
    n_pos = int(round(size * pos.size / (pos.size + neg.size)))
    n_pos = min(max(n_pos, 1), pos.size, size - 1)
    n_neg = size - n_pos
    if n_neg > neg.size:
        n_neg, n_pos = neg.size, size - neg.size
    rows = np.concatenate(
        [rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]
    )
    return np.sort(rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EfficiencyRow:
    kind: str
    size: int
    seed: int
    aurocs: dict  # evaluation set -> AUROC
    mean_auroc: float


def efficiency(
    train,
    evals: dict,
    *,
    sizes,
    kinds=("logreg",),
    seeds=(0, 1, 2),
    layer=None,
    val=None,
    progress: bool = True,
    results=None,
    model: str = "",
    **overrides,
) -> list[EfficiencyRow]:
    """Train each kind on stratified subsets of `train` of each size (one per seed) and record
    AUROC on every evaluation set."""
    from mup import metrics, probes
    from mup.probes import Activations

    train_acts = train if isinstance(train, Activations) else Activations.from_store(train, layer)
    val_acts = None
    if val is not None:
        val_acts = val if isinstance(val, Activations) else Activations.from_store(val, layer)
    eval_acts = {
        name: d if isinstance(d, Activations) else Activations.from_store(d, layer)
        for name, d in evals.items()
    }
    rows = []
    total = len(kinds) * len(sizes) * len(seeds)
    with progress_bar(total, "efficiency", progress) as bar:
        for kind in kinds:
            for size in sizes:
                for seed in seeds:
                    bar.set_postfix_str(f"{kind} n={size} seed={seed}")
                    subset = stratified_subsample(train_acts.labels, int(size), seed)
                    probe = probes.fit(
                        kind, train_acts.select(subset), val=val_acts, seed=seed, **overrides
                    )
                    aurocs = {}
                    for name, data in eval_acts.items():
                        scores = probe.predict(data)
                        m = metrics.evaluate(scores, data.labels)
                        aurocs[name] = float(m["auroc"])
                        if results is not None:
                            probes.append_result(
                                results,
                                probe=probe,
                                model=model,
                                layer=probe.layers[0]
                                if len(probe.layers) == 1
                                else list(probe.layers),
                                train=describe(train, "training")
                                | {"subset_size": int(size), "subset_seed": seed},
                                eval=describe(evals[name], name),
                                metrics=m,
                                scores=scores,
                                labels=data.labels,
                                ids=data.ids,
                            )
                    rows.append(
                        EfficiencyRow(
                            kind=kind,
                            size=int(size),
                            seed=seed,
                            aurocs=aurocs,
                            mean_auroc=float(np.mean(list(aurocs.values()))),
                        )
                    )
                    bar.update(1)
    return rows


def plot_efficiency(rows: list[EfficiencyRow], path) -> Path:
    """Mean dev-set AUROC against training size, one line per kind, error bars over seeds."""
    fig, ax = new_figure(figsize=(7, 4))
    for kind in dict.fromkeys(r.kind for r in rows):
        sizes = sorted({r.size for r in rows if r.kind == kind})
        vals = [[r.mean_auroc for r in rows if r.kind == kind and r.size == s] for s in sizes]
        ax.errorbar(
            sizes,
            [np.mean(v) for v in vals],
            yerr=[np.std(v) for v in vals],
            marker="o",
            capsize=3,
            label=kind,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training records")
    ax.set_ylabel("mean AUROC over the evaluation sets")
    ax.set_title("data efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EfficiencyConfig:
    model: str = DEFAULT_MODEL
    layer: int | None = None
    kinds: tuple[str, ...] = ("logreg",)
    sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "runs/efficiency"
    data: str | None = None
    max_tokens: int | None = 512
    limit: int | None = None
    progress: bool = True


def run_efficiency(config: EfficiencyConfig) -> tuple[list[EfficiencyRow], dict]:
    layer = config_layer(config)
    out = Path(config.out)
    options = ExtractOptions.of(config, out)
    training, dev = find_training_and_dev(config.data)
    train, val, evals = extract_train_val_dev(training, dev, layer=layer, options=options)
    labelled = int((np.asarray(train.labels) != -1).sum())
    sizes = tuple(s for s in config.sizes if s <= labelled)
    if not sizes:
        raise ValueError(
            f"every subset size {config.sizes} exceeds the {labelled} training records"
        )
    rows = efficiency(
        train,
        evals,
        sizes=sizes,
        kinds=config.kinds,
        seeds=config.seeds,
        layer=layer,
        val=val,
        progress=config.progress,
        results=out / "efficiency.jsonl",
        model=config.model,
    )
    plot_efficiency(rows, out / "efficiency.png")
    summary = {
        "layer": layer,
        "results": str(out / "efficiency.jsonl"),
        "plot": str(out / "efficiency.png"),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    (out / "efficiency.json").write_text(json.dumps(summary, indent=2))
    return rows, summary
