"""The finetuned baseline: the monitored LLM itself trained as a high-stakes classifier.

Axis letters: N records, B rows of a batch, P padded length, D model width, L layers.

The LM head is replaced by a 2-way linear head (w [D, 2], bias [2]) on the final-norm hidden
state of each conversation's last real token (`classifier_logits`); P(high stakes) is the
softmax of the two logits. The body is trained in full or through LoRA adapters
(`mup.monitors.LoraConfig`, merged into the frozen weights inside the jitted step).

Training (`finetune`): the chat-templated conversations (truncated on the left, so the end of
each conversation is kept) are cut into padded micro-batches of B rows from a ladder of length
buckets (XLA compiles one program per bucket); gradients of `grad_accum` micro-batches are
summed before one AdamW step on a warmup-cosine schedule. Validation AUROC is computed every
`eval_every` steps (or once per epoch); each improvement is saved as the checkpoint, and
training stops after `patience` evaluations without one.

A checkpoint directory holds ``finetune.json`` (base model, configs, history, and the name of
the weights file) and ``weights-<step>.safetensors`` (the head and the adapters, or every
parameter for full finetuning). The json is written last, by an atomic rename: a crash leaves
the previous checkpoint or none. ``resume.json`` + ``resume-<step>.safetensors`` hold the
optimizer state of the latest evaluation, so an interrupted run continues with ``resume=True``.

Scoring (`score_records`) gives P(high) per record and writes score files whose monitor is
``finetuned:<model>`` (``/lora-r<R>`` with adapters) and whose FLOPs are the forward pass through
every block plus the head, 2 * D * 2 per record.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mup import metrics, native
from mup.data import Record
from mup.models import Model, ModelConfig, forward, load_model, param_shapes
from mup.monitors._flops import llm_flops
from mup.monitors._lora import LoraConfig, init_lora, lora_shapes, merge_lora
from mup.monitors._scores import label_of, score_row, write_scores

__all__ = [
    "FinetuneCheckpointError",
    "FinetuneConfig",
    "FinetuneResult",
    "Finetuned",
    "check_training_data",
    "classifier_logits",
    "finetune",
    "head_flops",
    "init_head",
    "last_token_index",
    "load_finetuned",
    "monitor_name",
    "score_records",
]

logger = logging.getLogger("mup.monitors.finetune")

FORMAT = "mup-finetune"
VERSION = 1
META_FILE = "finetune.json"
RESUME_FILE = "resume.json"
N_CLASSES = 2  # column 0 low stakes, column 1 high stakes
# Spacing of the padded-length ladder: doubling keeps the number of compiled train programs
# (each a forward and a backward pass) at log2(max_tokens / min_bucket) + 1, at the price of
# ~25% padding on a uniform length mix.
BUCKET_GROWTH = 2.0
# Learning rates when none is given: the usual ones for LoRA and for full finetuning of
# instruction-tuned models at these sizes (full finetuning moves every weight, so 10x lower).
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
DTypeName = Literal["float32", "bfloat16"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class FinetuneCheckpointError(ValueError):
    """A finetune checkpoint is missing, malformed, or does not fit the model it is used with."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to finetune. Every field has a default that runs; see `finetune`.

    lora:            adapters to train (`LoraConfig`), or None for full finetuning.
    epochs:          passes over the training set (early stopping may end sooner).
    lr:              peak learning rate; None = 2e-4 with LoRA, 2e-5 for full finetuning.
    weight_decay:    AdamW's decoupled decay, on matrices only (not norms, biases).
    warmup_ratio:    fraction of the optimizer steps spent warming up linearly from 0.
    min_lr_ratio:    the cosine decays to lr * min_lr_ratio at the last step.
    grad_clip:       global gradient-norm clip, per optimizer step.
    batch_size:      B, rows per micro-batch (one forward/backward pass).
    grad_accum:      micro-batches summed per optimizer step (effective batch B * grad_accum).
    eval_batch_size: rows per batch when scoring the validation set.
    max_tokens:      conversations longer than this keep their last max_tokens tokens.
    min_bucket:      the shortest padded length; the ladder doubles up to max_tokens.
    eval_every:      optimizer steps between validations; None = at the end of every epoch.
    patience:        validations without a better AUROC before stopping (0 = never stop).
    dtype:           compute dtype of the model body; the head, adapters, full-finetuning
                     master weights and optimizer state stay float32. bfloat16 is faster on
                     accelerators and AVX512-BF16 CPUs; float32 is exact.
    seed:            head and adapter init, and the order of the batches.
    """

    lora: LoraConfig | None = LoraConfig()
    epochs: int = 1
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    eval_batch_size: int = 16
    max_tokens: int = 512
    min_bucket: int = 32
    eval_every: int | None = None
    patience: int = 3
    dtype: DTypeName = "float32"
    seed: int = 0

    def __post_init__(self):
        problems = []

        def positive_int(name: str, minimum: int = 1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                problems.append(f"{name} must be an int >= {minimum}, got {value!r}")

        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size"):
            positive_int(name)
        positive_int("max_tokens", 2)
        positive_int("min_bucket")
        positive_int("patience", 0)
        if self.eval_every is not None:
            positive_int("eval_every")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            problems.append(f"lora must be a LoraConfig or None, got {type(self.lora).__name__}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr!r}")
        for name, low, high in (
            ("weight_decay", 0.0, math.inf),
            ("warmup_ratio", 0.0, 1.0),
            ("min_lr_ratio", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and low <= value <= high):
                problems.append(f"{name} must be in [{low}, {high}], got {value!r}")
        if not (isinstance(self.grad_clip, int | float) and self.grad_clip > 0):
            problems.append(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("invalid FinetuneConfig: " + "; ".join(problems))

    @property
    def mode(self) -> Literal["lora", "full"]:
        return "full" if self.lora is None else "lora"

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.mode] if self.lr is None else float(self.lr)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lora"] = None if self.lora is None else self.lora.as_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        d = dict(d)
        lora = d.pop("lora", None)
        if lora is not None:
            lora = LoraConfig(
                rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=tuple(lora["targets"])
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FinetuneCheckpointError(f"unknown finetune config fields {unknown}")
        return cls(lora=lora, **d)


# ---- the classifier --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def init_head(d_model: int, key: jax.Array) -> dict[str, jax.Array]:
    """The 2-way head: w [D, 2] normal with std 0.02 (transformers' sequence-classification
    init), bias [2] zero."""
    w = 0.02 * jax.random.normal(key, (d_model, N_CLASSES), jnp.float32)
    return {"w": w, "bias": jnp.zeros((N_CLASSES,), jnp.float32)}


def last_token_index(valid: jax.Array) -> jax.Array:
    """valid bool [B, P] -> int32 [B], the position of each row's LAST real token, whichever
    side the row is padded on (a row with no real token gets P - 1)."""
    P = valid.shape[1]
    return (P - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)


def classifier_logits(params, head, tokens, valid, *, config: ModelConfig) -> jax.Array:
    """Logits [B, 2] (float32; column 1 = high stakes) of tokens [B, P] with real-token mask
    valid [B, P], padded on either side.

    Rope positions count real tokens only, so a left-padded row computes what the unpadded
    row does. The LM head is never run: the blocks stop at the final norm.
    """
    valid = valid.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
    out = forward(
        params,
        tokens,
        positions,
        config=config,
        valid=valid,
        capture=(config.n_layers,),
        logits=False,
    )
    hidden = out.hidden[config.n_layers]  # [B, P, D], after the final norm
    last = last_token_index(valid)  # [B]
    x = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return x.astype(jnp.float32) @ head["w"].astype(jnp.float32) + head["bias"]  # [B, 2]


def head_flops(config: ModelConfig) -> float:
    """FLOPs of the head per record: one [D] x [D, 2] product."""
    return 2.0 * config.d_model * N_CLASSES


def monitor_name(model_name: str, lora: LoraConfig | None) -> str:
    """``finetuned:<model>`` or ``finetuned:<model>/lora-r<R>`` (the last path component of
    the model's name, so a hub id's organisation does not add a "/")."""
    short = str(model_name).rstrip("/").rsplit("/", 1)[-1]
    return f"finetuned:{short}" + ("" if lora is None else f"/lora-r{lora.rank}")


# ---- compiled programs -----------------------------------------------------------------------

_PROGRAMS: dict = {}


def _body_params(trainable, frozen, lora: LoraConfig | None, dtype):
    """The decoder parameters a step computes with: base + adapters, or the (cast) full set."""
    if lora is None:
        return jax.tree.map(lambda w: w.astype(dtype), trainable["params"])
    return merge_lora(frozen, trainable["lora"], lora)


def _programs(config: ModelConfig, lora: LoraConfig | None, dtype_name: str):
    """(logits, micro-step) jitted once per (architecture, adapters, dtype); XLA then caches
    one executable per batch shape."""
    key = (config, lora, dtype_name)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    dtype = _DTYPES[dtype_name]

    def logits_fn(trainable, frozen, tokens, valid):
        params = _body_params(trainable, frozen, lora, dtype)
        return classifier_logits(params, trainable["head"], tokens, valid, config=config)

    def loss_sum(trainable, frozen, tokens, valid, labels, weights):
        logits = logits_fn(trainable, frozen, tokens, valid)  # [B, 2]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B]
        return jnp.sum(losses * weights)

    grad_fn = jax.value_and_grad(loss_sum)

    def micro(trainable, frozen, acc, tokens, valid, labels, weights):
        """Add one micro-batch's summed-loss gradient to acc (donated: updated in place)."""
        loss, grads = grad_fn(trainable, frozen, tokens, valid, labels, weights)
        return jax.tree.map(jnp.add, acc, grads), loss

    programs = (jax.jit(logits_fn), jax.jit(micro, donate_argnums=(2,)))
    _PROGRAMS[key] = programs
    return programs


