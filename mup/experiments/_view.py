"""`mup probes view`: one self-contained HTML page of what a probe reads, token by token.

Each record's tokens, decoded one by one with the model's tokenizer, are coloured by the
probe's per-token score (`Probe.token_scores`, shown as sigmoid(logit): blue for low stakes,
white at 0.5, red for high stakes). Attention probes can also show their attention weights
(`Probe.attention_weights`) as an underline whose darkness is the weight relative to the
record's largest. Role runs (system / user / assistant / tool, and the chat template's own
tokens) come from the store's per-token roles; tokens outside the probe's mask (never read) are
dimmed. Records can be sorted by score and filtered by label and by misclassification at
threshold 0.5.

The page opens from disk: CSS and JS are inline, and its Content-Security-Policy forbids every
network request. jinja2 renders it with autoescaping on (token text is untrusted input).

Axis letters: N records, T tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mup.experiments._score import (
    DEFAULT_STORE_DIR,
    FROM_PROBE,
    check_store,
    extract_for,
    locate_datasets,
    monitor_name,
    probe_input,
)

THRESHOLD = 0.5  # misclassified: (score >= THRESHOLD) != label
# End colours of the diverging token scale; white sits at probability 0.5.
HIGH_RGB = np.array([214, 39, 40])
LOW_RGB = np.array([31, 119, 180])
LABEL_NAMES = {1: "high stakes", 0: "low stakes", -1: "unlabelled"}


def score_colours(probs) -> list[str]:
    """CSS ``rgb(r, g, b)`` per probability: blue at 0, white at 0.5, red at 1."""
    t = 2.0 * np.clip(np.asarray(probs, np.float64), 0.0, 1.0) - 1.0  # [T] in [-1, 1]
    end = np.where(t[:, None] >= 0, HIGH_RGB, LOW_RGB)  # [T, 3]
    rgb = np.rint(255.0 + np.abs(t)[:, None] * (end - 255.0)).astype(np.int64)  # [T, 3]
    return [f"rgb({r}, {g}, {b})" for r, g, b in rgb.tolist()]


def sigmoid(logits) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def token_colours(logits) -> list[str]:
    """The colour of each token logit: `score_colours` of sigmoid(logit)."""
    return score_colours(sigmoid(logits))


def token_texts(tokenizer, ids) -> list[str]:
    """Each token's own text. Decoded one at a time, so a character that the tokenizer splits
    over several byte tokens shows as U+FFFD pieces, and no whitespace cleanup merges tokens."""
    ids = np.asarray(ids, np.int64)
    vocab = len(tokenizer)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(
            f"token id {int(ids.max())} is outside the tokenizer's vocabulary of {vocab}: the "
            "store was not tokenized with this model's tokenizer"
        )
    return tokenizer.batch_decode([[i] for i in ids.tolist()], clean_up_tokenization_spaces=False)


def select_rows(store, *, records: int | None = None, ids: Sequence[str] | None = None):
    """[R] store rows to show: the records with `ids` (in that order), or the first `records`
    (all for None)."""
    if ids:
        index = {rid: i for i, rid in enumerate(store.ids)}
        missing = [rid for rid in ids if rid not in index]
        if missing:
            some = ", ".join(repr(x) for x in list(index)[:5])
            raise ValueError(
                f"record id(s) {missing} not in store {store.url} ({store.n_records} records, "
                f"e.g. {some})"
            )
        return np.array([index[rid] for rid in ids], np.int64)
    n = store.n_records if records is None else min(int(records), store.n_records)
    if n < 1:
        raise ValueError(f"--records must be >= 1 (or 0 for all), got {records}")
    return np.arange(n, dtype=np.int64)


def _runs(texts, logits, weights, roles, read) -> list[dict]:
    """One record's tokens grouped into runs of one role (the page marks each run)."""
    from mup.text import ROLE_NAMES

    colours = token_colours(logits)
    top = float(weights.max()) if weights is not None and weights.size else 0.0
    runs: list[dict] = []
    for i, text in enumerate(texts):
        role = ROLE_NAMES[int(roles[i])] if int(roles[i]) < len(ROLE_NAMES) else "template"
        if not runs or runs[-1]["role"] != role:
            runs.append({"role": role, "tokens": []})
        token = {
            "text": text,
            "s": float(logits[i]),
            "colour": colours[i],
            "read": bool(read[i]),
            "a": None if weights is None else float(weights[i]),
            # The underline's darkness: relative to the record's largest weight, which a
            # long record's raw weights (summing to 1) would leave near invisible.
            "a_rel": float(weights[i]) / top if weights is not None and top > 0 else 0.0,
        }
        runs[-1]["tokens"].append(token)
    return runs


