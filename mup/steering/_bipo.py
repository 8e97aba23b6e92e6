"""BiPO: train one steering vector on preference pairs (bi-directional preference optimisation).

Axis letters: P pairs in a batch, R rows (2P: chosen rows then rejected rows), T tokens,
V vocab, D model width.

The recipe (Cao et al. 2024, "Personalized Steering of LLMs via Bi-directional Preference
Optimization"): a vector v is added to the output of one block at every position. Each step
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

Several blocks (`train_bipo_blocks`): the pairs are encoded once, the reference log-probs
(multiplier 0, the same for every block) are computed once, and one compiled step and one
compiled evaluation serve every block: the forward steers all swept blocks with a one-hot
per-block multiplier, so a block that is not being trained gets exactly 0 added. Each block
then trains from zero with the same seed (same batches and d draws), as separate runs would.
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

from mup._renamed import old_keywords, old_name
from mup.steering._pairs import EncodedPairs, PreferencePair, encode_pairs, with_system_prompt
from mup.steering._vector import SteeringVector, save_vector

logger = logging.getLogger(__name__)


LR_SCHEDULES = ("cosine", "linear", "constant")


@old_keywords(layer="block")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BiPOConfig:
    """BiPO hyper-parameters (defaults follow the reference recipe).

    block:          the block whose output the vector is added to (``layer=`` is its old
                    name, and ``config.layer`` reads it).
    epochs:         passes over the training pairs; the vector is saved after each.
    batch_size:     pairs per step (2 * batch_size rows per forward pass).
    beta:           the DPO temperature.
    learning_rate:  peak AdamW learning rate.
    weight_decay:   AdamW decoupled weight decay.
    warmup_ratio:   share of all steps spent in linear warmup from 0.
    warmup_steps:   or a number of warmup steps (the study used 100); at most one of the two
                    may be set; neither = warmup_ratio 0.1. Warmup lasts at least one step.
    lr_schedule:    after warmup, "cosine" (to 0 at the last step, the recipe's), "linear" (to
                    0) or "constant".
    seed:           the shuffling and d draws (numpy generator).
    max_tokens:     longer pair conversations are truncated (see `mup.steering._pairs`: the
                    prompt's start goes first, then the response's end); the study used 2048.
    system_prompt:  a system message put before every pair's prompt (None = the pairs as they
                    are; the template may still insert its own default system prompt).
    score_end_of_turn: also score the template's end-of-turn token after each response (the
                    study's TRL recipe scores the EOS it appends); default: content tokens only.
    """

    block: int
    epochs: int = 10
    batch_size: int = 4
    beta: float = 0.1
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "cosine"
    seed: int = 0
    max_tokens: int = 2048
    system_prompt: str | None = None
    score_end_of_turn: bool = False

    def __post_init__(self):
        checks = [
            (self.block >= 0, f"block must be >= 0, got {self.block}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.beta > 0, f"beta must be > 0, got {self.beta}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
            ),
            (
                self.warmup_steps is None or self.warmup_steps >= 0,
                f"warmup_steps must be >= 0, got {self.warmup_steps}",
            ),
            (
                self.warmup_ratio is None or self.warmup_steps is None,
                "set warmup_ratio or warmup_steps, not both",
            ),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (self.max_tokens >= 8, f"max_tokens must be >= 8, got {self.max_tokens}"),
            (
                self.system_prompt is None or bool(self.system_prompt.strip()),
                "system_prompt must be None or a non-empty string",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"BiPOConfig: {msg}")

    @property
    def layer(self) -> int:
        """The old name of `block` (deprecated; read-only)."""
        return self.block

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps out of `total_steps` (at least 1, at most total_steps)."""
        if self.warmup_steps is not None:
            n = self.warmup_steps
        else:
            n = round((0.1 if self.warmup_ratio is None else self.warmup_ratio) * total_steps)
        return min(max(1, n), total_steps)

    def schedule(self, total_steps: int):
        """The optax learning-rate schedule over `total_steps`."""
        warmup = self.warmup_for(total_steps)
        rest = max(total_steps - warmup, 1)
        peak = self.learning_rate
        ramp = optax.linear_schedule(0.0, peak, warmup)
        after = {
            "cosine": optax.cosine_decay_schedule(peak, rest, alpha=0.0),
            "linear": optax.linear_schedule(peak, 0.0, rest),
            "constant": optax.constant_schedule(peak),
        }[self.lr_schedule]
        return optax.join_schedules([ramp, after], [warmup])


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiPOResult:
    """The trained vector, the per-epoch metrics and the files written."""

    vector: SteeringVector
    history: list[dict]  # one dict per epoch (see the module docstring)
    files: list[Path]


