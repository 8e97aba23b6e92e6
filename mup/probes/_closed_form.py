"""Training of the closed-form and Newton probes: difference of means, shrinkage LDA, logistic
regression (Newton-CG), and the 1-D calibration that makes dom / lda predict probabilities.

Axis letters: N records, D model width, K rows of a chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg
import numpy as np


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
