"""`mup probes score`: a saved probe's score file per data set, in the `mup.monitors` format.

The probe file says what the probe reads: the model, the store layers, the capture site, the
token mask and the truncation of its training activations. Each data set is extracted with
exactly those settings into a content-keyed store under --store-dir, so a store that an
experiment or an earlier run wrote for the same data, model, site, layers and truncation is
reused instead of recomputed (point --store-dir at e.g. runs/compare/stores).

Axis letters: N records, T tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mup.experiments._common import ExtractOptions, extract

log = logging.getLogger("mup.experiments")

# Where both `score` and `view` keep their stores unless told otherwise: one folder, so the
# stores one command extracted serve the other.
DEFAULT_STORE_DIR = "runs/stores"
# The truncation used when a probe file does not record its own (probes saved before it was
# recorded): the experiment commands' default.
FALLBACK_MAX_TOKENS = 512
# `max_tokens` value meaning "as the probe file records".
FROM_PROBE = "probe"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeInput:
    """Where a saved probe's activations must come from (read from its metadata)."""

    model: str  # model spec the training activations were extracted with
    layers: tuple[int, ...]  # store layers the probe reads
    site: str  # "residual" or "normed"
    mask_mode: str  # which tokens the probe reads
    max_tokens: int | None  # truncation (conversations keep their last max_tokens tokens)
    model_revision: str | None = None  # pins the weights when the probe file records it


def probe_input(
    probe, *, source: str, model: str | None = None, max_tokens=FROM_PROBE
) -> ProbeInput:
    """What `probe` (loaded from `source`) reads; `model` / `max_tokens` override the file."""
    meta = probe.metadata
    if not probe.layers:
        raise ValueError(
            f"probe {source} records no store layers (it was trained on in-memory activations), "
            "so there is no layer to extract; train it on an activation store"
        )
    spec = model or meta.get("model")
    if not spec:
        raise ValueError(
            f"probe {source} records no model (metadata field 'model'); pass --model with the "
            "model its training activations came from"
        )
    if max_tokens == FROM_PROBE:
        recorded = meta.get("max_tokens")
        if recorded is None:
            log.warning(
                "probe %s records no max_tokens; truncating to %d tokens (pass --max-tokens)",
                source,
                FALLBACK_MAX_TOKENS,
            )
            max_tokens = FALLBACK_MAX_TOKENS
        elif recorded == "None":  # metadata values are strings; None = no truncation
            max_tokens = None
        else:
            try:
                max_tokens = int(recorded)
            except ValueError:
                raise ValueError(
                    f"probe {source}: metadata field 'max_tokens' is {recorded!r}, expected an "
                    "integer or None"
                ) from None
    return ProbeInput(
        model=str(spec),
        layers=tuple(probe.layers),
        site=meta.get("site", "residual"),
        mask_mode=meta.get("mask_mode", "all"),
        max_tokens=max_tokens,
        # An explicit --model replaces the recorded one, and with it the recorded revision.
        model_revision=None if model else meta.get("model_revision"),
    )


def monitor_name(probe) -> str:
    """The score files' monitor name of a probe: ``probe:<kind>@<layer>`` (layers joined by
    ``+`` for a multi-layer probe), as the `mup.monitors` docstring names them."""
    return f"probe:{probe.kind}@{'+'.join(str(x) for x in probe.layers)}"


# The parameters a probe applies to each token it reads: the read-out w, b and, for attention
# probes, the query q, qb. logreg's standardisation (mu, sd) and dom / lda's calibration
# (scale, shift) are affine maps around the same dot product: folded into w and b they add no
# per-token work, so they are not charged.
READOUT_PARAMS = ("w", "b", "q", "qb")


def probe_params(probe) -> int:
    """The probe's per-token parameter count, what `mup.monitors.probe_flops` charges."""
    return int(sum(np.asarray(probe.params[k]).size for k in READOUT_PARAMS if k in probe.params))


def locate_datasets(names: Sequence[str], data) -> list[tuple[str, Path]]:
    """(name, file) per --dataset: a `mup.data.find_dataset` name or an existing file (named by
    its stem). Errors before any model loads: an unknown name, a stakes set that is only found
    as the bundled fallback (its scores would carry the wrong data set's name), two arguments
    naming one file or one name."""
    from mup.data import dataset_names, find_dataset, is_bundled

    if not names:
        raise ValueError("at least one --dataset is needed")
    found: list[tuple[str, Path]] = []
    for arg in names:
        if arg in dataset_names():
            # "mini" is the package's own set: no data root holds it.
            path = find_dataset(arg, explicit=None if arg == "mini" else data)
            if arg != "mini" and is_bundled(path):
                raise FileNotFoundError(
                    f"--dataset {arg}: not found on this machine (only the bundled 80-record set, "
                    "which would be scored under this name); pass --data ROOT, set $MUP_DATA, "
                    "run `mup data download`, or score --dataset mini"
                )
            found.append((arg, path))
            continue
        path = Path(arg).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--dataset {arg!r}: neither a data set name ({', '.join(dataset_names())}) nor "
                "an existing .jsonl / .csv file"
            )
        found.append((path.stem, path))
    by_path: dict[Path, int] = {}
    by_name: dict[str, int] = {}
    for i, (name, path) in enumerate(found):
        first = by_path.setdefault(path.resolve(), i)
        if first != i:
            raise ValueError(
                f"--dataset {names[first]} and --dataset {names[i]} are the same file {path}"
            )
        first = by_name.setdefault(name, i)
        if first != i:
            raise ValueError(
                f"--dataset {names[first]} and --dataset {names[i]} would both be scored as "
                f"data set {name!r}"
            )
    return found


