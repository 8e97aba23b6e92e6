"""The extraction run: data sets -> tokens -> jitted capture -> activation stores.

Axis letters: N records, T tokens, R rows, B rows in a batch, P padded length, D model width.

`run` plans every store first (`mup.extract._plan`), then per store cuts the rows into windows
in row order (bounding the store writer's host buffers), each window into batches of packed
rows, several records per row (`mup.extract._packing`), or with packing off of one record per
row padded to a length bucket (`mup.extract._capture`). The next batch is dispatched before the
previous one is fetched, so the host-side unpacking and shard writing overlap with the device.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import numpy as np

from mup import store
from mup._resolve import resolve_spec
from mup.extract._capture import BatchPlanner, Capture
from mup.extract._config import ExtractConfig
from mup.extract._identity import model_identity, read_model_config
from mup.extract._packing import (
    ROW_LENGTHS,
    ForwardCost,
    Packer,
    batch_inputs,
    choose_row_len,
    token_index,
)
from mup.extract._plan import Job, default_layers, describe_plan, plan_jobs
from mup.text import load_tokenizer

log = logging.getLogger("mup.extract")

# Rows are processed in windows of about this many tokens, in row order: the store writer
# buffers only the shards a window touches, so host memory stays a few shards per layer.
WINDOW_SHARDS = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    stores: tuple[str, ...]
    records: int
    tokens: int  # tokens run through the model in this call
    seconds: float
    bytes_written: int  # activation bytes handed to the stores (uncompressed)
    # Per batch run: (real tokens, tokens the forward computed, padding included).
    batch_fill: tuple[tuple[int, int], ...] = ()

    @property
    def real_fraction(self) -> float:
        """Real tokens over computed tokens, over every batch run."""
        computed = sum(c for _, c in self.batch_fill)
        return sum(r for r, _ in self.batch_fill) / computed if computed else 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _windows(rows: np.ndarray, lengths: np.ndarray, window_tokens: int) -> list[np.ndarray]:
    """Cut `rows` (in order) into consecutive groups of about `window_tokens` tokens."""
    if not rows.size:
        return []
    cumulative = np.cumsum(lengths[rows])  # [R]
    cuts = np.searchsorted(cumulative, np.arange(window_tokens, cumulative[-1], window_tokens))
    return [part for part in np.split(rows, np.unique(cuts)) if part.size]


def run_job(
    job: Job, writer, capture: Capture, config: ExtractConfig, row_multiple: int, progress, cost
) -> tuple[int, int, list[tuple[int, int]]]:
    """Extract every row the store still lacks; returns (tokens run, bytes handed over, per
    batch run (real tokens, computed tokens))."""
    layers = tuple(sorted(config.layers))
    enc = job.encoded
    lengths = np.diff(enc.offsets)  # [N]
    pending = np.zeros(lengths.size, bool)  # [N]
    pending[writer.pending_rows()] = True
    # The batch plan covers EVERY row, whatever is already done, so each row is always computed
    # in the same padded shape next to the same rows: a resumed run, or one host of many,
    # reproduces the uninterrupted single-process run bit for bit (XLA's float sums depend on
    # the program's shapes). Batches without a pending row are skipped.
    todo = np.arange(lengths.size)
    planner = BatchPlanner(config.batch_tokens, int(lengths.max()), row_multiple)
    window_tokens = max(WINDOW_SHARDS * writer.shard_tokens, config.batch_tokens)
    windows = _windows(todo, lengths, window_tokens)
    if config.packing == "auto":
        row_len = choose_row_len(planner, lengths, windows, cost, ROW_LENGTHS)
    else:
        row_len = None if config.packing == "off" else int(config.packing)
    log.info(
        "%s: %s",
        job.dataset.path.name,
        "one record per row" if row_len is None else f"packed rows of {row_len} tokens",
    )
    tokens_done = bytes_done = 0
    fills: list[tuple[int, int]] = []
    in_flight = None  # (batch, hidden) dispatched last

    def drain(item):
        batch, hidden = item
        keep = np.flatnonzero(pending[batch.records])  # [R'] records still to write
        rows = batch.records[keep]
        index = token_index(batch, lengths, keep)  # [sum of their lengths]
        acts = {}
        for layer in layers:
            block = np.asarray(hidden[layer])  # [B, P, D]
            acts[layer] = np.take(block.reshape(-1, block.shape[-1]), index, axis=0)
        writer.write(rows, acts)
        progress.update(index.size)
        return index.size, sum(a.nbytes for a in acts.values())

    for batch in Packer(planner, row_len).batches(lengths, windows):
        if not pending[batch.records].any():
            continue
        n_rows = planner.padded_rows(batch.n_rows, batch.row_len)
        tokens, valid, positions, segments = batch_inputs(batch, n_rows, enc.offsets, enc.input_ids)
        hidden = capture(tokens, valid, positions, segments)
        fills.append((int(lengths[batch.records].sum()), n_rows * batch.row_len))
        if in_flight is not None:
            t, b = drain(in_flight)
            tokens_done, bytes_done = tokens_done + t, bytes_done + b
        in_flight = (batch, hidden)
    if in_flight is not None:
        t, b = drain(in_flight)
        tokens_done, bytes_done = tokens_done + t, bytes_done + b
    return tokens_done, bytes_done, fills


def run(config: ExtractConfig, *, out=None) -> Summary:
    """Run an extraction job end to end (see the module docstring)."""
    from mup.extract._distributed import Topology

    topology = Topology.initialize(config)
    store.preflight(config.out)  # one clear line about S3 access before any model work
    resolved = resolve_spec(config.model)

    from mup.models import config_from_hf, load_params

    identity = model_identity(resolved)
    model_config = config_from_hf(read_model_config(resolved, identity[1]))
    if config.layers is None:
        config = dataclasses.replace(config, layers=default_layers(config.model))
    too_deep = [layer for layer in config.layers if layer > model_config.n_layers]
    if too_deep or (config.site == "normed" and max(config.layers) >= model_config.n_layers):
        raise ValueError(
            f"layers {list(config.layers)} out of range for {config.model}: it has "
            f"{model_config.n_layers} blocks, so residual layers are 0..{model_config.n_layers}"
            f" and normed layers 0..{model_config.n_layers - 1}"
        )
    tokenizer = load_tokenizer(resolved.path if resolved.kind == "dir" else resolved.spec)
    jobs = plan_jobs(config, tokenizer, resolved, identity)
    if topology.is_main:
        describe_plan(jobs, config, model_config.d_model, out=out)
    todo = [job for job in jobs if job.state != "complete"]
    if not todo:
        print("mup.extract: every store is complete; nothing to do", file=out)
        return Summary(
            stores=tuple(j.url for j in jobs), records=0, tokens=0, seconds=0.0, bytes_written=0
        )

    from tqdm import tqdm

    mesh = topology.mesh(config.model_parallel)
    params = load_params(resolved, model_config, dtype=config.model_dtype, mesh=mesh)
    capture = Capture(
        model_config, params, tuple(sorted(config.layers)), config.site, config.dtype, mesh
    )
    # logits=False: the capture forward runs the blocks below the deepest layer only.
    cost = ForwardCost.of(model_config, max(config.layers))
    started = time.perf_counter()
    tokens = nbytes = records = 0
    fills: list[tuple[int, int]] = []
    for job in todo:
        writer = topology.open_writer(job, config, model_config.d_model)
        remaining = writer.pending_rows()
        total = int(np.diff(job.encoded.offsets)[remaining].sum())
        with tqdm(
            total=total,
            unit="tok",
            unit_scale=True,
            desc=job.dataset.path.name,
            disable=not (config.progress and topology.is_main),
            file=sys.stderr,
        ) as progress:
            # Retries of failing shard writes (an unreachable S3 endpoint) show above the bar.
            writer.on_retry = lambda message: tqdm.write(f"mup.extract: {message}", sys.stderr)
            t, b, f = run_job(
                job, writer, capture, config, topology.row_multiple(mesh), progress, cost
            )
        tokens, nbytes, records = tokens + t, nbytes + b, records + remaining.size
        fills += f
        topology.finalize(writer)
    seconds = time.perf_counter() - started
    summary = Summary(
        stores=tuple(j.url for j in jobs),
        records=records,
        tokens=tokens,
        seconds=seconds,
        bytes_written=nbytes,
        batch_fill=tuple(fills),
    )
    if topology.is_main:
        print(
            f"mup.extract: {summary.records} records, {summary.tokens} tokens in "
            f"{summary.seconds:.1f} s ({summary.tokens_per_second:.0f} tokens/s, "
            f"{100 * summary.real_fraction:.1f}% of the computed tokens real), "
            f"{summary.bytes_written / 2**20:.1f} MiB of activations written",
            file=out,
        )
    return summary
