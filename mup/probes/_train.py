"""Training: AdamW loops (jitted) and the closed-form / Newton probes.

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
import jax.scipy.sparse.linalg
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


def train_pooled(cfg: ProbeConfig, x, y, xv, yv, seed: int):
    """AdamW on pooled vectors x [N, D], labels y [N]; validation (xv, yv) may be None.

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
        init_params("mean", d, jax.random.key(seed)),
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


def train_sequence(cfg: ProbeConfig, train, val, seed: int):
    """AdamW on bucketed padded batches of a sequence kind (max / softmax / rolling /
    attention). `train`, `val` are batch sources of labelled records (`mup.probes._batches`:
    device-resident buckets or streamed stores); val may be None."""
    b = min(cfg.batch_size, train.n)
    steps = train.n_steps(b)
    tx = _optimizer(cfg, cfg.epochs * steps)
    key = ("step", cfg, b, steps)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(_sequence_step, cfg, tx))
    step = _PROGRAMS[key]
    forward = sequence_forward(cfg)

    rng = np.random.default_rng(seed)
    params = init_params(cfg.kind, train.d_model, jax.random.key(seed))
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


# ------------------------------------------------------------------- closed-form / Newton


def calibrate_1d(proj: np.ndarray, y: np.ndarray, max_steps: int = 50):
    """Fit p = sigmoid(scale * proj + shift) by Newton's method (unpenalised, float64).

    Used by dom / lda so that `predict` returns probabilities. A tiny ridge (1e-6) keeps the
    Hessian invertible when the classes separate perfectly.
    """
    z = np.stack([proj.astype(np.float64), np.ones_like(proj, np.float64)], axis=1)  # [N, 2]
    sd = max(float(proj.std()), 1e-12)
    z[:, 0] /= sd
    theta = np.zeros(2)
    yf = y.astype(np.float64)
    for _ in range(max_steps):
        p = 1.0 / (1.0 + np.exp(-(z @ theta)))
        g = z.T @ (p - yf) + 1e-6 * theta
        h = (z * (p * (1 - p))[:, None]).T @ z + 1e-6 * np.eye(2)
        delta = np.linalg.solve(h, g)
        theta -= delta
        if np.abs(delta).max() < 1e-10:
            break
    return float(theta[0] / sd), float(theta[1])


class ClassMeans:
    """Per-class sums of pooled vectors in float64, added chunk by chunk: the difference of
    class means of the dom probe and of a steering vector read from a store larger than memory.
    """

    def __init__(self, d: int):
        self.sums = np.zeros((2, d), np.float64)  # [2, D] label 0, label 1
        self.counts = np.zeros(2, np.int64)  # [2]

    def add(self, x: np.ndarray, y: np.ndarray) -> ClassMeans:
        """Add the rows of x [K, D] labelled 0 or 1 in y [K] (other labels are left out)."""
        x = np.asarray(x, np.float64)
        for c in (0, 1):
            sel = y == c
            self.sums[c] += x[sel].sum(axis=0)
            self.counts[c] += int(np.count_nonzero(sel))
        return self

    def difference(self) -> np.ndarray:
        """mu_1 - mu_0 [D] float64."""
        return self.sums[1] / self.counts[1] - self.sums[0] / self.counts[0]


def train_dom(x: np.ndarray, y: np.ndarray) -> dict:
    """Difference of class means w = mu_1 - mu_0 on pooled x [N, D]."""
    x64 = x.astype(np.float64)
    w = ClassMeans(x.shape[1]).add(x64, y).difference()  # [D]
    scale, shift = calibrate_1d(x64 @ w, y)
    return _projection_params(w, scale, shift)


