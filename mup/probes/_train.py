"""Training of the gradient probes: AdamW loops (jitted); the closed-form and Newton probes are
in `mup.probes._closed_form`.

Axis letters: N records, B rows of a batch, P padded length, D model width, E epochs,
S optimiser steps per epoch.

Pooled kinds train on [N, D] vectors with the WHOLE run in one compiled program: a
`lax.while_loop` over epochs (it stops early when validation AUROC has not improved for
`patience` epochs), each epoch a `lax.scan` over shuffled mini-batches. Sequence kinds take
[B, P_k, D] batches from a source in `mup.probes._batches` (padded buckets on the device, or a
store streamed chunk by chunk); XLA compiles one step program per bucket shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mup import metrics
from mup.probes._config import ProbeConfig
from mup.probes._heads import auroc_jax, init_params, pooled_logits, sequence_logits


def _optimizer(cfg: ProbeConfig, total_steps: int):
    schedule = optax.cosine_decay_schedule(
        init_value=cfg.lr, decay_steps=max(total_steps, 1), alpha=cfg.final_lr / cfg.lr
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def _bce(logits, y, w):
    """Mean binary cross-entropy over the rows with weight 1 (w is 0 for padding rows)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, y.astype(jnp.float32))
    return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)


# ----------------------------------------------------------------------------- pooled kinds


def train_pooled(cfg: ProbeConfig, x, y, xv, yv, seed: int, init: dict | None = None):
    """AdamW on pooled vectors x [N, D], labels y [N]; validation (xv, yv) may be None.

    `init` ({w, b} float32) replaces the seeded random initialisation (a warm start).

    Returns (params, history) where params are the best-validation parameters (the last ones
    without validation) and history has per-epoch `train_loss`, `val_auroc`, `best_epoch`.
    """
    n, d = x.shape
    b = min(cfg.batch_size, n)
    steps = math.ceil(n / b)
    has_val = xv is not None
    if not has_val:
        xv, yv = x[:2], np.array([0, 1], np.int8)  # placeholders, never read
    fn = _pooled_program(cfg, n, d, b, steps, has_val, xv.shape[0])
    # Shuffles come from numpy (seeded) rather than jax.random.permutation: a sort inside the
    # program costs more XLA compile time than the whole run on small data.
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(cfg.epochs)]).astype(np.int32)  # [E, N]
    params, best_epoch, n_epochs, losses, aucs = fn(
        init_params("mean", d, jax.random.key(seed)) if init is None else init,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.int32),
        jnp.asarray(xv, jnp.float32),
        jnp.asarray(yv, jnp.int32),
        jnp.asarray(perms),
    )
    n_epochs = int(n_epochs)
    history = {
        "train_loss": np.asarray(losses)[:n_epochs].tolist(),
        "val_auroc": np.asarray(aucs)[:n_epochs].tolist() if has_val else [],
        "best_epoch": int(best_epoch),
        "epochs_run": n_epochs,
    }
    return params, history


_PROGRAMS: dict = {}


class _EpochState(NamedTuple):
    """The carry of the whole-run `lax.while_loop` (a pytree, so it traces under jit)."""

    params: dict  # current parameters
    opt_state: Any
    epoch: jax.Array  # [] int32, epochs run so far
    best: dict  # parameters of the best validation epoch
    best_auc: jax.Array  # [] float32
    since: jax.Array  # [] int32, epochs since the best one (early stopping)
    best_epoch: jax.Array  # [] int32
    losses: jax.Array  # [E] float32 train loss per epoch
    aucs: jax.Array  # [E] float32 validation AUROC per epoch


