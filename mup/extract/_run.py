"""The extraction run: data sets -> tokens -> jitted capture -> activation stores.

Axis letters: N records, T tokens, R rows, B rows in a batch, P padded length, D model width.

`run` plans every store first (`mup.extract._plan`), then per store cuts the rows still to do
into windows in row order (bounding the store writer's host buffers), each window into
length-bucketed padded batches (`mup.extract._capture`). The next batch is dispatched before the
previous one is fetched, so the host-side unpadding and shard writing overlap with the device.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from mup import native, store
from mup._resolve import resolve_spec
from mup.extract._capture import BatchPlanner, Capture
from mup.extract._config import ExtractConfig
from mup.extract._identity import model_identity, read_model_config
from mup.extract._plan import Job, default_layers, describe_plan, plan_jobs
from mup.text import load_tokenizer

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
    job: Job, writer, capture: Capture, config: ExtractConfig, row_multiple: int, progress
) -> tuple[int, int]:
    """Extract every row the store still lacks; returns (tokens run, bytes handed over)."""
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
    tokens_done = bytes_done = 0
    in_flight = None  # (rows, hidden) of the batch dispatched last

    def drain(item):
        rows, hidden = item
        n_real = rows.size
        keep = np.flatnonzero(pending[rows])  # [R'] batch slots whose rows are still to write
        rows = rows[keep]
        lens = lengths[rows]  # [R']
        local = np.zeros(rows.size + 1, np.int64)  # [R'+1]
        np.cumsum(lens, out=local[1:])
        acts = {}
        for layer in layers:
            block = np.asarray(hidden[layer])  # [B, P, D]
            # Usually every slot is kept: a slice, not a copy.
            block = block[: keep.size] if keep.size == n_real else block[keep]  # [R', P, D]
            flat = np.empty((int(local[-1]), block.shape[-1]), block.dtype)  # [sum lens, D]
            native.scatter_padded(block, local, np.arange(rows.size), flat)
            acts[layer] = flat
        writer.write(rows, acts)
        progress.update(int(local[-1]))
        return int(local[-1]), sum(a.nbytes for a in acts.values())

    def batches():
        """(rows, padded_len) per batch. A part-filled batch made only of the current window's
        rows waits for the next window's rows of the same bucket (carried once, so the writer
        holds at most two windows' shards); only the final batches can be part-filled."""
        carry = np.zeros(0, np.int64)
        windows = _windows(todo, lengths, window_tokens)
        for w, window in enumerate(windows):
            pool = np.concatenate([carry, window])
            last = w == len(windows) - 1
            carry_parts = []
            for batch in planner.plan(lengths[pool]):
                if (
                    last
                    or batch.rows.size >= planner.rows_for(batch.padded_len)
                    or (
                        batch.rows.min() < carry.size  # holds carried rows: they go now
                    )
                ):
                    yield pool[batch.rows], batch.padded_len
                else:
                    carry_parts.append(pool[batch.rows])
            carry = np.sort(np.concatenate([np.zeros(0, np.int64), *carry_parts]))

    for rows, padded_len in batches():
        if not pending[rows].any():
            continue
        n_rows = planner.padded_rows(rows.size, padded_len)
        tokens = np.zeros((n_rows, padded_len), np.int32)  # [B, P]
        valid = np.zeros((n_rows, padded_len), bool)  # [B, P]
        for i, row in enumerate(rows):
            start, end = enc.offsets[row], enc.offsets[row + 1]
            tokens[i, : end - start] = enc.input_ids[start:end]
            valid[i, : end - start] = True
        hidden = capture(tokens, valid)
        if in_flight is not None:
            t, b = drain(in_flight)
            tokens_done, bytes_done = tokens_done + t, bytes_done + b
        in_flight = (rows, hidden)
    if in_flight is not None:
        t, b = drain(in_flight)
        tokens_done, bytes_done = tokens_done + t, bytes_done + b
    return tokens_done, bytes_done


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
    started = time.perf_counter()
    tokens = nbytes = records = 0
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
            t, b = run_job(job, writer, capture, config, topology.row_multiple(mesh), progress)
        tokens, nbytes, records = tokens + t, nbytes + b, records + remaining.size
        topology.finalize(writer)
    seconds = time.perf_counter() - started
    summary = Summary(
        stores=tuple(j.url for j in jobs),
        records=records,
        tokens=tokens,
        seconds=seconds,
        bytes_written=nbytes,
    )
    if topology.is_main:
        print(
            f"mup.extract: {summary.records} records, {summary.tokens} tokens in "
            f"{summary.seconds:.1f} s ({summary.tokens_per_second:.0f} tokens/s), "
            f"{summary.bytes_written / 2**20:.1f} MiB of activations written",
            file=out,
        )
    return summary
