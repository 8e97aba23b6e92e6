"""Figures on a headless machine: every plot in mup (experiments, monitors, evals) is made and
saved through these two, so the backend and the saving conventions live in one place."""

from __future__ import annotations

from pathlib import Path


def new_figure(*args, **kwargs):
    """A matplotlib figure from the non-interactive backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path) -> Path:
    """Lay out, write (120 dpi, parent folders made) and close `fig`; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