def ledoit_wolf(xc: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of centred samples xc [N, D] and its intensity.

    S = xc^T xc / N, target mu I with mu = tr(S) / D; intensity = min(b2, d2) / d2 with
    d2 = |S - mu I|_F^2 / D and b2 = (sum_i |x_i|^4 / N - |S|_F^2) / (N D).
    """
    n, d = xc.shape
    s = xc.T @ xc / n  # [D, D]
    mu = np.trace(s) / d
    s_fro2 = float(np.sum(s * s))
    d2 = (s_fro2 - 2 * mu * np.trace(s) + d * mu * mu) / d
    b2 = (float(np.sum(np.sum(xc * xc, axis=1) ** 2)) / n - s_fro2) / (n * d)
    shrink = 0.0 if d2 <= 0 else min(b2, d2) / d2
    return (1 - shrink) * s + shrink * mu * np.eye(d), float(shrink)


def train_lda(x: np.ndarray, y: np.ndarray, shrinkage) -> dict:
    """Shrinkage LDA on pooled x [N, D]: w = inv(Sigma) (mu_1 - mu_0).

    Sigma is the class-prior weighted mean of the per-class covariances, each shrunk towards
    mu I (mu = mean variance), with Ledoit-Wolf's intensity or a fixed one - the estimator of
    scikit-learn's `LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto" | float)`.
    """
    x64 = x.astype(np.float64)
    d = x.shape[1]
    sigma = np.zeros((d, d))
    means = {}
    for cls in (0, 1):
        xc = x64[y == cls]
        means[cls] = xc.mean(0)
        centred = xc - means[cls]  # [N_c, D]
        if shrinkage == "ledoit_wolf":
            # Per-feature standardise, shrink towards the identity, scale back: the intensity
            # is then unaffected by features with very different variances.
            scale = centred.std(0)
            scale[scale == 0] = 1.0
            cov, _ = ledoit_wolf(centred / scale)
            cov = scale[:, None] * cov * scale[None, :]
        else:
            emp = centred.T @ centred / centred.shape[0]  # [D, D]
            mu = np.trace(emp) / d
            cov = (1 - float(shrinkage)) * emp + float(shrinkage) * mu * np.eye(d)
        sigma += (xc.shape[0] / x.shape[0]) * cov
    w = np.linalg.lstsq(sigma, means[1] - means[0], rcond=None)[0]  # [D]
    scale, shift = calibrate_1d(x64 @ w, y)
    return _projection_params(w, scale, shift)


def _projection_params(w, scale, shift) -> dict:
    return {
        "w": jnp.asarray(w, jnp.float32),
        "b": jnp.float32(0.0),
        "scale": jnp.float32(scale),
        "shift": jnp.float32(shift),
    }


def train_logreg(x: np.ndarray, y: np.ndarray, c: float, max_steps: int) -> tuple[dict, dict]:
    """L2 logistic regression on standardised x [N, D], scikit-learn's objective
    |w|^2 / 2 + C * sum_i logloss (intercept unpenalised), by Newton-CG in JAX."""
    x = np.asarray(x, np.float32)
    mu = x.mean(0)
    sd = x.std(0)
    sd[sd == 0] = 1.0
    z = (x - mu) / sd
    w, b, n_steps = _newton(jnp.asarray(z), jnp.asarray(y, jnp.float32), jnp.float32(c), max_steps)
    params = {"w": w, "b": b, "mu": jnp.asarray(mu), "sd": jnp.asarray(sd)}
    return params, {"newton_steps": int(n_steps)}


def _newton_impl(z, y, c, max_steps):
    """Newton's method with each step solved by conjugate gradients on Hessian-vector
    products (two [N, D] products per CG iteration), never forming the [D+1, D+1] Hessian:
    at N ~ D the explicit Hessian and its Cholesky cost several times the whole CG solve."""
    n, d = z.shape
    reg = jnp.concatenate([jnp.ones((d,)), jnp.zeros((1,))])  # intercept unpenalised

    def xt(u):  # [N] -> [D+1]: the transpose of theta -> z @ w + b
        return jnp.concatenate([z.T @ u, jnp.sum(u)[None]])

    def body(state):
        theta, i, _ = state
        p = jax.nn.sigmoid(z @ theta[:d] + theta[d])  # [N]
        g = reg * theta + c * xt(p - y)  # [D+1]
        s = p * (1 - p)  # [N]

        def hvp(v):  # the Hessian is symmetric positive definite: CG applies
            return reg * v + c * xt(s * (z @ v[:d] + v[d]))

        delta, _ = jax.scipy.sparse.linalg.cg(hvp, g, tol=1e-6, maxiter=d + 1)
        return theta - delta, i + 1, jnp.max(jnp.abs(delta))

    def cond(state):
        _, i, step = state
        return (i < max_steps) & (step > 1e-6)

    theta, i, _ = jax.lax.while_loop(
        cond, body, (jnp.zeros((d + 1,), jnp.float32), jnp.int32(0), jnp.float32(jnp.inf))
    )
    return theta[:d], theta[d], i


_newton = jax.jit(_newton_impl, static_argnums=3)