def _optimizer(cfg: FinetuneConfig, total_steps: int, trainable) -> optax.GradientTransformation:
    warmup = round(cfg.warmup_ratio * total_steps)
    peak = cfg.learning_rate
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * cfg.min_lr_ratio,
    )

    # Decay pulls a weight towards 0: right for matrices, wrong for norm weights (identity 1)
    # and biases.
    def decays(path, leaf) -> bool:
        name = jax.tree_util.keystr(path)
        return not ("norm" in name or "bias" in name)

    mask = jax.tree_util.tree_map_with_path(decays, trainable)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        # optax counts steps from 0, where the warmup's rate is 0: shifted by one, the first
        # step already learns (at peak / warmup) and the last one lands on the final rate.
        optax.adamw(lambda count: schedule(count + 1), weight_decay=cfg.weight_decay, mask=mask),
    )


def _update_program(cfg: FinetuneConfig, total_steps: int, trainable):
    """(optimizer, jitted update step), shared by runs with the same schedule and shapes."""
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), trainable)
    key = (
        "update",
        cfg,
        total_steps,
        jax.tree.structure(trainable),
        tuple(jax.tree.leaves(shapes)),
    )
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    tx = _optimizer(cfg, total_steps, trainable)

    def update(trainable, opt_state, acc, n_rows):
        grads = jax.tree.map(lambda g: g / n_rows, acc)  # mean over the step's real rows
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, jax.tree.map(jnp.zeros_like, acc), optax.tree.norm(grads)

    _PROGRAMS[key] = tx, jax.jit(update, donate_argnums=(0, 1, 2))
    return _PROGRAMS[key]


