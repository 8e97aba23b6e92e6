"""Shared pieces of the probe experiments: data sets, extraction, record metadata, files.

Axis letters: N records, K folds.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mup._plots import new_figure, save_figure  # noqa: F401 (re-exported for the experiments)
from mup._resolve import DEFAULT_MODEL

log = logging.getLogger("mup.experiments")

# The four out-of-distribution dev sets of the MUP paper, by short name -> mup.data name.
DEV_SETS = ("anthropic", "mt", "mts", "toolace")


def default_layer(model: str) -> int:
    """The layer `mup extract` would default to for `model` (a configs/models entry whose
    name or spec equals it); a clear error naming --layer for models without one."""
    from mup.extract import default_layers

    (layer,) = default_layers(model)
    return layer


def config_layer(config) -> int:
    """An experiment config's layer: its own, else its model's default."""
    return default_layer(config.model) if config.layer is None else int(config.layer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """How experiment commands extract activations (see `mup.extract.ExtractConfig`)."""

    model: str = DEFAULT_MODEL  # model spec
    out: str = "runs/experiments"  # store root; stores are content-keyed, re-runs are no-ops
    max_tokens: int | None = 512  # longer chats keep their last max_tokens tokens
    limit: int | None = None  # first `limit` records of each data set (quick runs)
    progress: bool = True
    site: str = "residual"  # capture site (a saved probe names the one it was trained on)
    mask_mode: str = "all"  # tokens probes read (likewise)

    @classmethod
    def of(cls, config, out: Path) -> ExtractOptions:
        """The options of an experiment's config (its model, truncation, limit and progress),
        with the stores under ``out/stores``."""
        return cls(
            model=config.model,
            out=str(out / "stores"),
            max_tokens=config.max_tokens,
            limit=config.limit,
            progress=config.progress,
        )


def extract(paths, *, layers, split: str | None, options: ExtractOptions) -> list:
    """Extract `layers` of data sets (optionally one split of each) and open their stores.

    One `mup.extract.run` for all paths: the model loads and compiles once.
    """
    from mup import store
    from mup.extract import ExtractConfig, run

    config = ExtractConfig(
        model=options.model,
        layers=tuple(int(x) for x in layers),
        datasets=tuple(str(p) for p in paths),
        out=str(Path(options.out).resolve()),
        split=split,
        site=options.site,
        mask_mode=options.mask_mode,
        limit=options.limit,
        max_tokens=options.max_tokens,
        resume=True,
        progress=options.progress,
    )
    # The current stdout, not the one bound as run()'s default when mup.extract was imported
    # (which may be closed by now, e.g. under a test runner's capture).
    summary = run(config, out=sys.stdout)
    return [store.open(url) for url in summary.stores]


def find(name: str, data) -> Path:
    """Path of data set `name` ("training", "dev/anthropic", ...), searched as mup.data says."""
    from mup.data import find_dataset

    return find_dataset(name, explicit=data)


def find_distinct(names: Sequence[str], data) -> list[Path]:
    """`find` for each name; ValueError when two names resolve to one file.

    With no data on the machine every stakes set falls back to the same bundled file: an
    experiment that compares sets would then compare a file with itself (and collide on its
    stores), so it is refused before any model loads.
    """
    paths = [find(name, data) for name in names]
    seen: dict[Path, str] = {}
    for name, path in zip(names, paths, strict=True):
        first = seen.setdefault(path.resolve(), name)
        if first != name:
            raise ValueError(
                f"data sets {first!r} and {name!r} both resolve to {path}; this experiment needs "
                "distinct sets (run `mup data download` or set $MUP_DATA to a data root)"
            )
    return paths


def find_training_and_dev(data, sets: Sequence[str] = DEV_SETS) -> tuple[Path, list[Path]]:
    """The synthetic training set and the dev sets `sets` (short names), located and checked
    distinct (`find_distinct`) before any model loads."""
    training, *dev = find_distinct(["training", *(f"dev/{name}" for name in sets)], data)
    return training, dev


def extract_train_val_dev(
    training,
    dev: Sequence,
    sets: Sequence[str] = DEV_SETS,
    *,
    layer: int,
    options: ExtractOptions,
    train_options: ExtractOptions | None = None,
) -> tuple:
    """(train, val, {name: dev store}): the stores of the training set's train split (with
    `train_options` when given, e.g. another limit), of its test split (early stopping), and of
    each dev set in `dev`, named by `sets`."""
    (train,) = extract([training], layers=(layer,), split="train", options=train_options or options)
    (val,) = extract([training], layers=(layer,), split="test", options=options)
    stores = extract(dev, layers=(layer,), split=None, options=options)
    return train, val, dict(zip(sets, stores, strict=True))


def selected_records(path, *, split: str | None, limit: int | None):
    """The records `extract` would store for (path, split, limit), in store order, read from
    the file alone: experiments check labels and fields with it before any model loads."""
    from mup.data import Dataset, load_records

    dataset = load_records(path)
    if split is not None:
        dataset = dataset.split(split)
    if limit is not None:
        dataset = Dataset(dataset[:limit], path=dataset.path, sha256=dataset.sha256)
    return dataset


def record_field(store, field: str) -> np.ndarray:
    """The per-record `field` (e.g. pair_id, scale_labels) of a store's records, in store order.

    Stores keep ids and labels only; the other columns come from the data set file the store
    was extracted from (its `dataset` attribute), joined on the record id.
    """
    from mup.data import load_records

    path = store.attrs.get("dataset")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"store {store.url}: its data set file {path!r} (attribute 'dataset') is not "
            f"readable, so the field {field!r} cannot be looked up"
        )
    records = {r.id: r for r in load_records(path)}
    values = []
    for rid in store.ids:
        record = records.get(rid)
        if record is None:
            raise ValueError(f"store {store.url}: record id {rid!r} is not in {path}")
        value = record.scale_label if field == "scale_labels" else record.fields.get(field)
        if value is None:
            raise ValueError(f"{record.source}: record {rid!r} has no {field!r} field")
        values.append(value)
    return np.asarray(values)


def labels_of(data) -> np.ndarray:
    """[N] int8 labels of a store or Activations (1, 0, -1 unlabelled); an error if it has none."""
    labels = getattr(data, "labels", None)
    if labels is None:
        raise ValueError(f"{getattr(data, 'url', 'the data')}: no labels; probes need them")
    return np.asarray(labels, np.int8)


def read_rows(data, layer, rows):
    """The records `rows` ([R] sorted indices) of a store or Activations, as Activations.

    Stores are read row by row rather than whole: an experiment that draws many small subsets
    of a large dev set then never holds the whole set in memory.
    """
    from mup.probes import Activations

    rows = np.asarray(rows, np.int64)
    if isinstance(data, Activations):
        return data.select(rows)
    return Activations.from_store(data, layer, rows=rows)


def dataset_info(store, name: str) -> dict:
    """The dataset description written to results files."""
    return {
        "name": name,
        "file": store.attrs.get("dataset"),
        "sha256": store.attrs.get("dataset_sha256"),
        "split": store.attrs.get("split"),
        "limit": store.attrs.get("limit"),
        "store": store.url,
    }


def describe(data, name: str) -> dict:
    """`dataset_info` of a store; in-memory Activations are described by their name alone."""
    if hasattr(data, "attrs") and hasattr(data, "url"):
        return dataset_info(data, name)
    return {"name": name}


def progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="fit", disable=not enabled, dynamic_ncols=True)
