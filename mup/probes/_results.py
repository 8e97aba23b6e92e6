"""Appending evaluation results to a JSONL file, one self-describing line per evaluation.

Axis letters: N evaluated records.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np

from mup._version import __version__


def _dataset(value, what: str) -> dict:
    """A dataset description: a name, a dict, or an activation store (its job attributes)."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        if "name" not in value:
            raise ValueError(f"append_result: {what} dict needs a 'name' key, got {sorted(value)}")
        return dict(value)
    attrs = getattr(value, "attrs", None)
    if isinstance(attrs, dict) and "dataset" in attrs:
        return {
            "name": attrs["dataset"],
            "sha256": attrs.get("dataset_sha256"),
            "store": getattr(value, "url", None),
        }
    raise TypeError(
        f"append_result: {what} must be a dataset name, a dict with 'name', or an activation "
        f"store; got {type(value).__name__}"
    )


def append_result(
    path,
    *,
    probe,
    model: str,
    layer,
    train,
    eval,  # noqa: A002 (the field name readers expect)
    metrics: dict,
    scores,
    labels,
    ids=None,
) -> dict:
    """Append one result line to the JSONL file at `path` (created if absent); return it.

    Args:
      probe: the trained `Probe` (its kind and config are recorded) or a spec dict.
      model: model name or spec the activations came from.
      layer: layer(s) read.
      train, eval: dataset name, dict with "name" (and e.g. "sha256"), or activation store.
      metrics: e.g. `mup.metrics.evaluate(...)`; every value must be finite.
      scores, labels, ids: per-record arrays [N] (ids optional).
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"append_result: scores {scores.shape} and labels {labels.shape} must both be [N]"
        )
    if not np.isfinite(scores).all():
        raise ValueError("append_result: scores contain non-finite values")
    if ids is not None and len(ids) != scores.shape[0]:
        raise ValueError(f"append_result: {len(ids)} ids for {scores.shape[0]} scores")
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"append_result: metric {k!r} is {v}")
    spec = (
        probe
        if isinstance(probe, dict)
        else {
            "kind": probe.kind,
            "config": probe.config.to_dict(),
            "layers": list(probe.layers),
            "combine": probe.combine,
            "d_model": probe.d_model,
        }
    )
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mup_version": __version__,
        "probe": spec,
        "model": str(model),
        "layer": layer if isinstance(layer, int) else [int(x) for x in layer],
        "train": _dataset(train, "train"),
        "eval": _dataset(eval, "eval"),
        "metrics": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metrics.items()},
        "scores": scores.tolist(),
        "labels": labels.astype(int).tolist(),
        "ids": None if ids is None else [str(i) for i in ids],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    return record