def _pooled_program(cfg, n, d, b, steps, has_val, nv):
    """The compiled whole-run training program, cached by everything that shapes it."""
    # Every pooled gradient kind is the same linear model on its pooled vectors: share programs.
    cfg = dataclasses.replace(cfg, kind="mean")
    key = (cfg, n, d, b, steps, has_val, nv)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    tx = _optimizer(cfg, cfg.epochs * steps)
    patience = cfg.patience if (has_val and cfg.patience > 0) else cfg.epochs + 1

    def loss_fn(params, xb, yb, wb):
        return _bce(pooled_logits(params, xb), yb, wb)

    grad_fn = jax.value_and_grad(loss_fn)

    def run(params, x, y, xv, yv, perms):
        opt_state = tx.init(params)

        def step(carry, batch):
            params, opt_state = carry
            idx, wb = batch  # [B], [B]
            loss, grads = grad_fn(params, x[idx], y[idx], wb)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def epoch(st: _EpochState) -> _EpochState:
            perm = perms[st.epoch]  # [N]
            pad = steps * b - n
            idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(steps, b)
            wb = (jnp.arange(steps * b) < n).astype(jnp.float32).reshape(steps, b)
            (params, opt_state), batch_losses = jax.lax.scan(
                step, (st.params, st.opt_state), (idx, wb)
            )
            # Mean over steps weighted by real rows per step.
            loss = jnp.sum(batch_losses * wb.sum(1)) / n
            auc = auroc_jax(pooled_logits(params, xv), yv) if has_val else jnp.float32(0.0)
            better = (auc > st.best_auc) if has_val else jnp.bool_(True)
            return _EpochState(
                params=params,
                opt_state=opt_state,
                epoch=st.epoch + 1,
                best=jax.tree.map(lambda new, old: jnp.where(better, new, old), params, st.best),
                best_auc=jnp.where(better, auc, st.best_auc),
                since=jnp.where(better, 0, st.since + 1),
                best_epoch=jnp.where(better, st.epoch, st.best_epoch),
                losses=st.losses.at[st.epoch].set(loss),
                aucs=st.aucs.at[st.epoch].set(auc),
            )

        def cond(st: _EpochState):
            return (st.epoch < cfg.epochs) & (st.since < patience)

        zeros = jnp.zeros((cfg.epochs,), jnp.float32)
        state = _EpochState(
            params=params,
            opt_state=opt_state,
            epoch=jnp.int32(0),
            best=params,
            best_auc=jnp.float32(-1.0),
            since=jnp.int32(0),
            best_epoch=jnp.int32(0),
            losses=zeros,
            aucs=zeros,
        )
        st = jax.lax.while_loop(cond, epoch, state)
        return st.best, st.best_epoch, st.epoch, st.losses, st.aucs

    fn = jax.jit(run)
    _PROGRAMS[key] = fn
    return fn


# --------------------------------------------------------------------------- sequence kinds


def sequence_forward(cfg):
    """Jitted (params, x [B, P, D], m [B, P]) -> logits [B] of a sequence kind."""
    key = ("fwd", cfg.kind, cfg.temperature, cfg.window)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(
            lambda params, x, m: sequence_logits(
                params, x, m, kind=cfg.kind, temperature=cfg.temperature, window=cfg.window
            )
        )
    return _PROGRAMS[key]


_CHUNK_BYTES = 8 << 20
"""Bytes of float32 activations per row chunk of a sequence step: small enough to stay in
cache between the forward and backward products, large enough to amortise the loop (a few MiB
ran the attention step fastest on CPU; `benchmarks/bench_probes.py` times it)."""


