"""The `Probe` object, `fit` and `load`.

Axis letters: T tokens, N records, D model width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mup._version import __version__
from mup.probes._batches import StreamedBuckets, sequence_source
from mup.probes._closed_form import train_dom, train_lda, train_logreg
from mup.probes._config import (
    GRADIENT_KINDS,
    POOLED_KINDS,
    SEQUENCE_KINDS,
    ProbeConfig,
    default_config,
)
from mup.probes._heads import pooled_logits
from mup.probes._stream import Pooled, pooled, record_chunks
from mup.probes._train import sequence_forward, train_pooled, train_sequence

_FORMAT = "mup.probe/1"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Probe:
    """A trained probe: its config, parameters and where its training data came from.

    Attributes:
      config: the hyperparameters it was trained with.
      params: name -> np.ndarray (see mup.probes._heads for the names per kind).
      d_model: width D of the activations it reads (after combining layers).
      layers: store layers it reads (empty for probes trained on unlabelled-layer arrays).
      combine: how several layers are combined, "concat" or "sum".
      history: training record: per-epoch train_loss / val_auroc, best_epoch, epochs_run, ...
      metadata: free-form strings saved with the probe (model name, dataset, ...).
    """

    config: ProbeConfig
    params: dict
    d_model: int
    layers: tuple[int, ...] = ()
    combine: str = "concat"
    history: dict = dataclasses.field(default_factory=dict)
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.kind

    def _check_width(self, d: int) -> None:
        if d != self.d_model:
            raise ValueError(
                f"d_model mismatch: this {self.kind} probe reads width {self.d_model} "
                f"(layers {list(self.layers)}, {self.combine}) but the data has width {d}"
            )

    def _per_token(self, data, fn) -> tuple[np.ndarray, np.ndarray]:
        """(fn(acts) of every chunk concatenated [T], offsets [N+1]); `fn` maps the Activations
        of consecutive records to one value per token. Stores stream chunk by chunk."""
        values, offsets = [], [np.zeros(1, np.int64)]
        for acts in record_chunks(data, self.layers or None, combine=self.combine):
            self._check_width(acts.d_model)
            values.append(fn(acts))
            offsets.append(acts.offsets[1:] + offsets[-1][-1])
        return np.concatenate(values), np.concatenate(offsets)

    def _pooled(self, data) -> Pooled:
        p = pooled(data, self.layers or None, combine=self.combine, method=POOLED_KINDS[self.kind])
        self._check_width(p.x.shape[1])
        return p

    def _jparams(self) -> dict:
        return {k: jnp.asarray(v) for k, v in self.params.items()}

    def logits(self, data) -> np.ndarray:
        """Per-record logits [N] float32."""
        if self.kind in POOLED_KINDS:
            return _pooled_logits_np(self.params, self._pooled(data).x)
        source = sequence_source(
            data,
            self.layers or None,
            combine=self.combine,
            min_bucket=self.config.min_bucket,
            what="data",
            train=False,
        )
        self._check_width(source.d_model)
        return source.logits(sequence_forward(self.config), self._jparams())

    def predict(self, data) -> np.ndarray:
        """Probability of high stakes per record, float32 [N]."""
        return _sigmoid(self.logits(data))

    def token_scores(self, data) -> tuple[np.ndarray, np.ndarray]:
        """Per-token logits of the probe's linear read-out, (scores [T] float32, offsets [N+1]).

        Every token gets a score (unmasked ones too, for display); only masked tokens ever
        enter `predict`. For attention probes this is the classifier applied to each token.
        """

        def scores(acts):
            step = max(1, (1 << 24) // max(acts.d_model, 1))  # bound the float32 copy
            parts = [
                _pooled_logits_np(self.params, np.asarray(acts.acts[t0 : t0 + step], np.float32))
                for t0 in range(0, acts.acts.shape[0], step)
            ]
            return np.concatenate(parts)

        return self._per_token(data, scores)

    def attention_weights(self, data) -> tuple[np.ndarray, np.ndarray]:
        """Attention probes: per-token weights [T] (sum 1 over each record's masked tokens,
        0 on unmasked tokens) and offsets [N+1]."""
        if self.kind != "attention":
            raise ValueError(f"attention_weights needs an attention probe, this is {self.kind!r}")
        q, qb = np.asarray(self.params["q"]), float(self.params["qb"])

        def weights(acts):
            a = (np.asarray(acts.acts, np.float32) @ q + qb) / np.sqrt(np.float32(acts.d_model))
            a = a.astype(np.float64)
            mask = np.ones(a.shape[0], bool) if acts.mask is None else acts.mask
            a_masked = np.where(mask, a, -np.inf)
            rec_max = np.maximum.reduceat(a_masked, acts.offsets[:-1])  # [N]
            e = np.where(mask, np.exp(a - np.repeat(rec_max, np.diff(acts.offsets))), 0.0)
            denom = np.add.reduceat(e, acts.offsets[:-1])  # [N]
            return (e / np.repeat(denom, np.diff(acts.offsets))).astype(np.float32)

        return self._per_token(data, weights)

    def evaluate(self, data, **kwargs) -> dict:
        """`mup.metrics.evaluate` of this probe's predictions on labelled data."""
        from mup import metrics

        labels = data.labels if not isinstance(data, list | tuple) else None
        if isinstance(data, list | tuple):
            labels = np.concatenate([np.asarray(x.labels) for x in data])
        if labels is None:
            raise ValueError("evaluate: the data has no labels")
        return metrics.evaluate(self.predict(data), labels, **kwargs)

    def save(self, path) -> Path:
        """Write config, parameters and metadata to one safetensors file."""
        from safetensors.numpy import save_file

        path = Path(path)
        header = {
            "format": _FORMAT,
            "mup_version": __version__,
            "config": self.config.to_dict(),
            "d_model": self.d_model,
            "layers": list(self.layers),
            "combine": self.combine,
            "history": self.history,
            "metadata": self.metadata,
        }
        # copy(order="C"), not np.ascontiguousarray: the latter makes 0-d scalars (b, qb) [1].
        tensors = {k: np.asarray(v, np.float32).copy(order="C") for k, v in self.params.items()}
        save_file(tensors, str(path), metadata={"mup_probe": json.dumps(header)})
        return path