# ---- tokens and batches ----------------------------------------------------------------------


def _buckets(cfg: FinetuneConfig) -> tuple[int, ...]:
    """Padded lengths min_bucket, 2 * min_bucket, ... and max_tokens itself last."""
    ladder = native.length_buckets(cfg.max_tokens, min_len=cfg.min_bucket, growth=BUCKET_GROWTH)
    return tuple(b for b in ladder if b < cfg.max_tokens) + (cfg.max_tokens,)


@dataclasses.dataclass(frozen=True, eq=False)
class _Tokens:
    """Ragged token ids of N records: record i owns ids[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray  # int32 [T]
    offsets: np.ndarray  # int64 [N+1]
    n_truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [N]

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _tokenize(tokenizer, records: Sequence[Record], max_tokens: int) -> _Tokens:
    from mup.text import encode_chats

    enc = encode_chats(tokenizer, records, max_tokens=max_tokens, truncate="left")
    return _Tokens(ids=enc.input_ids, offsets=enc.offsets, n_truncated=enc.n_truncated)


def _plan(tokens: _Tokens, batch: int, buckets: tuple[int, ...], seed: int | None):
    """Batches of at most `batch` rows, each row in the shortest bucket that holds it."""
    return native.plan_batches(
        tokens.lengths,
        token_budget=batch * buckets[-1],
        buckets=buckets,
        max_rows=batch,
        shuffle_seed=seed,
    )


def _pad(tokens: _Tokens, rows: np.ndarray, padded_len: int, batch: int):
    """Right-padded tokens int32 [B, P], valid bool [B, P] and row weights float32 [B].

    Rows past len(rows) are padding with weight 0; each holds one real token (id 0), so that
    no row of the batch is all padding (its hidden state is then finite and the weight-0
    row adds exactly nothing to loss and gradient).
    """
    out = np.zeros((batch, padded_len), np.int32)
    valid = np.zeros((batch, padded_len), bool)
    for i, r in enumerate(rows):
        start, end = tokens.offsets[r], tokens.offsets[r + 1]
        out[i, : end - start] = tokens.ids[start:end]
        valid[i, : end - start] = True
    valid[len(rows) :, 0] = True
    weights = (np.arange(batch) < len(rows)).astype(np.float32)
    return out, valid, weights


def _predict_logits(
    logits_fn, trainable, frozen, tokens: _Tokens, batch: int, buckets, progress: bool, desc: str
) -> np.ndarray:
    """Logits float32 [N, 2] in record order."""
    out = np.zeros((len(tokens), N_CLASSES), np.float32)
    plan = _plan(tokens, batch, buckets, seed=None)
    bar = _progress(len(tokens), desc, progress, unit="rec")
    for b in plan:
        tok, valid, _ = _pad(tokens, b.rows, b.padded_len, batch)
        logits = np.asarray(logits_fn(trainable, frozen, jnp.asarray(tok), jnp.asarray(valid)))
        out[b.rows] = logits[: len(b.rows)]
        bar.update(len(b.rows))
    bar.close()
    return out


def _p_high(logits: np.ndarray) -> np.ndarray:
    """Softmax P(column 1) in float64, as 0.5 * (1 + tanh(d / 2)): no overflow at any d."""
    d = logits[:, 1].astype(np.float64) - logits[:, 0].astype(np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * d))


def _progress(total: int, desc: str, enabled: bool, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


# ---- data checks -----------------------------------------------------------------------------


def check_training_data(train: Sequence[Record], val: Sequence[Record] | None) -> None:
    """Refuse, before any model work, data that cannot train or validate a binary classifier:
    an empty or single-class train set, records without a 0/1 label, a single-class val set."""
    for name, records in (("train", train), ("val", val)):
        if records is None:
            continue
        if len(records) == 0:
            raise ValueError(f"the {name} set is empty; finetuning needs labelled records")
        bad = [r for r in records if r.label not in (0, 1)]
        if bad:
            raise ValueError(
                f"the {name} set has {len(bad)} records without a high/low-stakes label (first: "
                f"{bad[0].id!r} at {bad[0].source}, label {bad[0].label!r}); load it with "
                "load_records(..., binary=True) to drop ambiguous ones"
            )
        n_high = sum(r.label == 1 for r in records)
        if n_high in (0, len(records)):
            only = "high" if n_high else "low"
            what = (
                "a classifier cannot be trained on one class"
                if name == "train"
                else "validation AUROC (early stopping) needs both classes"
            )
            raise ValueError(
                f"the {name} set has only {only}-stakes records ({len(records)}); {what}"
            )


def _fingerprint(records: Sequence[Record]) -> dict[str, Any]:
    """What identifies a data set in checkpoint metadata (and a resumed run's data)."""
    import hashlib

    digest = hashlib.sha256("\n".join(f"{r.id}\t{r.label}" for r in records).encode()).hexdigest()
    out: dict[str, Any] = {"n_records": len(records), "ids_sha256": digest}
    path = getattr(records, "path", None)
    if path is not None:
        out.update(path=str(path), file_sha256=getattr(records, "sha256", None))
    return out


# ---- checkpoints -----------------------------------------------------------------------------


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _expected_shapes(config: ModelConfig, lora: LoraConfig | None) -> dict[str, tuple]:
    head = {"head.w": (config.d_model, N_CLASSES), "head.bias": (N_CLASSES,)}
    if lora is None:
        shapes = param_shapes(config)
        body = {
            k: tuple(v)
            for k, v in _flat({"params": shapes}).items()  # leaves are shape tuples
        }
    else:
        body = {k: tuple(v) for k, v in _flat({"lora": lora_shapes(config, lora)}).items()}
    return {**head, **body}


def _unflat(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _fsync_replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata={"format": FORMAT}
    )
    # safetensors creates the file private (0600); a checkpoint gets the usual umask mode,
    # like the json beside it, so that others who can read the directory can score with it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    _fsync_replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    _fsync_replace(tmp, path)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FinetuneCheckpointError(f"{path}: the weights file is missing")
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own untyped errors
        raise FinetuneCheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def _host_tensors(trainable) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in _flat(trainable).items()}


