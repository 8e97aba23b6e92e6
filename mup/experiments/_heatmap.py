"""`mup probes heatmap`: how a probe trained on one variation of the synthetic set generalises.

The synthetic set writes each situation along four variation fields (prompt_style, tone,
language, length). For one field, a probe is trained on the training-split records of each
value v and scored on the test-split records of every value w: M[v, w] is that AUROC. Rows
are training values, columns evaluation values; pairs never straddle the two splits, so even
the diagonal is scored on records (and prompts) the probe never saw.

A value with fewer than `min_per_class` labelled records of either class in a split is
reported and skipped: its row (training) or column (evaluation) stays empty.

Gradient kinds stop early on a validation part of v's training records, grouped by pair_id
(fold 0 of `grouped_folds`): the test split is only ever scored, never used to pick epochs.

Axis letters: N records, V values of the field.
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
    extract,
    find,
    labels_of,
    log,
    new_figure,
    progress_bar,
    read_rows,
    record_field,
    save_figure,
    selected_records,
)
from mup.experiments._sweep import grouped_folds

# The variation fields of the synthetic training set (synthetic_2025-03-25.jsonl).
FIELDS = ("prompt_style", "tone", "language", "length")
# Values with a natural order are plotted in it; any others follow, sorted.
_ORDER = {"length": ("very short", "short", "medium", "long")}


def field_values(field: str, *value_arrays) -> tuple[str, ...]:
    """The distinct values of `field` in the given arrays, in plotting order."""
    seen = {str(v) for values in value_arrays for v in np.asarray(values).tolist()}
    known = [v for v in _ORDER.get(field, ()) if v in seen]
    return tuple(known + sorted(seen - set(known)))


def class_counts(labels, values, value) -> tuple[int, int]:
    """(high-stakes, low-stakes) records whose field equals `value`."""
    labels, sel = np.asarray(labels), np.asarray(values).astype(str) == value
    return int((labels[sel] == 1).sum()), int((labels[sel] == 0).sum())


def _too_few(labels, values, value, min_per_class: int, split: str) -> str | None:
    n_pos, n_neg = class_counts(labels, values, value)
    if min(n_pos, n_neg) >= min_per_class:
        return None
    return (
        f"{n_pos} high-stakes / {n_neg} low-stakes {split}-split records, fewer than "
        f"{min_per_class} of a class"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeatmapRow:
    """A probe trained on records with field == train_value, scored on field == eval_value."""

    train_value: str
    eval_value: str
    auroc: float
    tpr_at_fpr: float
    n_train: int  # records the probe was fitted on (the validation part excluded)
    n_val: int  # records it stopped early on (0: closed-form kinds, or no validation)
    n_eval: int


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Heatmap:
    """The matrix M[v, w] of one field, and what was left out of it and why."""

    field: str
    kind: str
    values: tuple[str, ...]  # [V] row and column order
    auroc: np.ndarray  # [V, V] float64, NaN where a row or column was skipped
    tpr_at_fpr: np.ndarray  # [V, V]
    rows: list[HeatmapRow]
    skipped_train: dict  # value -> why no probe was trained on it
    skipped_eval: dict  # value -> why nothing was scored on it

    @property
    def notes(self) -> list[str]:
        return [
            f"{self.field}={v!r}: not trained on: {why}" for v, why in self.skipped_train.items()
        ] + [f"{self.field}={v!r}: not evaluated on: {why}" for v, why in self.skipped_eval.items()]


def heatmap(
    train,
    train_values,
    test,
    test_values,
    *,
    field: str = "field",
    layer=None,
    kind: str = "attention",
    groups=None,
    min_per_class: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    results=None,
    model: str = "",
    progress: bool = True,
    **overrides,
) -> Heatmap:
    """Train `kind` on the `train` records of each value of the field and score every value
    of `test`.

    Args:
      train, test: stores (or Activations) of the training and test splits.
      train_values, test_values: [N] the field's value per record of each (`record_field`).
      groups: [N] training-record groups (pair_id) kept together when a validation part is
        held out; None = each record its own group.
      min_per_class: fewest labelled records of each class a value needs in a split.
      val_fraction: share of a value's training records held out for early stopping
        (gradient kinds; 0 = none, train for the configured epochs).
      results: JSONL path; one `mup.probes.append_result` line per computed cell.
      Skipped values are in the result (`notes`, `skipped_train`, `skipped_eval`; logged at
      INFO).
      overrides: probe hyperparameters (e.g. fewer epochs in tests).
    """
    from mup import metrics, probes
    from mup.probes import GRADIENT_KINDS

    if kind not in probes.PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; known: {', '.join(probes.PROBE_KINDS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    y_train, y_test = labels_of(train), labels_of(test)
    train_values = np.asarray(train_values).astype(str)
    test_values = np.asarray(test_values).astype(str)
    for what, vals, y in (("train", train_values, y_train), ("test", test_values, y_test)):
        if vals.shape != y.shape:
            raise ValueError(f"{vals.shape[0]} {what} field values for {y.shape[0]} records")
    groups = np.arange(y_train.size) if groups is None else np.asarray(groups)
    if groups.shape != y_train.shape:
        raise ValueError(f"{groups.shape[0]} groups for {y_train.shape[0]} training records")
    values = field_values(field, train_values, test_values)
    skipped_train, skipped_eval = {}, {}
    for v in values:
        if why := _too_few(y_train, train_values, v, min_per_class, "train"):
            skipped_train[v] = why
        if why := _too_few(y_test, test_values, v, min_per_class, "test"):
            skipped_eval[v] = why
    trainable = [v for v in values if v not in skipped_train]
    evaluable = [v for v in values if v not in skipped_eval]
    if not trainable or not evaluable:
        notes = "; ".join(f"{v}: {why}" for v, why in (skipped_train | skipped_eval).items())
        raise ValueError(f"heatmap of {field!r}: no value can be trained and scored ({notes})")

    # The evaluation columns are read once and scored by every row's probe.
    evals = {}
    for w in evaluable:
        rows_w = np.nonzero((test_values == w) & (y_test != -1))[0]
        evals[w] = read_rows(test, layer, rows_w)
    n_val_folds = round(1.0 / val_fraction) if val_fraction > 0 else 0
    use_val = kind in GRADIENT_KINDS and n_val_folds >= 2
    V = len(values)
    auroc = np.full((V, V), np.nan)  # [V, V]
    tpr = np.full((V, V), np.nan)  # [V, V]
    out_rows: list[HeatmapRow] = []
    with progress_bar(len(trainable), f"heatmap: {field}", progress) as bar:
        for v in trainable:
            bar.set_postfix_str(v)
            rows_v = np.nonzero((train_values == v) & (y_train != -1))[0]
            fit_rows, val_rows = rows_v, np.zeros(0, np.int64)
            if use_val:
                try:
                    folds = grouped_folds(groups[rows_v], n_val_folds, seed)
                except ValueError as error:
                    skipped_train[v] = f"no validation part: {error}"
                    bar.update(1)
                    continue
                val_rows, fit_rows = rows_v[folds[0]], np.delete(rows_v, folds[0])
                lacking = [
                    part
                    for part, r in (("fitting", fit_rows), ("validation", val_rows))
                    if np.unique(y_train[r]).size < 2
                ]
                if lacking:
                    skipped_train[v] = f"its {' and '.join(lacking)} part has a single class"
                    bar.update(1)
                    continue
            fit_data = read_rows(train, layer, fit_rows)
            val_data = read_rows(train, layer, val_rows) if val_rows.size else None
            probe = probes.fit(kind, fit_data, val=val_data, seed=seed, **overrides)
            for w in evaluable:
                data = evals[w]
                scores = probe.predict(data)
                m = metrics.evaluate(scores, data.labels)
                i, j = values.index(v), values.index(w)
                auroc[i, j], tpr[i, j] = m["auroc"], m["tpr_at_fpr"]
                out_rows.append(
                    HeatmapRow(
                        train_value=v,
                        eval_value=w,
                        auroc=float(m["auroc"]),
                        tpr_at_fpr=float(m["tpr_at_fpr"]),
                        n_train=int(fit_rows.size),
                        n_val=int(val_rows.size),
                        n_eval=data.n_records,
                    )
                )
                if results is not None:
                    probes.append_result(
                        results,
                        probe=probe,
                        model=model,
                        layer=list(probe.layers) if len(probe.layers) != 1 else probe.layers[0],
                        train=describe(train, "training (train split)")
                        | {"field": field, "value": v, "n": int(fit_rows.size)}
                        | {"val_ids": _ids(val_data)},
                        eval=describe(test, "training (test split)")
                        | {"field": field, "value": w, "n": data.n_records},
                        metrics=m,
                        scores=scores,
                        labels=data.labels,
                        ids=data.ids,
                    )
            bar.update(1)
    result = Heatmap(
        field=field,
        kind=kind,
        values=values,
        auroc=auroc,
        tpr_at_fpr=tpr,
        rows=out_rows,
        skipped_train=skipped_train,
        skipped_eval=skipped_eval,
    )
    for note in result.notes:
        log.info("heatmap: %s", note)
    return result


def _ids(data):
    return None if data is None or data.ids is None else [str(i) for i in data.ids]


def plot_heatmap(result: Heatmap, path, *, title: str | None = None) -> Path:
    """M[v, w] as an annotated image: rows training values, columns evaluation values,
    skipped cells grey."""
    import matplotlib

    V = len(result.values)
    fig, ax = new_figure(figsize=(1.3 * V + 3.5, 1.1 * V + 2.2))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    m = np.ma.masked_invalid(result.auroc)
    # AUROC 0.5 is chance: the scale starts there unless a cell falls below it.
    low = min(0.5, float(np.nanmin(result.auroc))) if np.isfinite(result.auroc).any() else 0.5
    image = ax.imshow(m, cmap=cmap, vmin=low, vmax=1.0)
    for i in range(V):
        for j in range(V):
            value = result.auroc[i, j]
            if np.isfinite(value):
                shade = (value - low) / max(1.0 - low, 1e-9)
                colour = "black" if shade > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=9)
            else:
                ax.text(j, i, "skipped", ha="center", va="center", color="dimgrey", fontsize=7)
    ax.set_xticks(range(V), result.values, rotation=30, ha="right")
    ax.set_yticks(range(V), result.values)
    ax.set_xlabel(f"evaluated on {result.field} (test split)")
    ax.set_ylabel(f"trained on {result.field} (train split)")
    ax.set_title(title or f"{result.kind} probe AUROC across {result.field}")
    fig.colorbar(image, ax=ax, label="AUROC")
    return save_figure(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeatmapConfig:
    """One `heatmap` run."""

    model: str = DEFAULT_MODEL
    layer: int | None = None  # None = configs/models/<model>.yaml
    field: str = "prompt_style"  # one of FIELDS
    kind: str = "attention"
    min_per_class: int = 5
    val_fraction: float = 0.2  # early stopping part of each value's training records
    out: str = "runs/heatmap"  # stores, heatmap-<field>.jsonl / .png / .json
    data: str | None = None
    max_tokens: int | None = 512
    limit: int | None = None  # records per split (first of each)
    seed: int = 0
    progress: bool = True


def run_heatmap(config: HeatmapConfig) -> tuple[list[HeatmapRow], dict]:
    """Extract both splits of the synthetic set, fill M[v, w], write the JSONL and the PNG."""
    if config.field not in FIELDS:
        raise ValueError(f"unknown variation field {config.field!r}; known: {', '.join(FIELDS)}")
    if config.min_per_class < 1:
        raise ValueError(f"min_per_class must be >= 1, got {config.min_per_class}")
    layer = config_layer(config)
    out = Path(config.out)
    training = find("training", config.data)
    # The field and its class counts come from the file: a missing field or a split with no
    # usable value is an error before the model loads.
    selected = {
        split: selected_records(training, split=split, limit=config.limit)
        for split in ("train", "test")
    }
    for split, records in selected.items():
        lacking = [r.source for r in records if config.field not in r.fields]
        if lacking:
            raise ValueError(
                f"{lacking[0]}: no {config.field!r} field ({len(lacking)} of the "
                f"{len(records)} {split}-split records lack it); heatmap needs the variation "
                "fields of the synthetic training set"
            )
    for split, records in selected.items():
        vals = np.array([str(r.fields[config.field]) for r in records])
        usable = [
            v
            for v in field_values(config.field, vals)
            if _too_few(records.labels, vals, v, config.min_per_class, split) is None
        ]
        if not usable:
            raise ValueError(
                f"{training}: no {config.field} value has {config.min_per_class} records of each "
                f"class in the first {len(records)} {split}-split records (raise --limit or "
                "lower --min-per-class)"
            )
    options = ExtractOptions.of(config, out)
    (train,) = extract([training], layers=(layer,), split="train", options=options)
    (test,) = extract([training], layers=(layer,), split="test", options=options)
    try:
        groups = record_field(train, "pair_id")
    except ValueError as error:
        log.warning("heatmap: validation parts ungrouped: %s", error)
        groups = None
    stem = f"heatmap-{config.field}"
    results = out / f"{stem}.jsonl"
    result = heatmap(
        train,
        record_field(train, config.field),
        test,
        record_field(test, config.field),
        field=config.field,
        layer=layer,
        kind=config.kind,
        groups=groups,
        min_per_class=config.min_per_class,
        val_fraction=config.val_fraction,
        seed=config.seed,
        results=results,
        model=config.model,
        progress=config.progress,
    )
    plot = plot_heatmap(
        result,
        out / f"{stem}.png",
        title=f"{config.kind} probe AUROC across {config.field}: {config.model}, layer {layer}",
    )
    summary = {
        "layer": layer,
        "field": config.field,
        "kind": config.kind,
        "values": list(result.values),
        "auroc": [[None if np.isnan(x) else float(x) for x in row] for row in result.auroc],
        "tpr_at_fpr": [
            [None if np.isnan(x) else float(x) for x in row] for row in result.tpr_at_fpr
        ],
        "skipped_train": result.skipped_train,
        "skipped_eval": result.skipped_eval,
        "notes": result.notes,
        "n_train": train.n_records,
        "n_test": test.n_records,
        "results": str(results),
        "plot": str(plot),
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    return result.rows, summary