# ---------------------------------------------------------------------------------------------
# Compiled pieces
# ---------------------------------------------------------------------------------------------


def _response_logprobs(
    params, vector, select, multiplier, tokens, valid, response, *, config, blocks
):
    """Sum of log p(token) over response tokens per row: [R] float32.

    vector [D]; select [J] (one-hot over the static `blocks`: which one `vector` steers);
    multiplier scalar or [R]; tokens/valid/response [R, T].
    """
    from mup.models import ForwardSteering, forward

    r, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (r, t))
    mult = jnp.broadcast_to(jnp.asarray(multiplier, jnp.float32), (r,))
    j = len(blocks)
    spec = ForwardSteering(
        blocks=blocks,
        vectors=jnp.broadcast_to(vector.astype(jnp.float32), (j, vector.shape[0])),  # [J, D]
        multipliers=select.astype(jnp.float32)[:, None] * mult[None],  # [J, R]
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


@functools.partial(jax.jit, static_argnames=("config", "blocks"))
def _jit_logprobs(params, vector, select, multiplier, tokens, valid, response, *, config, blocks):
    return _response_logprobs(
        params, vector, select, multiplier, tokens, valid, response, config=config, blocks=blocks
    )


def _bipo_loss(
    vector, params, select, d, ref_margin, weight, tokens, valid, response, config, blocks, beta
):
    logp = _response_logprobs(
        params, vector, select, d, tokens, valid, response, config=config, blocks=blocks
    )  # [R]
    p = ref_margin.shape[0]
    margin = logp[:p] - logp[p:]  # [P] chosen - rejected under the steered model
    z = beta * d * (margin - ref_margin)  # [P]
    loss = -jnp.sum(weight * jax.nn.log_sigmoid(z)) / jnp.sum(weight)
    return loss, margin


def _make_step(config, blocks: tuple[int, ...], beta: float, optimizer):
    grad_fn = jax.value_and_grad(_bipo_loss, has_aux=True)

    @jax.jit
    def step(vector, opt_state, params, select, d, ref_margin, weight, tokens, valid, response):
        (loss, margin), grad = grad_fn(
            vector,
            params,
            select,
            d,
            ref_margin,
            weight,
            tokens,
            valid,
            response,
            config,
            blocks,
            beta,
        )
        updates, opt_state = optimizer.update(grad, opt_state, vector)
        return optax.apply_updates(vector, updates), opt_state, loss, margin

    return step


def _steer_blocks(
    block: int, steer_blocks: Sequence[int] | None
) -> tuple[tuple[int, ...], np.ndarray]:
    """The static block tuple and the one-hot [J] selecting `block` in it."""
    blocks = (int(block),) if steer_blocks is None else tuple(int(x) for x in steer_blocks)
    if int(block) not in blocks:
        raise ValueError(f"block {block} is not among the compiled blocks {blocks}")
    return blocks, (np.asarray(blocks) == int(block)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@old_keywords(layer="block", steer_layers="steer_blocks")
def response_logprobs(
    model,
    encoded: EncodedPairs,
    vector,
    block: int,
    multiplier: float,
    *,
    batch_size: int = 4,
    steer_blocks: Sequence[int] | None = None,
) -> np.ndarray:
    """Summed response log-probs of every row of `encoded` with ``multiplier * vector`` added to
    the output of `block`: float32 [2P] (chosen rows, then rejected rows).

    Rows run in batches of 2 * batch_size (the last one padded), the shape the trainer uses.
    steer_blocks: compile one program for all these blocks (`block` among them; the others get
    0 added), so that evaluating many blocks compiles once. (``layer=`` and ``steer_layers=``
    are the old names of ``block=`` and ``steer_blocks=``, here and in `pair_margins` and
    `evaluate_vector`.)
    """
    vector = jnp.asarray(vector, jnp.float32)
    if vector.shape != (model.config.d_model,):
        raise ValueError(
            f"vector has shape {tuple(vector.shape)}, the model needs ({model.config.d_model},)"
        )
    blocks, select = _steer_blocks(block, steer_blocks)
    p = len(encoded)
    out = np.zeros(2 * p, np.float32)
    for idx, n_real in _batches(np.arange(p), batch_size):
        rows = np.concatenate([idx, idx + p])
        got = np.asarray(
            _jit_logprobs(
                model.params,
                vector,
                jnp.asarray(select),
                jnp.float32(multiplier),
                jnp.asarray(encoded.tokens[rows]),
                jnp.asarray(encoded.valid[rows]),
                jnp.asarray(encoded.response[rows]),
                config=model.config,
                blocks=blocks,
            )
        )
        b = len(idx)
        out[idx[:n_real]] = got[:n_real]
        out[idx[:n_real] + p] = got[b : b + n_real]
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("response log-probs are not finite (vector too large?)")
    return out


@old_keywords(layer="block", steer_layers="steer_blocks")
def pair_margins(
    model,
    encoded: EncodedPairs,
    vector,
    block: int,
    multiplier: float,
    *,
    batch_size: int = 4,
    steer_blocks: Sequence[int] | None = None,
) -> np.ndarray:
    """log p(chosen) - log p(rejected) per pair under ``multiplier * vector``: float32 [P]."""
    logp = response_logprobs(
        model, encoded, vector, block, multiplier, batch_size=batch_size, steer_blocks=steer_blocks
    )
    p = len(encoded)
    return logp[:p] - logp[p:]


@old_keywords(layer="block", steer_layers="steer_blocks")
def evaluate_vector(
    model,
    encoded: EncodedPairs,
    vector,
    block: int,
    *,
    beta: float = 0.1,
    ref_margin: np.ndarray | None = None,
    batch_size: int = 4,
    steer_blocks: Sequence[int] | None = None,
) -> dict[str, float]:
    """BiPO metrics of `vector` on `encoded` pairs (see the module docstring)."""
    kw = dict(batch_size=batch_size, steer_blocks=steer_blocks)
    if ref_margin is None:
        ref_margin = pair_margins(model, encoded, vector, block, 0.0, **kw)
    plus = pair_margins(model, encoded, vector, block, 1.0, **kw) - ref_margin
    minus = pair_margins(model, encoded, vector, block, -1.0, **kw) - ref_margin
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
    """Train a BiPO vector for `model` at ``config.block`` on `train_pairs`; evaluate on both
    sets every epoch.

    With `out_dir`, writes ``epoch_{E:03d}.safetensors`` (the vector with the epoch's metrics in
    its metadata) and appends the metrics to ``metrics.jsonl`` after every epoch.
    """
    prep = _prepare(model, train_pairs, eval_pairs, config, (config.block,), progress)
    return _train_block(model, prep, config, (config.block,), out_dir, progress)


@old_keywords(layers="blocks")
def train_bipo_blocks(
    model,
    train_pairs: Sequence[PreferencePair],
    config: BiPOConfig,
    blocks: Sequence[int],
    *,
    eval_pairs: Sequence[PreferencePair] = (),
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[int, BiPOResult]:
    """One BiPO vector per block in `blocks` (``config.block`` is replaced by each), sharing the
    encoding, the reference log-probs and the compiled programs (see the module docstring).

    With `out_dir`: ``out_dir/block_{L}/`` holds what `train_bipo` writes for block L, and
    ``out_dir/summary.json`` the final metrics of every block (written after each block).
    """
    blocks = tuple(int(x) for x in blocks)
    if not blocks:
        raise ValueError("train_bipo_blocks: no blocks")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"train_bipo_blocks: blocks repeat: {list(blocks)}")
    prep = _prepare(model, train_pairs, eval_pairs, config, blocks, progress)
    out_path = Path(out_dir) if out_dir is not None else None
    results: dict[int, BiPOResult] = {}
    for block in blocks:
        cfg = dataclasses.replace(config, block=block)
        sub = out_path / f"block_{block}" if out_path is not None else None
        results[block] = _train_block(model, prep, cfg, blocks, sub, progress)
        if out_path is not None:
            _write_json(out_path / "summary.json", block_summary(model, results, prep, config))
    return results


train_bipo_layers = old_name(train_bipo_blocks, "train_bipo_layers")


def block_summary(model, results: dict[int, BiPOResult], prep, config: BiPOConfig) -> dict:
    """The summary.json content: per block, the last epoch's norm and margins."""
    rows = []
    for block, res in results.items():
        last = res.history[-1]
        row = {"block": block, "epoch": last["epoch"], "norm": last["norm"]}
        for key in ("loss", "margin", "margin_neg", "accuracy", "accuracy_neg"):
            for split in ("train", "test"):
                if f"{split}_{key}" in last:
                    row[f"{split}_{key}"] = last[f"{split}_{key}"]
        if "test_margin" in last:
            best = max(res.history, key=lambda r: r["test_margin"])
            row["best_test_margin_epoch"] = best["epoch"]
        row["files"] = [str(f) for f in res.files]
        rows.append(row)
    cfg = dataclasses.asdict(config)
    cfg.pop("block")
    return {
        "model": model.spec.name,
        "method": "bipo",
        "n_train": prep.n_train,
        "n_test": prep.n_test,
        "n_truncated": prep.n_truncated,
        "padded_length": prep.length,
        "config": cfg,
        "blocks": rows,
    }


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class _Prepared:
    """What every block's training shares: encoded pairs and their reference margins."""

    train: EncodedPairs
    held: EncodedPairs | None
    ref_train: np.ndarray  # [P_train]
    ref_held: np.ndarray | None  # [P_test]
    n_train: int
    n_test: int
    n_truncated: int
    length: int
    batch_size: int
    steps_per_epoch: int
    optimizer: optax.GradientTransformation
    step: object  # the jitted step, one for every block (the block is the `select` input)


def _prepare(model, train_pairs, eval_pairs, config: BiPOConfig, blocks, progress) -> _Prepared:
    if not train_pairs:
        raise ValueError("train_bipo: no training pairs")
    for block in blocks:
        if not 0 <= block < model.config.n_layers:
            raise ValueError(
                f"BiPOConfig.block={block} is out of range: the model has "
                f"{model.config.n_layers} blocks (0..{model.config.n_layers - 1})"
            )
    all_pairs = [*train_pairs, *eval_pairs]
    if config.system_prompt is not None:
        all_pairs = with_system_prompt(all_pairs, config.system_prompt)
    # One encoding, one padded length for both sets: the step and the evaluation compile once.
    enc = encode_pairs(
        model.tokenizer,
        all_pairs,
        max_tokens=config.max_tokens,
        truncate=True,
        score_end_of_turn=config.score_end_of_turn,
    )
    if enc.n_truncated:
        logger.warning(
            "%d of %d pairs were longer than max_tokens=%d and were truncated",
            enc.n_truncated,
            len(all_pairs),
            config.max_tokens,
        )
    n_train = len(train_pairs)
    train = enc.take(range(n_train))
    held = enc.take(range(n_train, len(all_pairs))) if eval_pairs else None
    bs = min(config.batch_size, n_train)
    t0 = time.perf_counter()
    zero = np.zeros(model.config.d_model, np.float32)
    # Multiplier 0 adds nothing at any block: one reference serves every block.
    kw = dict(batch_size=bs, steer_blocks=blocks)
    ref_train = pair_margins(model, train, zero, blocks[0], 0.0, **kw)
    ref_held = pair_margins(model, held, zero, blocks[0], 0.0, **kw) if held else None
    logger.info(
        "reference log-probs of %d pairs in %.1fs", len(all_pairs), time.perf_counter() - t0
    )
    steps_per_epoch = math.ceil(n_train / bs)
    optimizer = optax.adamw(
        config.schedule(steps_per_epoch * config.epochs), weight_decay=config.weight_decay
    )
    return _Prepared(
        train=train,
        held=held,
        ref_train=ref_train,
        ref_held=ref_held,
        n_train=n_train,
        n_test=len(eval_pairs),
        n_truncated=enc.n_truncated,
        length=enc.length,
        batch_size=bs,
        steps_per_epoch=steps_per_epoch,
        optimizer=optimizer,
        step=_make_step(model.config, tuple(blocks), config.beta, optimizer),
    )


def _train_block(
    model, prep: _Prepared, config: BiPOConfig, blocks, out_dir, progress
) -> BiPOResult:
    bs = prep.batch_size
    train, held = prep.train, prep.held
    n_train = prep.n_train
    steps_per_epoch = prep.steps_per_epoch
    total = steps_per_epoch * config.epochs
    optimizer, step = prep.optimizer, prep.step
    _, select = _steer_blocks(config.block, blocks)
    select = jnp.asarray(select)

    vector = jnp.zeros((model.config.d_model,), jnp.float32)
    opt_state = optimizer.init(vector)
    t0 = time.perf_counter()
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

        bar = tqdm(total=total, desc=f"BiPO block {config.block}", unit="step")
    sv = None
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(n_train)
        losses = []
        for idx, n_real in _batches(order, bs):
            d = float(rng.choice((-1.0, 1.0)))
            rows = np.concatenate([idx, idx + n_train])
            weight = (np.arange(len(idx)) < n_real).astype(np.float32)  # [P] 0 on padding
            vector, opt_state, loss, _ = step(
                vector,
                opt_state,
                model.params,
                select,
                jnp.float32(d),
                jnp.asarray(prep.ref_train[idx]),
                jnp.asarray(weight),
                jnp.asarray(train.tokens[rows]),
                jnp.asarray(train.valid[rows]),
                jnp.asarray(train.response[rows]),
            )
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"BiPO loss is {loss} at epoch {epoch} (block {config.block})"
                )
            losses.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", d=int(d))
        v = np.asarray(vector)
        record: dict = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "block": config.block,
            "train_step_loss": float(np.mean(losses)),
            "norm": float(np.linalg.norm(v)),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        ev = dict(beta=config.beta, batch_size=bs, steer_blocks=blocks)
        train_m = evaluate_vector(model, train, v, config.block, ref_margin=prep.ref_train, **ev)
        record.update({f"train_{k}": val for k, val in train_m.items()})
        if held is not None:
            held_m = evaluate_vector(model, held, v, config.block, ref_margin=prep.ref_held, **ev)
            record.update({f"test_{k}": val for k, val in held_m.items()})
        history.append(record)
        sv = SteeringVector(
            vector=v,
            block=config.block,
            model=model.spec.name,
            method="bipo",
            epoch=epoch,
            extra={
                "metrics": record,
                "config": dataclasses.asdict(config),
                "n_train": prep.n_train,
                "n_test": prep.n_test,
                "n_truncated": prep.n_truncated,
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


def _write_json(path: Path, obj) -> None:
    """Write then rename, so a reader never sees half a summary."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def format_epoch(record: dict) -> str:
    """One summary line per epoch."""
    line = (
        (f"block {record['block']} " if "block" in record else "")
        + f"epoch {record['epoch']}: step loss {record['train_step_loss']:.4f}, "
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