def _config_dict(config: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _base_info(model: Model) -> dict[str, Any]:
    spec = model.spec
    return {
        "spec": spec.spec,
        "name": spec.name,
        "kind": spec.kind,
        "path": str(Path(spec.path).resolve() if Path(spec.path).exists() else spec.path),
    }


def _remove_stale(out: Path, prefix: str, keep: str) -> None:
    for old in out.glob(f"{prefix}-*.safetensors"):
        if old.name != keep:
            old.unlink(missing_ok=True)


def _save_checkpoint(out: Path, model: Model, cfg: FinetuneConfig, trainable, info: dict) -> Path:
    step = info["step"]
    weights = f"weights-{step:07d}.safetensors"
    _write_safetensors(out / weights, _host_tensors(trainable))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "monitor": monitor_name(model.spec.name, cfg.lora),
        "base": _base_info(model),
        "model_config": _config_dict(model.config),
        "mode": cfg.mode,
        "lora": None if cfg.lora is None else cfg.lora.as_dict(),
        "config": cfg.as_dict(),
        "weights": weights,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **info,
    }
    _write_json(out / META_FILE, meta)  # the commit point: it names the new weights file
    _remove_stale(out, "weights", weights)
    return out / META_FILE


def _save_resume(out: Path, trainable, opt_state, state: dict) -> None:
    name = f"resume-{state['step']:07d}.safetensors"
    tensors = _host_tensors(trainable)
    for i, leaf in enumerate(jax.tree.leaves(opt_state)):
        # safetensors has no 0-d tensors (it reads them back as [1]): store scalars as [1].
        tensors[f"opt.{i:05d}"] = np.atleast_1d(np.asarray(jax.device_get(leaf)))
    _write_safetensors(out / name, tensors)
    _write_json(out / RESUME_FILE, {**state, "tensors": name})
    _remove_stale(out, "resume", name)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FinetuneCheckpointError(
            f"{path.parent}: no {path.name}; not a finetune checkpoint directory (or its "
            "training never reached a first evaluation)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinetuneCheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FinetuneCheckpointError(f"{path}: not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise FinetuneCheckpointError(
            f"{path}: format version {meta.get('version')!r}, this mup reads {VERSION}"
        )
    return meta


def _check_tensors(where: Path, tensors: Mapping[str, np.ndarray], expected: dict) -> None:
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for k in sorted(set(expected) & set(tensors)):
        if tuple(tensors[k].shape) != tuple(expected[k]):
            problems.append(f"{k}: shape {tuple(tensors[k].shape)}, expected {expected[k]}")
    if problems:
        raise FinetuneCheckpointError(
            f"{where}: tensors do not fit the config: " + "; ".join(problems)
        )


# ---- training --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    """What `finetune` did.

    checkpoint:     the finetune.json of the best (or, without validation, the last) weights.
    best_val_auroc: validation AUROC of those weights (None without validation).
    history:        one dict per evaluation: step, epoch, train_loss (mean since the previous
                    evaluation), val_auroc, grad_norm, seconds since the start.
    records_per_s:  training records per second of training-step time (evaluation excluded).
    """

    checkpoint: Path
    best_val_auroc: float | None
    best_step: int
    steps: int
    total_steps: int
    stopped_early: bool
    history: tuple[dict[str, Any], ...]
    n_train: int
    n_val: int
    n_truncated: int
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    records_seen: int
    tokens_seen: int

    @property
    def records_per_s(self) -> float:
        return self.records_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def finetune(
    model: Model,
    train: Sequence[Record],
    val: Sequence[Record] | None,
    out_dir: str | os.PathLike,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Finetune `model` as a high-stakes classifier on `train` (records labelled 0/1), with
    early stopping on `val` AUROC (None: train all epochs, keep the last weights).

    Writes the checkpoint into `out_dir` (see the module docstring). A directory that already
    holds a checkpoint is refused unless `resume` (continue from its resume state, same config
    and data) or `overwrite`.
    """
    t_start = time.perf_counter()
    cfg = config
    check_training_data(train, val)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    has_old = (out / META_FILE).exists() or (out / RESUME_FILE).exists()
    if has_old and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a finetune checkpoint; pass resume=True to continue it or "
            "overwrite=True to start again"
        )
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for f in (META_FILE, RESUME_FILE):
            (out / f).unlink(missing_ok=True)
        _remove_stale(out, "weights", "")
        _remove_stale(out, "resume", "")

    mcfg = model.config
    buckets = _buckets(cfg)
    train_tok = _tokenize(model.tokenizer, train, cfg.max_tokens)
    val_tok = None if val is None else _tokenize(model.tokenizer, val, cfg.max_tokens)
    y_train = np.array([r.label for r in train], np.int32)  # [N]
    y_val = None if val is None else np.array([r.label for r in val], np.int32)
    logger.info(
        "finetune %s (%s): %d train records (%d truncated to %d tokens), %d val records",
        model.spec.name,
        cfg.mode if cfg.lora is None else f"lora r{cfg.lora.rank} {','.join(cfg.lora.targets)}",
        len(train),
        train_tok.n_truncated,
        cfg.max_tokens,
        0 if val is None else len(val),
    )

    dtype = _DTYPES[cfg.dtype]
    k_head, k_lora = jax.random.split(jax.random.key(cfg.seed))
    trainable: dict[str, Any] = {"head": init_head(mcfg.d_model, k_head)}
    if cfg.lora is None:
        # float32 master weights: bf16 updates of lr * grad would round to nothing.
        # A copy even when already float32: the update step donates (overwrites) its input.
        trainable["params"] = jax.tree.map(
            lambda w: jnp.array(w, jnp.float32, copy=True), model.params
        )
        frozen = None
    else:
        trainable["lora"] = init_lora(mcfg, cfg.lora, k_lora)
        frozen = jax.tree.map(lambda w: w.astype(dtype), model.params)
    logits_fn, micro = _programs(mcfg, cfg.lora, cfg.dtype)

    n_micro = len(_plan(train_tok, cfg.batch_size, buckets, seed=0))  # the same every epoch
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    tx, apply = _update_program(cfg, total_steps, trainable)
    opt_state = tx.init(trainable)

    fingerprints = {
        "train": _fingerprint(train),
        "val": None if val is None else _fingerprint(val),
    }
    step, start_epoch, start_group = 0, 0, 0
    best_auc: float | None = None
    best_step, since = -1, 0
    history: list[dict[str, Any]] = []
    if resume and (out / RESUME_FILE).exists():
        trainable, opt_state, state = _load_resume(out, trainable, opt_state, cfg, fingerprints)
        step, start_epoch, start_group = state["step"], state["epoch"], state["group"]
        best_auc, best_step, since = state["best_auc"], state["best_step"], state["since"]
        history = list(state["history"])
        logger.info("resuming %s at step %d of %d", out, step, total_steps)
    elif resume:
        logger.info("%s: no resume state, starting from scratch", out)

    acc = jax.tree.map(jnp.zeros_like, trainable)
    has_val = val is not None
    patience = cfg.patience if (has_val and cfg.patience > 0) else math.inf
    train_s = eval_s = 0.0
    records_seen = tokens_seen = 0
    loss_total, loss_rows, grad_norm = 0.0, 0, 0.0
    stopped = False
    checkpoint = out / META_FILE

    def info_of(epoch: int) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": epoch,
            "total_steps": total_steps,
            "val_auroc": best_auc,
            "best_step": best_step,
            "history": history,
            "data": fingerprints,
            "buckets": list(buckets),
        }

    bar = _progress(total_steps, "finetune", progress)
    bar.update(step)
    tr, fr = trainable, frozen
    for epoch in range(start_epoch, cfg.epochs):
        plan = _plan(train_tok, cfg.batch_size, buckets, seed=_epoch_seed(cfg.seed, epoch))
        groups = [plan[i : i + cfg.grad_accum] for i in range(0, len(plan), cfg.grad_accum)]
        for g, group in enumerate(groups):
            if epoch == start_epoch and g < start_group:
                continue
            t0 = time.perf_counter()
            n_rows, loss_sum = 0, jnp.float32(0.0)
            for b in group:
                tok, valid, w = _pad(train_tok, b.rows, b.padded_len, cfg.batch_size)
                acc, loss = micro(
                    tr,
                    fr,
                    acc,
                    jnp.asarray(tok),
                    jnp.asarray(valid),
                    jnp.asarray(np.pad(y_train[b.rows], (0, cfg.batch_size - len(b.rows)))),
                    jnp.asarray(w),
                )
                loss_sum = loss_sum + loss
                n_rows += len(b.rows)
                tokens_seen += int(train_tok.lengths[b.rows].sum())
            tr, opt_state, acc, gnorm = apply(tr, opt_state, acc, jnp.float32(n_rows))
            grad_norm = float(gnorm)  # waits for the update: the timing below is real
            loss_value = float(loss_sum)
            train_s += time.perf_counter() - t0
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"finetune: loss is {loss_value} at step {step + 1}; lower the learning "
                    "rate or use float32"
                )
            step += 1
            records_seen += n_rows
            loss_total += loss_value
            loss_rows += n_rows
            bar.update(1)
            last_of_epoch = g == len(groups) - 1
            due = (
                (cfg.eval_every is None and last_of_epoch)
                or (cfg.eval_every is not None and step % cfg.eval_every == 0)
                or step == total_steps
            )
            postfix = {"loss": f"{loss_value / n_rows:.4f}"}
            if best_auc is not None:
                postfix["best_auroc"] = f"{best_auc:.4f}"
            bar.set_postfix(postfix, refresh=False)
            if not due:
                continue
            entry: dict[str, Any] = {
                "step": step,
                "epoch": epoch + (g + 1) / len(groups),
                "train_loss": loss_total / max(loss_rows, 1),
                "grad_norm": grad_norm,
            }
            loss_total, loss_rows = 0.0, 0
            improved = True
            if has_val:
                t1 = time.perf_counter()
                logits = _predict_logits(
                    logits_fn, tr, fr, val_tok, cfg.eval_batch_size, buckets, False, "val"
                )
                auc = metrics.auroc(logits[:, 1] - logits[:, 0], y_val)
                eval_s += time.perf_counter() - t1
                entry["val_auroc"] = auc
                improved = best_auc is None or auc > best_auc
                if improved:
                    best_auc, best_step, since = auc, step, 0
                else:
                    since += 1
                bar.set_postfix({**postfix, "val_auroc": f"{auc:.4f}", "best": f"{best_auc:.4f}"})
            else:
                best_step = step
            entry["seconds"] = round(time.perf_counter() - t_start, 2)
            history.append(entry)
            logger.info("finetune step %d: %s", step, entry)
            next_epoch, next_group = (epoch + 1, 0) if last_of_epoch else (epoch, g + 1)
            if improved:
                checkpoint = _save_checkpoint(out, model, cfg, tr, info_of(epoch))
            _save_resume(
                out,
                tr,
                opt_state,
                {
                    "step": step,
                    "epoch": next_epoch,
                    "group": next_group,
                    "best_auc": best_auc,
                    "best_step": best_step,
                    "since": since,
                    "history": history,
                    "config": cfg.as_dict(),
                    "data": fingerprints,
                },
            )
            if since >= patience:
                stopped = True
                break
        if stopped:
            break
    bar.close()
    if not checkpoint.exists():  # resumed a run that had already finished
        _read_meta(checkpoint)
    return FinetuneResult(
        checkpoint=checkpoint,
        best_val_auroc=best_auc,
        best_step=best_step,
        steps=step,
        total_steps=total_steps,
        stopped_early=stopped,
        history=tuple(history),
        n_train=len(train),
        n_val=0 if val is None else len(val),
        n_truncated=train_tok.n_truncated,
        train_seconds=train_s,
        eval_seconds=eval_s,
        wall_seconds=time.perf_counter() - t_start,
        records_seen=records_seen,
        tokens_seen=tokens_seen,
    )


