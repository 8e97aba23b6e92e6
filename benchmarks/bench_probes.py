"""Probe training speed: mup (JAX, jitted) vs the PyTorch loop of the MUP paper, and the
logistic-regression baseline vs scikit-learn, on the same synthetic ragged activations, for two
record-length distributions: uniform short records (16..160 tokens) and the lengths of the MUP
training set's conversations (median ~150, tail past 1000 tokens).

    python benchmarks/bench_probes.py            # N=800 records, D=576 (SmolLM2 width)
    python benchmarks/bench_probes.py --quick    # small smoke run (< 30 s)

Axis letters: N records, T tokens, P padded length, B batch rows, D model width.

What is compared (same data, epochs, batch size, optimiser, schedule, clip, per-epoch
validation AUROC, no early stopping so both run every epoch):
  * attention probe: mup.probes.fit("attention") vs an AttnLite-style torch module trained on
    [N, P_max, D] activations padded to the longest record with a shuffled mini-batch loop,
    as the MUP code does;
  * mean probe: mup.probes.fit("mean") (pools once with mup.native, then one compiled program
    runs every epoch) vs the torch loop that pools inside every step (the MUP loop), and vs a
    torch loop on pre-pooled vectors (the fairest torch alternative);
  * logreg: mup's Newton-CG solver vs sklearn LogisticRegression (lbfgs) on the same
    standardised mean-pooled vectors.
mup timings are reported cold (first call: includes XLA compilation) and warm (compiled);
mup's include building its padded buckets from ragged storage, the torch loop gets its padded
array ready-made.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def uniform_lengths(n: int, lo: int, hi: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, n)


def stakes_lengths(n: int, seed: int) -> tuple[np.ndarray, str]:
    """Record lengths drawn from the MUP training set: its conversations' characters / 4
    (about a token each for English BPE), capped at 4096 tokens like `mup extract`. Without
    ../shared data, `find_dataset` falls back to the bundled stakes sample."""
    import json

    from mup.data import find_dataset

    path = find_dataset("training", allow_hub=False)
    with open(path) as file:
        chars = [len(json.dumps(json.loads(line)["inputs"])) for line in file if line.strip()]
    pool = np.clip(np.asarray(chars) // 4, 8, 4096)
    return np.random.default_rng(seed).choice(pool, n), f"lengths of {path.name} (chars/4)"


def make_data(lengths: np.ndarray, d: int, seed: int):
    from mup import probes

    rng = np.random.default_rng(seed)
    n = len(lengths)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    labels = np.resize(np.array([0, 1], np.int8), n)
    rng.shuffle(labels)
    acts = rng.normal(size=(int(offsets[-1]), d)).astype(np.float32)
    # The same planted direction in every split (its own seed).
    direction = np.random.default_rng(1234).normal(size=d).astype(np.float32) / np.sqrt(d)
    acts += 0.5 * np.repeat(labels, lengths)[:, None] * direction
    mask = rng.random(acts.shape[0]) < 0.9
    mask[offsets[:-1]] = True
    return probes.Activations(acts=acts, offsets=offsets, mask=mask, labels=labels)


def padded(data):
    """[N, P_max, D] float32 and mask [N, P_max], padded to the longest record (MUP layout)."""
    n, lengths = data.n_records, np.diff(data.offsets)
    p = int(lengths.max())
    x = np.zeros((n, p, data.d_model), np.float32)
    m = np.zeros((n, p), bool)
    for i in range(n):
        s, e = data.offsets[i], data.offsets[i + 1]
        x[i, : e - s] = data.acts[s:e]
        m[i, : e - s] = data.mask[s:e]
    return x, m


def torch_train(kind, x, m, y, xv, mv, yv, *, epochs, batch, lr, final_lr, wd, clip, seed):
    """The MUP-style torch loop: AdamW, cosine decay, grad clipping, val AUROC per epoch."""
    import torch
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    d = x.shape[-1]

    class AttnLite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(d, 1)
            self.classifier = torch.nn.Linear(d, 1)

        def forward(self, xb, mb):
            a = self.query(xb).squeeze(-1) / math.sqrt(d)  # [B, P]
            a = a.masked_fill(~mb, float("-inf")).softmax(-1)
            return self.classifier(torch.einsum("bp,bpd->bd", a, xb)).squeeze(-1)

    class MeanProbe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(d, 1)

        def forward(self, xb, mb):
            if xb.dim() == 2:  # pre-pooled vectors
                return self.linear(xb).squeeze(-1)
            mf = mb.float()
            s = self.linear(xb).squeeze(-1)  # [B, P] per-token logits
            return (s * mf).sum(-1) / mf.sum(-1)

    model = AttnLite() if kind == "attention" else MeanProbe()
    x, y, xv = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)), torch.from_numpy(xv)
    m = None if m is None else torch.from_numpy(m)
    mv = None if mv is None else torch.from_numpy(mv)
    steps = math.ceil(len(y) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps, eta_min=final_lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            logits = model(x[idx], None if m is None else m[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            auc = roc_auc_score(yv, model(xv, mv).numpy())
    return auc


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare_probe(kind, train, val, epochs, pad, val_pad):
    """Rows (name, mup s, torch s, mup AUROC, torch AUROC) for one probe kind."""
    from mup import metrics, native, probes

    cfg = probes.default_config(kind)

    def fit():
        return probes.fit(kind, train, val=val, seed=0, epochs=epochs, patience=0)

    cold, probe = timed(fit)  # includes XLA compilation
    warm, probe = timed(fit)
    auc_mup = metrics.auroc(probe.logits(val), val.labels)
    tkw = dict(
        epochs=epochs,
        batch=cfg.batch_size,
        lr=cfg.lr,
        final_lr=cfg.final_lr,
        wd=cfg.weight_decay,
        clip=cfg.grad_clip,
        seed=0,
    )
    # Warm-up torch too (first optimizer step / autograd initialisation) on a small slice.
    torch_train(
        kind,
        pad[0][:8],
        pad[1][:8],
        train.labels[:8],
        *val_pad,
        val.labels,
        **(tkw | {"epochs": 1}),
    )
    t_torch, auc_torch = timed(
        lambda: torch_train(kind, *pad, train.labels, *val_pad, val.labels, **tkw)
    )
    rows = [
        (f"{kind} probe: mup cold vs torch (MUP loop)", cold, t_torch, auc_mup, auc_torch),
        (f"{kind} probe: mup warm vs torch (MUP loop)", warm, t_torch, auc_mup, auc_torch),
    ]
    if kind == "mean":
        xp = native.pool(train.acts, train.offsets, method="mean", mask=train.mask)
        xvp = native.pool(val.acts, val.offsets, method="mean", mask=val.mask)
        t_tp, auc_tp = timed(
            lambda: torch_train("mean", xp, None, train.labels, xvp, None, val.labels, **tkw)
        )
        rows.append(
            ("mean probe: mup warm vs torch on pre-pooled vectors", warm, t_tp, auc_mup, auc_tp)
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 30 s)")
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()

    import jax
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mup import native, probes
    from mup.probes._closed_form import train_logreg

    if args.quick:
        n, d, lo, hi, epochs = 128, 64, 8, 30, 3
    else:
        n, d, lo, hi, epochs = 800, 576, 16, 160, 10
    epochs = args.epochs or epochs
    print(
        f"N={n} train / {n // 4} val records, D={d}, {epochs} epochs; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), native backend: {native.backend()}"
    )
    # Two length distributions: uniform short records, and the heavy tail of real chats,
    # where padding every record to the longest (the MUP layout) costs the most.
    stakes, stakes_source = stakes_lengths(n + n // 4, 0)
    if args.quick:
        stakes = np.minimum(stakes, 4 * hi)
    distributions = {
        f"uniform {lo}..{hi}": (uniform_lengths(n, lo, hi, 0), uniform_lengths(n // 4, lo, hi, 1)),
        "stakes": (stakes[:n], stakes[n:]),
    }
    rows = []
    for name, (train_len, val_len) in distributions.items():
        train, val = make_data(train_len, d, 0), make_data(val_len, d, 1)
        print(
            f"{name} lengths: T={train.acts.shape[0]} tokens, mean {train_len.mean():.0f}, "
            f"max {train_len.max()}" + (f" ({stakes_source})" if name == "stakes" else "")
        )
        x_pad, m_pad = padded(train)
        xv_pad, mv_pad = padded(val)
        for kind in ("attention", "mean"):
            for row in compare_probe(kind, train, val, epochs, (x_pad, m_pad), (xv_pad, mv_pad)):
                rows.append((f"[{name.split()[0]}] {row[0]}", *row[1:]))
        del x_pad, xv_pad

    # Logistic regression on the same standardised mean-pooled vectors.
    xp = native.pool(train.acts, train.offsets, method="mean", mask=train.mask)
    c = probes.default_config("logreg").c
    cold, _ = timed(lambda: train_logreg(xp, train.labels, c, 50))
    # Best of 3 on both sides: each fit takes milliseconds, a single timing is mostly noise.
    warm, (params, _) = min(
        (timed(lambda: train_logreg(xp, train.labels, c, 50)) for _ in range(3)), key=lambda r: r[0]
    )
    z = StandardScaler().fit_transform(xp)
    t_sk, sk = min(
        (
            timed(lambda: LogisticRegression(C=c, max_iter=1000).fit(z, train.labels))
            for _ in range(3)
        ),
        key=lambda r: r[0],
    )
    w = np.asarray(params["w"])
    cos = float(w @ sk.coef_[0] / np.linalg.norm(w) / np.linalg.norm(sk.coef_[0]))
    rows.append(
        (
            f"logreg: mup Newton-CG cold vs sklearn (cos(w) = {cos:.6f})",
            cold,
            t_sk,
            float("nan"),
            float("nan"),
        )
    )
    rows.append(("logreg: mup Newton-CG warm vs sklearn", warm, t_sk, float("nan"), float("nan")))

    print(f"\n{'comparison':62s} {'mup s':>8s} {'other s':>8s} {'speed-up':>9s}  val AUROC")
    for name, t_mup, t_other, a1, a2 in rows:
        aucs = "" if math.isnan(a1) else f"{a1:.3f} / {a2:.3f}"
        print(f"{name:62s} {t_mup:8.3f} {t_other:8.3f} {t_other / t_mup:8.1f}x  {aucs}")


if __name__ == "__main__":
    main()