def extract_for(reads: ProbeInput, paths, *, store_dir, limit, progress: bool) -> list:
    """The probe's stores of `paths` (extracted where missing, reused where complete)."""
    options = ExtractOptions(
        model=reads.model,
        out=str(store_dir),
        max_tokens=reads.max_tokens,
        limit=limit,
        progress=progress,
        site=reads.site,
        mask_mode=reads.mask_mode,
    )
    return extract(paths, layers=reads.layers, split=None, options=options)


def check_store(reads: ProbeInput, store, *, source: str) -> None:
    """A clear error when `store` does not hold what the probe read at training time."""
    attrs = store.attrs
    problems = []
    revision = attrs.get("model_revision")
    if reads.model_revision and revision not in (None, reads.model_revision):
        problems.append(f"model revision {revision!r} (the probe's: {reads.model_revision!r})")
    elif not reads.model_revision and attrs.get("model") not in (None, reads.model):
        problems.append(f"model {attrs.get('model')!r} (the probe's: {reads.model!r})")
    for name in ("site", "mask_mode"):
        if attrs.get(name) not in (None, getattr(reads, name)):
            problems.append(f"{name} {attrs.get(name)!r} (the probe's: {getattr(reads, name)!r})")
    missing = [x for x in reads.layers if x not in tuple(store.layers)]
    if missing:
        problems.append(f"layers {list(store.layers)} (the probe reads {list(reads.layers)})")
    if problems:
        raise ValueError(
            f"store {store.url} does not match probe {source}: it has " + "; ".join(problems)
        )


def score_rows(probe, store, dataset: str, *, monitor: str, model: str, records) -> list[dict]:
    """Validated score-file rows of every record of `store`, in store order.

    `records` maps record id -> `mup.data.Record` (the data set the store was extracted from);
    FLOPs are the probe's own (`mup.monitors.probe_flops`): the monitored model computes the
    activations anyway.
    """
    from mup.monitors import label_of, probe_flops, score_row
    from mup.store import masked_lengths

    probs = probe.predict(store)  # [N]
    n_tokens = masked_lengths(store.offsets, store.mask)  # [N] tokens the probe reads
    n_params = probe_params(probe)
    rows = []
    for rid, p, n in zip(store.ids, probs.tolist(), n_tokens.tolist(), strict=True):
        record = records.get(rid)
        if record is None:
            raise ValueError(f"store {store.url}: record id {rid!r} is not in the data set file")
        rows.append(
            score_row(
                id=rid,
                dataset=dataset,
                label=label_of(record),
                score=p,
                monitor=monitor,
                flops=probe_flops(n_params, n),
                n_tokens=n,
                model=model,
            )
        )
    return rows


def score_filename(monitor: str, dataset: str) -> str:
    """``<monitor>__<dataset>.jsonl`` with characters a file name should not hold replaced."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9@+._-]+", "_", s).strip("_")  # noqa: E731
    return f"{slug(monitor)}__{slug(dataset)}.jsonl"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """One `mup probes score` run."""

    probe: str  # a probe file written by `Probe.save`
    datasets: tuple[str, ...]  # data set names (mup.data.find_dataset) or files
    out: str  # folder of the score files
    store_dir: str = DEFAULT_STORE_DIR  # content-keyed stores, reused across runs and commands
    data: str | None = None  # data root laid out like shared/data
    model: str | None = None  # override the probe's recorded model spec
    max_tokens: int | None | str = FROM_PROBE  # FROM_PROBE: as the probe file records
    limit: int | None = None  # first `limit` records of each data set (quick runs)
    name: str | None = None  # monitor name; default `monitor_name(probe)`
    progress: bool = True


def run_score(config: ScoreConfig) -> list[dict]:
    """Score every data set; returns per data set {dataset, path, n, mean_flops}.

    Every input is checked (probe file, data set names, probe metadata) before any model loads.
    """
    from mup import probes
    from mup.data import load_records
    from mup.monitors import write_scores

    probe = probes.load(config.probe)
    reads = probe_input(
        probe, source=str(config.probe), model=config.model, max_tokens=config.max_tokens
    )
    located = locate_datasets(config.datasets, config.data)
    monitor = config.name or monitor_name(probe)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stores = extract_for(
        reads,
        [path for _, path in located],
        store_dir=config.store_dir,
        limit=config.limit,
        progress=config.progress,
    )
    summary = []
    for (name, path), store in zip(located, stores, strict=True):
        check_store(reads, store, source=str(config.probe))
        records = {r.id: r for r in load_records(path)}
        rows = score_rows(probe, store, name, monitor=monitor, model=reads.model, records=records)
        written = write_scores(out / score_filename(monitor, name), rows)
        summary.append(
            {
                "dataset": name,
                "path": str(written),
                "n": len(rows),
                "mean_flops": float(np.mean([r["flops"] for r in rows])),
                "store": store.url,
            }
        )
    return summary
