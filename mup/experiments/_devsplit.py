"""`mup probes devsplit`: probes trained on a few records of the target distribution.

For each dev set and each k, a probe sees k class-balanced records of that dev set:

  dev-only    trained on the k dev records alone;
  combined    trained on the synthetic training split plus the k dev records;
  warm-start  the synthetic-only probe fine-tuned on the k dev records for `warm_epochs`
              (gradient kinds: training starts from its parameters, `mup.probes.fit(init=)`).

The synthetic-only probe (trained on the synthetic training split, early stopping on its
test split) is the reference every curve is read against.

Held-out evaluation. Each repeat (seed s = seed + r) splits every dev set, class by class, into
three disjoint parts: a training pool (the k records are drawn from it), a validation part
(`val_fraction`: early stopping of every mode) and an evaluation part (`eval_fraction`: every
reported score, the reference's included). Scores are never computed on records a probe was
trained or stopped on; the upstream code selects epochs on the records it reports. Within a
repeat every mode and every k shares the same three parts, and the draws are nested (the k
records are the first k/2 of each class of the shuffled pool), so the curves differ by
training data only.

Part sizes depend on the class counts alone, not on the seed, so the largest k a set allows
is known from its file before any model loads; larger k are skipped for that set with a note.

Axis letters: N records, K training-set sizes, S dev sets, R repeats.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mup._resolve import DEFAULT_MODEL
from mup.experiments._common import (
    DEV_SETS,
    ExtractOptions,
    config_layer,
    describe,
    extract_train_val_dev,
    find_training_and_dev,
    labels_of,
    log,
    new_figure,
    progress_bar,
    read_rows,
    save_figure,
    selected_records,
)

MODES = ("dev-only", "combined", "warm-start")
REFERENCE = "synthetic-only"  # the mode name of the reference rows (k = 0)
DEFAULT_KS = (2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevParts:
    """One repeat's split of a dev set into disjoint record indices.

    pool_pos / pool_neg are the training pool's high- / low-stakes records in their shuffled
    order (draws take a prefix of each); val and eval are sorted.
    """

    pool_pos: np.ndarray
    pool_neg: np.ndarray
    val: np.ndarray
    eval: np.ndarray

    @property
    def capacity(self) -> int:
        """The largest class-balanced k the pool can provide."""
        n_pos, n_neg = self.pool_pos.size, self.pool_neg.size
        return max(k for k in range(2, n_pos + n_neg + 1) if _fits(k, n_pos, n_neg))

    def draw(self, k: int) -> np.ndarray:
        """k pool records, k // 2 high-stakes and the rest low-stakes, sorted."""
        if not _fits(k, self.pool_pos.size, self.pool_neg.size):
            raise ValueError(
                f"k={k} exceeds the training pool ({self.pool_pos.size} high-stakes, "
                f"{self.pool_neg.size} low-stakes records; at most k={self.capacity})"
            )
        return np.sort(np.concatenate([self.pool_pos[: k // 2], self.pool_neg[: k - k // 2]]))


def _fits(k: int, n_pos: int, n_neg: int) -> bool:
    return k >= 2 and k // 2 <= n_pos and k - k // 2 <= n_neg


def _share(fraction: float, n: int) -> int:
    return int(np.floor(fraction * n + 0.5))  # round half up, the same on every platform


def dev_parts(
    labels, seed: int, *, val_fraction: float = 0.2, eval_fraction: float = 0.4, name: str = "dev"
) -> DevParts:
    """Split the labelled records into a training pool, a validation and an evaluation part.

    Stratified: each class is shuffled (seeded) and cut into `eval_fraction` (evaluation),
    `val_fraction` (validation) and the rest (pool). Records labelled -1 are in no part.
    """
    labels = np.asarray(labels)
    if not (0 < val_fraction < 1 and 0 < eval_fraction < 1 and val_fraction + eval_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and eval_fraction ({eval_fraction}) must be in "
            "(0, 1) and leave a training pool (sum < 1)"
        )
    rng = np.random.default_rng(seed)
    parts: dict = {"val": [], "eval": []}
    for cls, what in ((1, "high-stakes"), (0, "low-stakes")):
        rows = rng.permutation(np.nonzero(labels == cls)[0])
        n_eval, n_val = _share(eval_fraction, rows.size), _share(val_fraction, rows.size)
        if min(n_eval, n_val, rows.size - n_eval - n_val) < 1:
            raise ValueError(
                f"dev set {name}: {rows.size} {what} records cannot fill an evaluation "
                f"({eval_fraction:g}), a validation ({val_fraction:g}) and a training part "
                "with at least one each"
            )
        parts["eval"].append(rows[:n_eval])
        parts["val"].append(rows[n_eval : n_eval + n_val])
        parts["pos" if cls else "neg"] = rows[n_eval + n_val :]
    return DevParts(
        pool_pos=parts["pos"],
        pool_neg=parts["neg"],
        val=np.sort(np.concatenate(parts["val"])),
        eval=np.sort(np.concatenate(parts["eval"])),
    )


def plan_ks(
    labels_by_set: dict, ks, *, val_fraction: float = 0.2, eval_fraction: float = 0.4
) -> tuple[dict, list[str]]:
    """The k values each dev set can provide (name -> tuple) and a note for each set that
    loses some; ValueError when a set can provide none of them."""
    ks = _check_ks(ks)
    plan, notes = {}, []
    for name, labels in labels_by_set.items():
        parts = dev_parts(
            labels, 0, val_fraction=val_fraction, eval_fraction=eval_fraction, name=name
        )
        cap = parts.capacity
        where = (
            f"its training pool holds {parts.pool_pos.size} high- / {parts.pool_neg.size} "
            f"low-stakes records after {parts.val.size} go to validation and {parts.eval.size} "
            f"to evaluation, so at most k={cap}"
        )
        kept = tuple(k for k in ks if k <= cap)
        if not kept:
            raise ValueError(
                f"dev set {name}: every k {list(ks)} exceeds what it can provide: {where}"
            )
        if len(kept) < len(ks):
            notes.append(f"{name}: k={[k for k in ks if k > cap]} skipped: {where}")
        plan[name] = kept
    return plan, notes


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 2:
        raise ValueError(f"k values must be >= 2 (one record of each class), got {list(ks)}")
    return ks


def check_modes(modes, kind: str) -> tuple[str, ...]:
    """The modes, validated against MODES and the probe kind (warm-start needs gradients)."""
    from mup.probes import GRADIENT_KINDS, PROBE_KINDS

    modes = tuple(dict.fromkeys(modes))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(
            f"unknown devsplit mode(s) {bad or list(modes)}; known: {', '.join(MODES)}"
        )
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; known: {', '.join(PROBE_KINDS)}")
    if "warm-start" in modes and kind not in GRADIENT_KINDS:
        raise ValueError(
            f"warm-start fine-tunes a gradient-trained probe ({', '.join(GRADIENT_KINDS)}); "
            f"{kind!r} is fitted in closed form: pick another --kind or leave warm-start out"
        )
    return modes


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevsplitRow:
    """One probe scored on one repeat's evaluation part of one dev set."""

    mode: str  # one of MODES, or REFERENCE
    dataset: str
    k: int  # dev records trained on (0 for the reference)
    seed: int  # the repeat's seed (split, draw and probe initialisation)
    auroc: float
    tpr_at_fpr: float
    n_train: int  # records fitted on, synthetic ones included
    n_val: int  # records early stopping read (dev ones; synthetic ones for the reference)
    n_eval: int
    best_epoch: int | None  # None for closed-form kinds


def devsplit(
    train,
    devs: dict,
    *,
    layer=None,
    val=None,
    modes=MODES,
    ks=DEFAULT_KS,
    repeats: int = 5,
    seed: int = 0,
    kind: str = "attention",
    val_fraction: float = 0.2,
    eval_fraction: float = 0.4,
    warm_epochs: int = 10,
    results=None,
    model: str = "",
    progress: bool = True,
    **overrides,
) -> list[DevsplitRow]:
    """Every mode x k x repeat on every dev set, plus the synthetic-only reference per repeat.

    Args:
      train, val: the synthetic training split and the split its reference probe stops early
        on (stores or Activations); val may be None.
      devs: dev set name -> store / Activations (labelled).
      ks: training-set sizes; those a set cannot provide are skipped there (`plan_ks` says
        which and why; logged at INFO).
      repeats: repeat r uses seed + r for its split, its draws and the probes' initialisation.
      warm_epochs: epochs of warm-start fine-tuning.
      results: JSONL path; one `mup.probes.append_result` line per row.
      overrides: probe hyperparameters (e.g. fewer epochs in tests).
    """
    from mup import metrics, probes

    modes = check_modes(modes, kind)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warm_epochs < 1:
        raise ValueError(f"warm_epochs must be >= 1, got {warm_epochs}")
    if not devs:
        raise ValueError("devsplit: no dev sets")
    fractions = dict(val_fraction=val_fraction, eval_fraction=eval_fraction)
    labels = {name: labels_of(d) for name, d in devs.items()}
    plan, notes = plan_ks(labels, ks, **fractions)
    for note in notes:
        log.info("devsplit: %s", note)

    base = probes.fit(kind, train, layer=layer, val=val, seed=seed, **overrides)
    # Combined mode concatenates the synthetic records with each draw: read them once.
    synthetic = None
    if "combined" in modes:
        synthetic = read_rows(train, layer, np.nonzero(labels_of(train) != -1)[0])
    n_base = int(base.history.get("n_train", 0))
    n_base_val = 0 if val is None else int((labels_of(val) != -1).sum())  # synthetic records
    rows: list[DevsplitRow] = []
    total = repeats * sum(len(plan[name]) * len(modes) + 1 for name in devs)

    def record(probe, mode, name, k, s, data, n_train, n_val, train_info):
        scores = probe.predict(data)
        m = metrics.evaluate(scores, data.labels)
        rows.append(
            DevsplitRow(
                mode=mode,
                dataset=name,
                k=k,
                seed=s,
                auroc=float(m["auroc"]),
                tpr_at_fpr=float(m["tpr_at_fpr"]),
                n_train=n_train,
                n_val=n_val,
                n_eval=data.n_records,
                best_epoch=probe.history.get("best_epoch"),
            )
        )
        if results is not None:
            probes.append_result(
                results,
                probe=probe,
                model=model,
                layer=probe.layers[0] if len(probe.layers) == 1 else list(probe.layers),
                train=train_info | {"mode": mode, "k": k, "seed": s},
                eval=describe(devs[name], name)
                | {"part": "held-out evaluation", "seed": s, "n": data.n_records},
                metrics=m,
                scores=scores,
                labels=data.labels,
                ids=data.ids,
            )

    with progress_bar(total, f"devsplit: {kind}", progress) as bar:
        for name, dev in devs.items():
            for r in range(repeats):
                s = seed + r
                parts = dev_parts(labels[name], s, name=name, **fractions)
                held_out = read_rows(dev, layer, parts.eval)
                val_part = read_rows(dev, layer, parts.val)
                reference = describe(train, "training (train split)") | {
                    "val": None if val is None else describe(val, "training (test split)")
                }
                record(base, REFERENCE, name, 0, s, held_out, n_base, n_base_val, reference)
                bar.update(1)
                for k in plan[name]:
                    drawn = parts.draw(k)
                    few = read_rows(dev, layer, drawn)
                    info = describe(dev, f"{name} (training pool)") | {
                        "dev_ids": _ids(dev, drawn),
                        "val_ids": _ids(dev, parts.val),
                    }
                    for mode in modes:
                        bar.set_postfix_str(f"{name} seed={s} k={k} {mode}")
                        if mode == "dev-only":
                            data, extra, start = few, {}, None
                        elif mode == "combined":
                            data = probes.concat([synthetic, few])
                            extra, start = {"synthetic": describe(train, "training")}, None
                        else:
                            data, start = few, base
                            extra = {"init": REFERENCE, "synthetic": describe(train, "training")}
                        hyper = overrides | ({"epochs": warm_epochs} if start is not None else {})
                        probe = probes.fit(kind, data, val=val_part, seed=s, init=start, **hyper)
                        n_fit = int(probe.history.get("n_train", data.n_records))
                        record(
                            probe,
                            mode,
                            name,
                            k,
                            s,
                            held_out,
                            n_fit,
                            val_part.n_records,
                            info | extra,
                        )
                        bar.update(1)
    return rows


def _ids(data, rows) -> list[str] | None:
    ids = getattr(data, "ids", None)
    return None if ids is None else [str(ids[int(i)]) for i in rows]


def summarise(rows: list[DevsplitRow]) -> list[dict]:
    """Mean and standard deviation over repeats per (mode, dataset, k)."""
    keys = dict.fromkeys((r.mode, r.dataset, r.k) for r in rows)
    out = []
    for mode, dataset, k in keys:
        sel = [r for r in rows if (r.mode, r.dataset, r.k) == (mode, dataset, k)]
        aurocs = np.array([r.auroc for r in sel])
        out.append(
            {
                "mode": mode,
                "dataset": dataset,
                "k": k,
                "repeats": len(sel),
                "auroc_mean": float(aurocs.mean()),
                "auroc_std": float(aurocs.std()),
                "tpr_at_fpr_mean": float(np.mean([r.tpr_at_fpr for r in sel])),
            }
        )
    return out


def _mean_over_sets(rows: list[DevsplitRow]) -> list[DevsplitRow]:
    """Rows of a pseudo dataset "mean": per (mode, k, seed), the mean over the dev sets, for
    the k values every set has (a mean over fewer sets would not be comparable)."""
    sets = list(dict.fromkeys(r.dataset for r in rows))
    by = {}
    for r in rows:
        by.setdefault((r.mode, r.k, r.seed), {})[r.dataset] = r
    out = []
    for per_set in by.values():
        if len(per_set) == len(sets):
            vals = list(per_set.values())
            out.append(
                dataclasses.replace(
                    vals[0],
                    dataset="mean",
                    auroc=float(np.mean([v.auroc for v in vals])),
                    tpr_at_fpr=float(np.mean([v.tpr_at_fpr for v in vals])),
                )
            )
    return out


def plot_devsplit(rows: list[DevsplitRow], path) -> Path:
    """Mean AUROC over repeats against k (log2 axis), a band of one standard deviation, one
    line per mode; the synthetic-only probe as a dashed horizontal line. One panel per dev
    set, plus their mean when there are several."""
    sets = list(dict.fromkeys(r.dataset for r in rows))
    panels = [(name, [r for r in rows if r.dataset == name]) for name in sets]
    if len(sets) > 1:
        panels.append(("mean over sets", _mean_over_sets(rows)))
    fig, axes = new_figure(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    modes = [m for m in dict.fromkeys(r.mode for r in rows) if m != REFERENCE]
    all_ks = sorted({r.k for r in rows if r.mode != REFERENCE})
    for ax, (title, sel) in zip(axes[0], panels, strict=True):
        ref = np.array([r.auroc for r in sel if r.mode == REFERENCE])
        if ref.size:
            mean, std = float(ref.mean()), float(ref.std())
            ax.axhline(mean, color="black", ls="--", lw=1, label=REFERENCE)
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.07)
        for mode in modes:
            ks = sorted({r.k for r in sel if r.mode == mode})
            vals = [np.array([r.auroc for r in sel if r.mode == mode and r.k == k]) for k in ks]
            mean = np.array([v.mean() for v in vals])  # [K]
            std = np.array([v.std() for v in vals])  # [K]
            (line,) = ax.plot(ks, mean, marker="o", ms=4, label=mode)
            ax.fill_between(ks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.set_xlabel("dev records trained on (k)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUROC on the held-out part")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DevsplitConfig:
    """One `devsplit` run."""

    model: str = DEFAULT_MODEL
    layer: int | None = None  # None = configs/models/<model>.yaml
    kind: str = "attention"
    modes: tuple[str, ...] = MODES
    ks: tuple[int, ...] = DEFAULT_KS
    repeats: int = 5
    sets: tuple[str, ...] = DEV_SETS
    val_fraction: float = 0.2  # of each class of a dev set: early stopping
    eval_fraction: float = 0.4  # of each class of a dev set: every reported score
    warm_epochs: int = 10
    out: str = "runs/devsplit"  # stores, devsplit.jsonl / .png / .json
    data: str | None = None
    max_tokens: int | None = 512
    limit: int | None = None  # records per data set (and per synthetic split)
    seed: int = 0
    progress: bool = True


def run_devsplit(config: DevsplitConfig) -> tuple[list[DevsplitRow], dict]:
    """Check what each dev set allows, extract, run every mode and write the files."""
    modes = check_modes(config.modes, config.kind)
    unknown = [s for s in config.sets if s not in DEV_SETS]
    if unknown or not config.sets:
        raise ValueError(f"unknown dev set(s) {unknown or []}; known: {', '.join(DEV_SETS)}")
    if config.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {config.repeats}")
    layer = config_layer(config)
    out = Path(config.out)
    sets = tuple(dict.fromkeys(config.sets))
    training, dev_paths = find_training_and_dev(config.data, sets)
    fractions = dict(val_fraction=config.val_fraction, eval_fraction=config.eval_fraction)
    # Labels from the files: a k no set can provide is an error before the model loads.
    file_labels = {
        name: selected_records(path, split=None, limit=config.limit).labels
        for name, path in zip(sets, dev_paths, strict=True)
    }
    plan, notes = plan_ks(file_labels, config.ks, **fractions)
    options = ExtractOptions.of(config, out)
    train, val, devs = extract_train_val_dev(
        training, dev_paths, sets, layer=layer, options=options
    )
    results = out / "devsplit.jsonl"
    rows = devsplit(
        train,
        devs,
        layer=layer,
        val=val,
        modes=modes,
        ks=config.ks,
        repeats=config.repeats,
        seed=config.seed,
        kind=config.kind,
        warm_epochs=config.warm_epochs,
        results=results,
        model=config.model,
        progress=config.progress,
        **fractions,
    )
    plot = plot_devsplit(rows, out / "devsplit.png")
    summary = {
        "layer": layer,
        "kind": config.kind,
        "modes": list(modes),
        "ks": {name: list(v) for name, v in plan.items()},
        "notes": notes,
        "n_train": train.n_records,
        "n_val": val.n_records,
        "n_dev": {name: s.n_records for name, s in devs.items()},
        "table": summarise(rows),
        "results": str(results),
        "plot": str(plot),
    }
    (out / "devsplit.json").write_text(json.dumps(summary, indent=2))
    return rows, summary
