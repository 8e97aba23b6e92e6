"""JAX forward passes of the probes on pooled vectors and on padded sequence batches.

Axis letters: N records, B rows of a padded batch, P padded length, D model width.

Parameters are a flat dict of arrays:
  linear kinds: w [D], b []          attention: q [D], qb [], w [D], b []
  logreg adds mu [D], sd [D] (the standardisation); dom / lda add scale [], shift [] (the
  1-D calibration of the projection w . x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # finite "minus infinity": masked softmax / max stay NaN-free


def init_params(kind: str, d: int, key) -> dict:
    """Uniform(-1/sqrt(D), 1/sqrt(D)) like torch.nn.Linear, from `key`."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    bound = 1.0 / np.sqrt(d)

    def u(k, shape):
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    params = {"w": u(k1, (d,)), "b": u(k2, ())}
    if kind == "attention":
        params |= {"q": u(k3, (d,)), "qb": u(k4, ())}
    return params


def pooled_logits(params: dict, x):
    """Logits [N] of a linear probe on pooled vectors x [N, D]; jax or numpy arrays alike (the
    numpy path scores tokens and pooled vectors on the host)."""
    if "mu" in params:
        x = (x - params["mu"]) / params["sd"]
    z = x @ params["w"] + params["b"]  # [N]
    if "scale" in params:
        z = params["scale"] * z + params["shift"]
    return z


def sequence_logits(params: dict, x, m, *, kind: str, temperature: float, window: int):
    """Logits [B] of a sequence probe on a padded batch x [B, P, D] with mask m [B, P].

    Masked-out positions never reach the result: their scores are replaced before every
    reduction (max / softmax with a finite -inf, sums multiplied by the mask).
    """
    mf = m.astype(jnp.float32)  # [B, P]
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)  # half-precision batches: compute in float32
    if kind == "attention":
        # logit = w . (sum_t alpha_t x_t) + b = sum_t alpha_t (w . x_t + b) because the weights
        # sum to 1: one [B, P, D] x [D, 2] product gives both the attention scores and the
        # token scores, so forward and backward each read the batch once.
        qw = jnp.stack([params["q"], params["w"]], axis=-1)  # [D, 2]
        both = _tokens_matmul(x, qw)  # [B, P, 2]
        a = (both[..., 0] + params["qb"]) / jnp.sqrt(jnp.float32(x.shape[-1]))  # [B, P]
        s = both[..., 1] + params["b"]  # [B, P] per-token logits
        alpha = jax.nn.softmax(jnp.where(m, a, _NEG), axis=-1) * mf  # [B, P]
        return jnp.sum(alpha * s, axis=-1)  # [B]
    s = _tokens_matmul(x, params["w"][:, None])[..., 0] + params["b"]  # [B, P] per-token logits
    if kind == "max":
        return jnp.max(jnp.where(m, s, _NEG), axis=-1)
    if kind == "softmax":
        alpha = jax.nn.softmax(jnp.where(m, s / temperature, _NEG), axis=-1) * mf  # [B, P]
        return jnp.sum(alpha * s, axis=-1)
    if kind == "rolling":
        # Max over windows of `k = min(window, length)` consecutive tokens of the window mean.
        # Batches hold compacted records (every real token is masked-in), so a window is a run
        # of positions [t - k, t) with t <= length.
        length = jnp.sum(m, axis=-1)  # [B]
        k = jnp.minimum(window, length)  # [B]
        c = jnp.concatenate([jnp.zeros_like(s[:, :1]), jnp.cumsum(s * mf, axis=-1)], axis=-1)
        t = jnp.arange(1, s.shape[1] + 1)[None, :]  # [1, P] window end (exclusive)
        start = jnp.clip(t - k[:, None], 0, None)  # [B, P]
        sums = c[:, 1:] - jnp.take_along_axis(c, start, axis=-1)  # [B, P]
        valid = (t >= k[:, None]) & (t <= length[:, None])
        means = sums / k[:, None].astype(jnp.float32)
        return jnp.max(jnp.where(valid, means, _NEG), axis=-1)
    raise ValueError(f"{kind!r} is not a sequence probe kind")


def _tokens_matmul(x, w):
    """x [B, P, D] @ w [D, K] -> [B, P, K] as one 2-D [B*P, D] product.

    XLA on CPU runs the 3-D form (and its transpose in the backward pass) on a generic
    contraction path several times slower than the 2-D matrix product.
    """
    B, P, D = x.shape
    return (x.reshape(B * P, D) @ w).reshape(B, P, w.shape[-1])


def auroc_jax(scores, labels):
    """AUROC with tied scores counted as half (average ranks), traceable inside jit.

    Ranks come from pairwise comparisons for up to `_PAIRWISE_MAX` scores (XLA compiles a
    sort far more slowly than the whole comparison costs at that size), from a sort beyond.
    """
    if scores.shape[0] <= _PAIRWISE_MAX:
        lo = jnp.sum(scores[None, :] < scores[:, None], axis=1)  # [N] scores strictly below
        hi = jnp.sum(scores[None, :] <= scores[:, None], axis=1)  # [N] scores at or below
    else:
        order = jnp.sort(scores)
        lo = jnp.searchsorted(order, scores, side="left")
        hi = jnp.searchsorted(order, scores, side="right")
    ranks = (lo + 1 + hi).astype(jnp.float32) / 2.0  # [N]
    pos = labels == 1
    n_pos = jnp.sum(pos).astype(jnp.float32)
    n_neg = labels.shape[0] - n_pos
    return (jnp.sum(jnp.where(pos, ranks, 0.0)) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


_PAIRWISE_MAX = 4096