def _rows_per_chunk(batch: int, padded_len: int, d: int) -> int:
    """Largest divisor of `batch` whose [rows, P, D] float32 chunk fits `_CHUNK_BYTES`."""
    fit = max(1, _CHUNK_BYTES // (padded_len * d * 4))
    return max(r for r in range(1, batch + 1) if batch % r == 0 and r <= fit)


def _sequence_step(cfg: ProbeConfig, tx, params, opt_state, xk, mk, ykk, idx, wb):
    """One AdamW step on rows idx [B] of bucket arrays xk [n_k, P, D], mk [n_k, P], ykk [n_k].

    The loss is a sum over rows, so its gradient is accumulated chunk by chunk: a scan over
    [R, P, D] chunks (R rows, a few MiB) computes forward and backward of each chunk while
    it sits in cache. Autodiff of the whole [B, P, D] batch instead gathers the batch into a
    new array and reads it once more for the backward pass: three trips through memory per
    step instead of one, on a probe that does two multiply-adds per activation.
    """
    B = idx.shape[0]
    R = _rows_per_chunk(B, xk.shape[1], xk.shape[2])

    def chunk_loss(p, xr, mr, yr, wr):
        logits = sequence_logits(
            p, xr, mr, kind=cfg.kind, temperature=cfg.temperature, window=cfg.window
        )  # [R]
        losses = optax.sigmoid_binary_cross_entropy(logits, yr.astype(jnp.float32))
        return jnp.sum(losses * wr)

    grad_fn = jax.value_and_grad(chunk_loss)

    def body(carry, chunk):
        rows, wr = chunk  # [R], [R]

        def add(carry):
            total, grads = carry
            loss, g = grad_fn(params, xk[rows], mk[rows], ykk[rows], wr)
            return total + loss, jax.tree.map(jnp.add, grads, g)

        # The last batch of a bucket is padded with weight-0 rows (at its end) to the fixed
        # batch shape; chunks of padding alone are skipped. A bucket of long records holding
        # a few rows would otherwise cost a whole batch of them.
        return jax.lax.cond(jnp.any(wr > 0), add, lambda c: c, carry), None

    zero = jax.tree.map(jnp.zeros_like, params)
    chunks = (idx.reshape(B // R, R), wb.reshape(B // R, R))
    (total, grads), _ = jax.lax.scan(body, (jnp.float32(0.0), zero), chunks)
    n = jnp.maximum(jnp.sum(wb), 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, total / n


def train_sequence(cfg: ProbeConfig, train, val, seed: int, init: dict | None = None):
    """AdamW on bucketed padded batches of a sequence kind (max / softmax / rolling /
    attention). `train`, `val` are batch sources of labelled records (`mup.probes._batches`:
    device-resident buckets or streamed stores); val may be None. `init` replaces the seeded
    random initialisation (a warm start)."""
    b = min(cfg.batch_size, train.n)
    steps = train.n_steps(b)
    tx = _optimizer(cfg, cfg.epochs * steps)
    key = ("step", cfg, b, steps)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(_sequence_step, cfg, tx))
    step = _PROGRAMS[key]
    forward = sequence_forward(cfg)

    rng = np.random.default_rng(seed)
    params = init_params(cfg.kind, train.d_model, jax.random.key(seed)) if init is None else init
    opt_state = tx.init(params)
    has_val = val is not None
    patience = cfg.patience if (has_val and cfg.patience > 0) else cfg.epochs + 1
    best, best_auc, since, best_e = params, -1.0, 0, 0
    losses, aucs = [], []
    for e in range(cfg.epochs):
        total = jnp.float32(0.0)
        for x, m, y, idx, wb in train.batches(b, rng):
            params, opt_state, loss = step(params, opt_state, x, m, y, idx, wb)
            total = total + loss * wb.sum()
        losses.append(float(total) / train.n)
        if has_val:
            auc = metrics.auroc(val.logits(forward, params), val.labels)
            aucs.append(auc)
            better = auc > best_auc
        else:
            better = True
        if better:
            # jax arrays are immutable, so holding the reference is a real snapshot; copy
            # anyway so that a later donating update can never alias it.
            best = jax.tree.map(jnp.copy, params)
            best_auc = aucs[-1] if has_val else best_auc
            since, best_e = 0, e
        else:
            since += 1
            if since >= patience:
                break
    history = {
        "train_loss": losses,
        "val_auroc": aucs,
        "best_epoch": best_e,
        "epochs_run": len(losses),
    }
    return best, history