def _load_resume(out: Path, trainable, opt_state, cfg: FinetuneConfig, fingerprints: dict):
    path = out / RESUME_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FinetuneCheckpointError(f"{path}: not valid JSON ({error})") from None
    if state.get("config") != json.loads(json.dumps(cfg.as_dict())):
        raise FinetuneCheckpointError(
            f"{path}: saved with config {state.get('config')}, not this run's {cfg.as_dict()}; "
            "resume with the same settings or start a new directory"
        )
    if state.get("data") != json.loads(json.dumps(fingerprints)):
        raise FinetuneCheckpointError(
            f"{path}: saved for other train/val data ({state.get('data')}); resume needs the "
            "same records"
        )
    tensors = _read_safetensors(out / state["tensors"])
    flat_trainable = _flat(trainable)
    opt_leaves, opt_def = jax.tree.flatten(opt_state)
    expected = {k: tuple(v.shape) for k, v in flat_trainable.items()}
    expected.update({f"opt.{i:05d}": tuple(np.shape(v)) or (1,) for i, v in enumerate(opt_leaves)})
    _check_tensors(out / state["tensors"], tensors, expected)
    new_trainable = _unflat({k: jnp.asarray(tensors[k], jnp.float32) for k in flat_trainable})
    new_opt = jax.tree.unflatten(
        opt_def,
        [
            jnp.asarray(tensors[f"opt.{i:05d}"], dtype=v.dtype).reshape(np.shape(v))
            for i, v in enumerate(opt_leaves)
        ],
    )
    return new_trainable, new_opt, state