def view_html(probe, store, *, rows, tokenizer, title: str, subtitle: str = "") -> str:
    """The page for store `rows` [R] of `store`, scored by `probe`."""
    import jinja2

    from mup.probes import Activations
    from mup.store import token_indices

    rows = np.asarray(rows, np.int64)
    acts = Activations.from_store(store, probe.layers, rows=rows, combine=probe.combine)
    probs = probe.predict(acts)  # [R]
    logits, offsets = probe.token_scores(acts)  # [T'], [R+1]
    weights = probe.attention_weights(acts)[0] if probe.kind == "attention" else None  # [T']
    tok = token_indices(store.offsets, rows)  # [T'] store tokens of the rows
    texts = token_texts(tokenizer, np.asarray(store.input_ids)[tok])
    roles = np.asarray(store.roles)[tok]
    read = np.ones(tok.size, bool) if store.mask is None else np.asarray(store.mask, bool)[tok]
    labels = np.full(rows.size, -1) if store.labels is None else np.asarray(store.labels)[rows]
    ids = store.ids
    records = []
    for j, r in enumerate(rows.tolist()):
        a, b = int(offsets[j]), int(offsets[j + 1])
        label, score = int(labels[j]), float(probs[j])
        predicted = int(score >= THRESHOLD)
        records.append(
            {
                "id": ids[r],
                "label": label,
                "label_name": LABEL_NAMES.get(label, str(label)),
                "score": score,
                "colour": score_colours([score])[0],
                "misclassified": label in (0, 1) and predicted != label,
                "n_tokens": b - a,
                "runs": _runs(
                    texts[a:b],
                    logits[a:b],
                    None if weights is None else weights[a:b],
                    roles[a:b],
                    read[a:b],
                ),
            }
        )
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mup.experiments", "templates"),
        autoescape=True,  # token text is untrusted: every {{ }} is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("view.html.j2").render(
        title=title,
        subtitle=subtitle,
        records=records,
        attention=weights is not None,
        threshold=THRESHOLD,
        n_misclassified=sum(r["misclassified"] for r in records),
        legend=score_colours(np.linspace(0.0, 1.0, 11)),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewConfig:
    """One `mup probes view` run: a probe and either a store or a data set to extract."""

    probe: str
    out: str = "view.html"
    store: str | None = None  # an existing activation store
    dataset: str | None = None  # or a data set (name or file), extracted as the probe reads
    data: str | None = None
    store_dir: str = DEFAULT_STORE_DIR
    records: int | None = 100  # first N records (None: all)
    ids: tuple[str, ...] | None = None  # or these record ids, in this order
    limit: int | None = None  # records extracted from --dataset
    model: str | None = None  # override the probe's recorded model (and tokenizer)
    max_tokens: int | None | str = FROM_PROBE
    progress: bool = True


def run_view(config: ViewConfig) -> dict:
    """Write the page; returns {path, n_records, store}."""
    from mup import probes
    from mup import store as store_mod
    from mup.text import load_tokenizer

    if (config.store is None) == (config.dataset is None):
        raise ValueError("pass exactly one of --store and --dataset")
    probe = probes.load(config.probe)
    source = str(config.probe)
    if config.store is not None:
        store = store_mod.open(config.store)
        # A probe without a recorded model can still be viewed on a store that names one.
        model = config.model or probe.metadata.get("model") or store.attrs.get("model")
        reads = probe_input(probe, source=source, model=model, max_tokens=None)
        if not config.model and probe.metadata.get("model_revision"):
            reads = dataclasses.replace(reads, model_revision=probe.metadata["model_revision"])
        name = Path(str(store.attrs.get("dataset") or config.store)).stem
    else:
        reads = probe_input(probe, source=source, model=config.model, max_tokens=config.max_tokens)
        ((name, path),) = locate_datasets([config.dataset], config.data)
        (store,) = extract_for(
            reads, [path], store_dir=config.store_dir, limit=config.limit, progress=config.progress
        )
    check_store(reads, store, source=source)
    rows = select_rows(store, records=config.records, ids=config.ids)
    tokenizer = load_tokenizer(reads.model)
    monitor = monitor_name(probe)
    html = view_html(
        probe,
        store,
        rows=rows,
        tokenizer=tokenizer,
        title=f"{monitor} on {name}",
        subtitle=(
            f"model {reads.model} · site {reads.site} · mask {reads.mask_mode} · "
            f"{rows.size} of {store.n_records} records · store {store.url}"
        ),
    )
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)  # a page that is there is a whole page
    return {"path": str(out), "n_records": int(rows.size), "store": store.url}
