"""BiPO: train one steering vector on preference pairs (bi-directional preference optimisation).

Axis letters: P pairs in a batch, R rows (2P: chosen rows then rejected rows), T tokens,
V vocab, D model width.

The recipe (Cao et al. 2024, "Personalized Steering of LLMs via Bi-directional Preference
Optimization"): a vector v is added to the output of block `layer` at every position. Each step
draws d in {-1, +1} and minimises

    -log sigmoid(beta * d * [(log p_{d v}(chosen) - log p_{d v}(rejected))
                             - (log p_ref(chosen) - log p_ref(rejected))])

with log-probs summed over the response tokens only. The reference is the same model with
multiplier 0 (no second copy of the weights): its log-probs are computed once per pair with the
same compiled function at multiplier 0 and cached. Model parameters are frozen (the gradient is
taken with respect to v only, and `stop_gradient` guards the parameters); AdamW with linear
warmup then cosine decay; v starts at zero, so d = +1 and d = -1 start from the reference.

Per-epoch evaluation on the train and held-out pairs, with m_x = log p_{x v}(chosen) -
log p_{x v}(rejected):
  loss      mean over d = +-1 of -log sigmoid(beta * d * (m_d - m_0))
  margin    mean of m_{+1} - m_0 (how much +v raises the chosen-vs-rejected log-prob margin)
  margin_neg mean of m_{-1} - m_0 (should be negative)
  accuracy  share of pairs with m_{+1} > m_0; accuracy_neg: share with m_{-1} < m_0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mup.steering._pairs import EncodedPairs, PreferencePair, encode_pairs
from mup.steering._vector import SteeringVector, save_vector

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiPOConfig:
    """BiPO hyper-parameters (defaults follow the reference recipe).

    layer:          the block whose output the vector is added to.
    epochs:         passes over the training pairs; the vector is saved after each.
    batch_size:     pairs per step (2 * batch_size rows per forward pass).
    beta:           the DPO temperature.
    learning_rate:  peak AdamW learning rate.
    weight_decay:   AdamW decoupled weight decay.
    warmup_ratio:   share of all steps spent in linear warmup (at least one step).
    seed:           the shuffling and d draws (numpy generator).
    max_tokens:     a pair conversation longer than this is an error.
    """

    layer: int
    epochs: int = 10
    batch_size: int = 4
    beta: float = 0.1
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    seed: int = 0
    max_tokens: int = 256

    def __post_init__(self):
        checks = [
            (self.layer >= 0, f"layer must be >= 0, got {self.layer}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.beta > 0, f"beta must be > 0, got {self.beta}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.warmup_ratio < 1,
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"BiPOConfig: {msg}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiPOResult:
    """The trained vector, the per-epoch metrics and the files written."""

    vector: SteeringVector
    history: list[dict]  # one dict per epoch (see the module docstring)
    files: list[Path]


# ---------------------------------------------------------------------------------------------
# Compiled pieces
# ---------------------------------------------------------------------------------------------


def _response_logprobs(params, vector, multiplier, tokens, valid, response, *, config, layer):
    """Sum of log p(token) over response tokens per row: [R] float32.

    vector [D]; multiplier scalar or [R]; tokens/valid/response [R, T].
    """
    from mup.models import SteeringSpec, forward

    r, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (r, t))
    mult = jnp.broadcast_to(jnp.asarray(multiplier, jnp.float32), (r,))
    spec = SteeringSpec(
        layers=(layer,), vectors=vector[None].astype(jnp.float32), multipliers=mult[None]
    )
    out = forward(
        jax.lax.stop_gradient(params),
        tokens,
        positions,
        config=config,
        valid=valid,
        steering=spec,
    )
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)  # [R, T-1, V]
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [R, T-1]
    return jnp.sum(jnp.where(response[:, 1:], picked, 0.0), axis=1)  # [R]


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _jit_logprobs(params, vector, multiplier, tokens, valid, response, *, config, layer):
    return _response_logprobs(
        params, vector, multiplier, tokens, valid, response, config=config, layer=layer
    )


def _bipo_loss(vector, params, d, ref_margin, weight, tokens, valid, response, config, layer, beta):
    logp = _response_logprobs(
        params, vector, d, tokens, valid, response, config=config, layer=layer
    )  # [R]
    p = ref_margin.shape[0]
    margin = logp[:p] - logp[p:]  # [P] chosen - rejected under the steered model
    z = beta * d * (margin - ref_margin)  # [P]
    loss = -jnp.sum(weight * jax.nn.log_sigmoid(z)) / jnp.sum(weight)
    return loss, margin


def _make_step(config, layer: int, beta: float, optimizer):
    grad_fn = jax.value_and_grad(_bipo_loss, has_aux=True)

    @jax.jit
    def step(vector, opt_state, params, d, ref_margin, weight, tokens, valid, response):
        (loss, margin), grad = grad_fn(
            vector, params, d, ref_margin, weight, tokens, valid, response, config, layer, beta
        )
        updates, opt_state = optimizer.update(grad, opt_state, vector)
        return optax.apply_updates(vector, updates), opt_state, loss, margin

    return step


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def response_logprobs(
    model,
    encoded: EncodedPairs,
    vector,
    layer: int,
    multiplier: float,
    *,
    batch_size: int = 4,
) -> np.ndarray:
    """Summed response log-probs of every row of `encoded` with ``multiplier * vector`` added to
    block `layer`'s output: float32 [2P] (chosen rows, then rejected rows).

    Rows run in batches of 2 * batch_size (the last one padded), the shape the trainer uses.
    """
    vector = jnp.asarray(vector, jnp.float32)
    if vector.shape != (model.config.d_model,):
        raise ValueError(
            f"vector has shape {tuple(vector.shape)}, the model needs ({model.config.d_model},)"
        )
    p = len(encoded)
    out = np.zeros(2 * p, np.float32)
    for idx, n_real in _batches(np.arange(p), batch_size):
        rows = np.concatenate([idx, idx + p])
        got = np.asarray(
            _jit_logprobs(
                model.params,
                vector,
                jnp.float32(multiplier),
                jnp.asarray(encoded.tokens[rows]),
                jnp.asarray(encoded.valid[rows]),
                jnp.asarray(encoded.response[rows]),
                config=model.config,
                layer=int(layer),
            )
        )
        b = len(idx)
        out[idx[:n_real]] = got[:n_real]
        out[idx[:n_real] + p] = got[b : b + n_real]
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("response log-probs are not finite (vector too large?)")
    return out


def pair_margins(
    model,
    encoded: EncodedPairs,
    vector,
    layer: int,
    multiplier: float,
    *,
    batch_size: int = 4,
) -> np.ndarray:
    """log p(chosen) - log p(rejected) per pair under ``multiplier * vector``: float32 [P]."""
    logp = response_logprobs(model, encoded, vector, layer, multiplier, batch_size=batch_size)
    p = len(encoded)
    return logp[:p] - logp[p:]


def evaluate_vector(
    model,
    encoded: EncodedPairs,
    vector,
    layer: int,
    *,
    beta: float = 0.1,
    ref_margin: np.ndarray | None = None,
    batch_size: int = 4,
) -> dict[str, float]:
    """BiPO metrics of `vector` on `encoded` pairs (see the module docstring)."""
    if ref_margin is None:
        ref_margin = pair_margins(model, encoded, vector, layer, 0.0, batch_size=batch_size)
    plus = pair_margins(model, encoded, vector, layer, 1.0, batch_size=batch_size) - ref_margin
    minus = pair_margins(model, encoded, vector, layer, -1.0, batch_size=batch_size) - ref_margin
    loss = 0.5 * (_softplus(-beta * plus) + _softplus(beta * minus))  # [P]
    return {
        "loss": float(loss.mean()),
        "margin": float(plus.mean()),
        "margin_neg": float(minus.mean()),
        "accuracy": float(np.mean(plus > 0)),
        "accuracy_neg": float(np.mean(minus < 0)),
        "ref_margin": float(np.mean(ref_margin)),
    }


def train_bipo(
    model,
    train_pairs: Sequence[PreferencePair],
    config: BiPOConfig,
    *,
    eval_pairs: Sequence[PreferencePair] = (),
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BiPOResult:
    """Train a BiPO vector for `model` on `train_pairs`; evaluate on both sets every epoch.

    With `out_dir`, writes ``epoch_{E:03d}.safetensors`` (the vector with the epoch's metrics in
    its metadata) and appends the metrics to ``metrics.jsonl`` after every epoch.
    """
    if not train_pairs:
        raise ValueError("train_bipo: no training pairs")
    if config.layer >= model.config.n_layers:
        raise ValueError(
            f"BiPOConfig.layer={config.layer} is out of range: the model has "
            f"{model.config.n_layers} blocks (0..{model.config.n_layers - 1})"
        )
    # One padded length for both sets: the step and the evaluation compile once each.
    all_pairs = [*train_pairs, *eval_pairs]
    length = encode_pairs(model.tokenizer, all_pairs, max_tokens=config.max_tokens).length
    train = encode_pairs(model.tokenizer, train_pairs, length=length)
    held = encode_pairs(model.tokenizer, eval_pairs, length=length) if eval_pairs else None
    bs = min(config.batch_size, len(train_pairs))

    steps_per_epoch = math.ceil(len(train_pairs) / bs)
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_ratio * total))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),
        end_value=0.0,
    )
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    step = _make_step(model.config, config.layer, config.beta, optimizer)

    d_model = model.config.d_model
    vector = jnp.zeros((d_model,), jnp.float32)
    opt_state = optimizer.init(vector)

    t0 = time.perf_counter()
    ref_train = pair_margins(model, train, vector, config.layer, 0.0, batch_size=bs)
    ref_held = pair_margins(model, held, vector, config.layer, 0.0, batch_size=bs) if held else None
    logger.info(
        "reference log-probs of %d pairs in %.1fs", len(all_pairs), time.perf_counter() - t0
    )

    rng = np.random.default_rng(config.seed)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
        (out_path / "metrics.jsonl").write_text("")
    history: list[dict] = []
    files: list[Path] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"BiPO layer {config.layer}", unit="step")
    sv = None
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(len(train_pairs))
        losses = []
        for idx, n_real in _batches(order, bs):
            d = float(rng.choice((-1.0, 1.0)))
            rows = np.concatenate([idx, idx + len(train_pairs)])
            weight = (np.arange(len(idx)) < n_real).astype(np.float32)  # [P] 0 on padding
            vector, opt_state, loss, _ = step(
                vector,
                opt_state,
                model.params,
                jnp.float32(d),
                jnp.asarray(ref_train[idx]),
                jnp.asarray(weight),
                jnp.asarray(train.tokens[rows]),
                jnp.asarray(train.valid[rows]),
                jnp.asarray(train.response[rows]),
            )
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"BiPO loss is {loss} at epoch {epoch}")
            losses.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", d=int(d))
        v = np.asarray(vector)
        record: dict = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "train_step_loss": float(np.mean(losses)),
            "norm": float(np.linalg.norm(v)),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        train_m = evaluate_vector(
            model, train, v, config.layer, beta=config.beta, ref_margin=ref_train, batch_size=bs
        )
        record.update({f"train_{k}": val for k, val in train_m.items()})
        if held is not None:
            held_m = evaluate_vector(
                model, held, v, config.layer, beta=config.beta, ref_margin=ref_held, batch_size=bs
            )
            record.update({f"test_{k}": val for k, val in held_m.items()})
        history.append(record)
        sv = SteeringVector(
            vector=v,
            layer=config.layer,
            model=model.spec.name,
            method="bipo",
            epoch=epoch,
            extra={
                "metrics": record,
                "config": dataclasses.asdict(config),
                "n_train": len(train_pairs),
                "n_test": len(eval_pairs),
            },
        )
        if out_path is not None:
            files.append(save_vector(out_path / f"epoch_{epoch:03d}.safetensors", sv))
            with (out_path / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.write(format_epoch(record))
        else:
            logger.info(format_epoch(record))
    if bar is not None:
        bar.close()
    return BiPOResult(vector=sv, history=history, files=files)


def format_epoch(record: dict) -> str:
    """One summary line per epoch."""
    line = (
        f"epoch {record['epoch']}: step loss {record['train_step_loss']:.4f}, "
        f"norm {record['norm']:.4g}, train margin {record['train_margin']:+.3f} / "
        f"{record['train_margin_neg']:+.3f} (acc {record['train_accuracy']:.2f} / "
        f"{record['train_accuracy_neg']:.2f})"
    )
    if "test_margin" in record:
        line += (
            f", held-out margin {record['test_margin']:+.3f} / {record['test_margin_neg']:+.3f} "
            f"(acc {record['test_accuracy']:.2f} / {record['test_accuracy_neg']:.2f})"
        )
    return line


def _batches(order: np.ndarray, batch_size: int):
    """Yield (indices [batch_size], n_real): the last batch is padded by repeating its first."""
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        n_real = len(idx)
        if n_real < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - n_real, idx[0])])
        yield idx, n_real


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)