# ---- loading and scoring ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Finetuned:
    """A loaded finetune checkpoint: the base model, the trained tensors, and how to run them.

    monitor: the score-file monitor name; max_tokens: the truncation it was trained with.
    """

    model: Model
    trainable: dict
    config: FinetuneConfig
    monitor: str
    meta: dict
    path: Path

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    def _frozen(self):
        if self.config.lora is None:
            return None
        if "_frozen_params" not in self.__dict__:  # cast once per checkpoint, not per call
            dtype = _DTYPES[self.config.dtype]
            frozen = jax.tree.map(lambda w: w.astype(dtype), self.model.params)
            object.__setattr__(self, "_frozen_params", frozen)
        return self.__dict__["_frozen_params"]

    def logits(
        self, records: Sequence[Record], *, batch_size: int | None = None, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(logits float32 [N, 2], tokens read int64 [N]) of the records, in order."""
        if len(records) == 0:
            return np.zeros((0, N_CLASSES), np.float32), np.zeros(0, np.int64)
        tokens = _tokenize(self.model.tokenizer, records, self.max_tokens)
        logits_fn, _ = _programs(self.model.config, self.config.lora, self.config.dtype)
        logits = _predict_logits(
            logits_fn,
            self.trainable,
            self._frozen(),
            tokens,
            batch_size or self.config.eval_batch_size,
            _buckets(self.config),
            progress,
            "score",
        )
        return logits, tokens.lengths.astype(np.int64)

    def predict(
        self, records: Sequence[Record], *, batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """P(high stakes) float64 [N]."""
        return _p_high(self.logits(records, batch_size=batch_size, progress=progress)[0])


def load_finetuned(
    checkpoint: str | os.PathLike, *, model: Model | None = None, dtype: DTypeName | None = None
) -> Finetuned:
    """Load a checkpoint directory (or its finetune.json). The base model is loaded from the
    spec it names unless `model` is given, which must have the same architecture. `dtype`
    overrides the compute dtype it was trained with."""
    path = Path(checkpoint)
    meta_path = path if path.name == META_FILE else path / META_FILE
    meta = _read_meta(meta_path)
    try:
        cfg = FinetuneConfig.from_dict(meta["config"])
        if dtype is not None:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        weights = meta_path.parent / meta["weights"]
        base = meta["base"]
        saved_config = meta["model_config"]
    except (KeyError, TypeError, ValueError) as error:
        raise FinetuneCheckpointError(f"{meta_path}: malformed metadata ({error!r})") from None
    tensors = _read_safetensors(weights)  # before the base model: a bad file fails fast
    if model is None:
        model = load_model(_base_location(base))
    if _config_dict(model.config) != saved_config:
        raise FinetuneCheckpointError(
            f"{meta_path}: trained on {base.get('name')!r} whose config differs from the "
            f"given model {model.spec.name!r}"
        )
    _check_tensors(weights, tensors, _expected_shapes(model.config, cfg.lora))
    trainable = _unflat({k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()})
    return Finetuned(
        model=model,
        trainable=trainable,
        config=cfg,
        monitor=str(meta.get("monitor") or monitor_name(base.get("name", "model"), cfg.lora)),
        meta=meta,
        path=meta_path.parent,
    )


def _base_location(base: Mapping[str, Any]) -> str:
    """Where to load the base model from: a short name or hub id as typed, else the resolved
    path (a relative spec may not resolve from another working directory)."""
    from mup._resolve import SHORT_NAMES

    spec, path = str(base.get("spec", "")), base.get("path")
    if spec in SHORT_NAMES:
        return spec
    if path and Path(path).exists():
        return str(path)
    if spec and (Path(spec).exists() or spec.count("/") == 1):
        return spec
    raise FinetuneCheckpointError(
        f"the base model of this checkpoint ({spec!r} at {path}) is not found; pass model="
    )


def score_records(
    checkpoint: Finetuned | str | os.PathLike,
    records: Sequence[Record],
    *,
    dataset: str | None = None,
    out: str | os.PathLike | None = None,
    model: Model | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """P(high stakes) float64 [N] of each record under a finetuned checkpoint (a directory or a
    `load_finetuned` result, which saves reloading the base model per data set).

    With `out`, also write the score file there (jsonl, atomically): one row per record with
    ``dataset`` (required then), the label (-1 for unlabelled or ambiguous), the monitor name,
    n_tokens (the tokens read, after truncation) and FLOPs = forward through every block
    + the head.
    """
    if out is not None and not dataset:
        raise ValueError("score_records: writing a score file needs the dataset name")
    ft = checkpoint
    if not isinstance(ft, Finetuned):
        ft = load_finetuned(checkpoint, model=model)
    logits, n_tokens = ft.logits(records, batch_size=batch_size, progress=progress)
    probs = _p_high(logits)
    if out is not None:
        config = ft.model.config
        extra = head_flops(config)
        rows = [
            score_row(
                id=r.id,
                dataset=dataset,
                label=label_of(r),
                score=float(p),
                monitor=ft.monitor,
                flops=llm_flops(config, int(n), logit_positions=0) + extra,
                n_tokens=int(n),
                logit_diff=float(lg[1] - lg[0]),
            )
            for r, p, n, lg in zip(records, probs, n_tokens, logits, strict=True)
        ]
        write_scores(out, rows)
    return probs