def _pooled_logits_np(params: dict, x: np.ndarray) -> np.ndarray:
    """Logits of the linear read-out on rows of x [R, D] (pooled vectors or single tokens), in
    numpy: the same read-out as training's `pooled_logits`, without a device round trip."""
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    return np.asarray(pooled_logits(p, x)).astype(np.float32)


# Parameters that are scalars (see mup.probes._heads).
_SCALAR_PARAMS = ("b", "qb", "scale", "shift")


class ProbeFileError(ValueError):
    """A file that cannot be read as a probe: the message is one line naming the file and
    what is wrong with it (empty, truncated, not safetensors, not a mup probe, ...)."""


def load(path) -> Probe:
    """Read a probe written by `Probe.save`; raises ProbeFileError for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe file {path} does not exist")
    if path.stat().st_size == 0:
        raise ProbeFileError(f"{path}: empty file (0 bytes), not a probe")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own untyped errors
        problem = " ".join(str(e).split()) or type(e).__name__
        raise ProbeFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {problem}"
        ) from None
    if "mup_probe" not in meta:
        raise ProbeFileError(f"{path}: not a mup probe file (no 'mup_probe' metadata entry)")
    try:
        header = json.loads(meta["mup_probe"])
    except ValueError as e:
        raise ProbeFileError(f"{path}: the probe header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ProbeFileError(f"{path}: unsupported probe format {got!r:.80} (expected {_FORMAT})")
    try:
        probe = Probe(
            config=ProbeConfig(**header["config"]),
            params=params,
            d_model=int(header["d_model"]),
            layers=tuple(int(x) for x in header["layers"]),
            combine=header["combine"],
            history=header["history"],
            metadata=header["metadata"],
        )
    except (KeyError, TypeError, ValueError) as e:
        problem = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ProbeFileError(f"{path}: malformed probe header: {problem}") from None
    # Files saved before the scalar fix hold b, qb, scale and shift as [1]: read back as [].
    for name in _SCALAR_PARAMS:
        if name in params and params[name].shape == (1,):
            params[name] = params[name].reshape(())
    w = params.get("w")
    if w is None or "b" not in params or w.shape != (probe.d_model,):
        shape = None if w is None else w.shape
        raise ProbeFileError(
            f"{path}: expected parameters w [{probe.d_model}] and b, got {sorted(params)} "
            f"(w shape {shape})"
        )
    bad = [k for k, v in params.items() if not np.issubdtype(v.dtype, np.floating)]
    bad += [k for k, v in params.items() if k not in bad and not np.isfinite(v).all()]
    if bad:
        raise ProbeFileError(f"{path}: parameters {bad} are not finite floating-point values")
    return probe


def fit(
    kind: str,
    data,
    *,
    layer=None,
    val=None,
    seed: int = 0,
    combine: str = "concat",
    config: ProbeConfig | None = None,
    metadata: dict | None = None,
    memory_budget: int | None = None,
    init=None,
    **overrides,
) -> Probe:
    """Train a probe of `kind` on `data` (an activation store or `Activations`).

    Args:
      kind: one of `PROBE_KINDS`.
      data: training records; records labelled -1 are left out.
      layer: store layer (int) or layers (list, combined by `combine`); required for stores.
      val: optional validation data for early stopping on AUROC (the best epoch is kept).
      seed: initialisation and shuffling seed; the same seed gives identical parameters.
      config: a full ProbeConfig; by default `default_config(kind, **overrides)`.
      memory_budget: bytes of activations a sequence probe (max / softmax / rolling /
        attention) may hold while training. A store (or list of stores) whose padded batches
        need more is streamed chunk by chunk every epoch instead of loaded (slower: each epoch
        reads the store again). Default: a quarter of host RAM, and half of the accelerator's
        memory. Pooled kinds always stream stores and keep only [N, D] pooled vectors.
      init: a `Probe` of the same kind (or its params dict) to start training from instead of
        a random initialisation: fine-tuning / warm start, e.g. a probe trained on one data set
        continued for a few epochs on another. Gradient kinds only (the closed-form and Newton
        kinds have no starting point); the optimiser state and learning-rate schedule start
        afresh. Its width must equal the data's.
      **overrides: hyperparameters replacing the defaults, e.g. `epochs=50, lr=1e-3`.
    """
    if config is None:
        config = default_config(kind, **overrides)
    elif overrides or config.kind != kind:
        raise ValueError("pass either config= (with the same kind) or keyword overrides")
    if init is not None:
        # Checked before any activation is read: pooling a large store takes minutes.
        _check_init_kind(init, kind)
    info: dict = {}
    if kind in POOLED_KINDS:
        # Pool once (streaming stores chunk by chunk), then train on [N, D] vectors.
        method = POOLED_KINDS[kind]
        train = pooled(data, layer, combine=combine, method=method).labelled("training data")
        layers, d_model = train.layers, train.x.shape[1]
        val_p = None
        if val is not None:
            val_p = pooled(val, layer, combine=combine, method=method).labelled("validation data")
            _check_val_width(d_model, val_p.x.shape[1])
        x, y = train.x, train.labels.astype(np.int32)
        info["n_train"] = int(x.shape[0])
        if kind == "dom":
            params = train_dom(x, y)
        elif kind == "lda":
            params = train_lda(x, y, config.shrinkage)
        elif kind == "logreg":
            params, info2 = train_logreg(x, y, config.c, config.max_newton_steps)
            info |= info2
        else:
            xv = None if val_p is None else val_p.x
            yv = None if val_p is None else val_p.labels.astype(np.int32)
            start = None if init is None else _init_params(init, kind, d_model)
            params, hist = train_pooled(config, x, y, xv, yv, seed, init=start)
            info |= hist
        val_eval = val_p
    else:
        assert kind in SEQUENCE_KINDS
        source = functools.partial(
            sequence_source,
            layer=layer,
            combine=combine,
            min_bucket=config.min_bucket,
            train=True,
            memory_budget=memory_budget,
        )
        train = source(data, what="training data")
        layers, d_model = train.layers, train.d_model
        val_eval = None
        if val is not None:
            val_eval = source(val, what="validation data")
            _check_val_width(d_model, val_eval.d_model)
        info["n_train"] = train.n
        if isinstance(train, StreamedBuckets):
            info["streamed"] = {
                "chunks": len(train.chunks),
                "max_chunk_bytes": train.max_chunk_bytes,
            }
        start = None if init is None else _init_params(init, kind, d_model)
        params, hist = train_sequence(config, train, val_eval, seed, init=start)
        info |= hist
    if init is not None:
        info["warm_start"] = True
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    bad = sorted(k for k, v in params.items() if not np.isfinite(v).all())
    if bad:
        raise FloatingPointError(
            f"{kind} probe training diverged: parameter(s) {bad} are not finite; lower `lr` "
            "(gradient probes) or raise the regularisation (`c` for logreg, `shrinkage` for lda)"
        )
    metadata = dict(metadata or {})
    attrs = getattr(data, "attrs", None)
    if isinstance(attrs, dict):
        # Where the activations came from: a server or another store must read the same site,
        # and `mup probes score` re-extracts with the same truncation.
        for name in ("model", "model_revision", "site", "mask_mode", "max_tokens"):
            if name in attrs:
                metadata.setdefault(name, str(attrs[name]))
    probe = Probe(
        config=config,
        params=params,
        d_model=d_model,
        layers=layers,
        combine=combine,
        history=info,
        metadata=metadata,
    )
    if val_eval is not None:
        from mup import metrics

        z = (
            _pooled_logits_np(probe.params, val_eval.x)
            if kind in POOLED_KINDS
            else val_eval.logits(sequence_forward(config), probe._jparams())
        )
        probe.history["val_auroc_final"] = metrics.auroc(z, val_eval.labels)
    return probe


def _check_init_kind(init, kind: str) -> None:
    if kind not in GRADIENT_KINDS:
        raise ValueError(
            f"init= needs a gradient-trained kind ({', '.join(GRADIENT_KINDS)}); {kind!r} is "
            "fitted in closed form and has no starting point"
        )
    if isinstance(init, Probe):
        if init.kind != kind:
            raise ValueError(f"init= is a {init.kind!r} probe; it cannot start a {kind!r} probe")
    elif not isinstance(init, dict):
        raise TypeError(f"init= must be a Probe or a params dict, got {type(init).__name__}")


def _init_params(init, kind: str, d_model: int) -> dict:
    """The starting parameters from `init` (checked against the kind's names and shapes), as
    float32 jax arrays: the training loops carry them as a pytree of that structure."""
    params = init.params if isinstance(init, Probe) else init
    want = {"w": (d_model,), "b": ()}
    if kind == "attention":
        want |= {"q": (d_model,), "qb": ()}
    if set(params) != set(want):
        raise ValueError(
            f"init= has parameters {sorted(params)}; a {kind} probe has {sorted(want)}"
        )
    shapes = {k: tuple(np.shape(v)) for k, v in params.items()}
    bad = {k: shapes[k] for k in want if shapes[k] != want[k]}
    if bad:
        raise ValueError(
            f"init= parameter shapes {bad} do not fit data of width {d_model} "
            f"(expected {dict((k, want[k]) for k in bad)})"
        )
    return {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in params.items()}


def _check_val_width(d_train: int, d_val: int) -> None:
    if d_train != d_val:
        raise ValueError(
            f"d_model mismatch: training data has width {d_train}, validation data {d_val}"
        )
