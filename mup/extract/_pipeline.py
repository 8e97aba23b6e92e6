"""The extraction pipeline: data sets -> tokens -> jitted capture -> activation stores.

Axis letters: N records, T tokens, B rows in a batch, P padded length, D model width.

Every data set is tokenized first (so the ragged layout, the content key and the plan are known
before any model weight is read), then the rows still to do are cut into windows in row order
(bounding the store writer's host buffers), each window into length-bucketed padded batches
(few XLA programs), and each batch runs one jitted forward that stops at the deepest requested
layer. The next batch is dispatched before the previous one is fetched, so the host-side
unpadding and shard writing overlap with the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from mup import native, store
from mup._configs import list_configs, load_config
from mup._resolve import ResolvedSpec, resolve_spec
from mup.data import Dataset, load_records
from mup.extract._config import ExtractConfig
from mup.text import Encoded, encode_chats, load_tokenizer, token_mask

log = logging.getLogger("mup.extract")

# Rows are processed in windows of about this many tokens, in row order: the store writer
# buffers only the shards a window touches, so host memory stays a few shards per layer.
WINDOW_SHARDS = 2
# Smallest padded length: shorter rows share one program.
MIN_BUCKET = 32
# Padded lengths grow by this factor (rounded to multiples of 8). Growth 2 pads a uniform length
# mix by ~33% on average, 1.5 by ~20%, for a few more programs (each ~2 s of CPU compile for
# SmolLM2-135M, while a batch of 8192 tokens computes for ~25 s of CPU).
BUCKET_GROWTH = 1.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One store to produce: a data set, its tokens, and where it goes."""

    dataset: Dataset
    encoded: Encoded
    mask: np.ndarray  # bool [T]
    url: str
    attrs: dict
    state: str  # "complete" | "new" | "resume" | "overwrite" | "recreate" (creation interrupted)


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


def default_layers(spec: str) -> tuple[int, ...]:
    """The `layer` of configs/models/<name>.yaml whose name or spec equals `spec`."""
    for name in list_configs("models"):
        entry = load_config("models", f"{name}.yaml")
        if spec in (entry.get("name"), entry.get("spec")):
            return (int(entry["layer"]),)
    raise ValueError(
        f"no default layer for model {spec!r} (configs/models/ knows "
        f"{', '.join(list_configs('models'))}); pass --layers (--layer for probe experiments)"
    )


def model_identity(resolved: ResolvedSpec) -> tuple[str, str]:
    """(name, revision) of a model; the revision pins the weights without hashing all of them.

    GGUF: sha256 of the file's size and its first and last MiB (the header holds every tensor's
    name, type and offset). Hub snapshots: the commit hash in the cache path. Local directories:
    sha256 of config.json plus each weight file's name, size and first MiB.
    """
    digest = hashlib.sha256()
    path = resolved.path
    if resolved.kind == "gguf":
        files = [path]
    else:
        parts = path.resolve().parts
        if len(parts) >= 2 and parts[-2] == "snapshots":
            return resolved.name, parts[-1]
        files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return resolved.name, digest.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def read_model_config(resolved: ResolvedSpec, revision: str) -> dict:
    """The model's HF config dict; for GGUF files through a small on-disk cache.

    Parsing a GGUF header (gguf.GGUFReader walks the whole vocabulary in Python) costs ~5 s of
    CPU for SmolLM2-135M, and a no-op re-run should not pay it. The cache key is the file's
    `model_identity` revision; the dict is tiny JSON.
    """
    from mup.models import read_hf_config

    if resolved.kind != "gguf":
        return read_hf_config(resolved)
    from mup.text import tokenizer_cache_dir

    cached = (
        tokenizer_cache_dir().parent / "model-configs" / f"{_slug(resolved.name)}-{revision}.json"
    )
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass  # absent or damaged: parse the file and (re)write the cache
    hf_config = read_hf_config(resolved)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(json.dumps(hf_config))
        staging.replace(cached)  # atomic: concurrent processes never read half a file
    except (OSError, TypeError) as error:
        log.warning("could not cache the config of %s in %s: %s", resolved.path, cached, error)
    return hf_config


def plan_jobs(
    config: ExtractConfig, tokenizer, resolved: ResolvedSpec, identity: tuple[str, str]
) -> list[Job]:
    """Load and tokenize every data set and decide, per store, what is left to do."""
    layers = tuple(sorted(config.layers))
    name, revision = identity
    jobs = []
    for path in config.datasets:
        dataset = load_records(path)
        if config.split is not None:
            dataset = dataset.split(config.split)
        if config.limit is not None:
            dataset = Dataset(dataset[: config.limit], path=dataset.path, sha256=dataset.sha256)
        if not len(dataset):
            raise ValueError(f"{path}: no records to extract")
        encoded = encode_chats(tokenizer, dataset, max_tokens=config.max_tokens, truncate="left")
        if encoded.n_truncated:
            log.warning(
                "%s: %d of %d conversations truncated to their last %d tokens",
                path,
                encoded.n_truncated,
                len(dataset),
                config.max_tokens,
            )
        mask = token_mask(encoded.roles, encoded.offsets, config.mask_mode)
        # The selection (split, limit) is part of the content, so it is part of the key.
        selection = hashlib.sha256(
            f"{dataset.sha256}:{config.split}:{config.limit}".encode()
        ).hexdigest()
        key = store.store_key(
            dataset_sha256=selection,
            model=f"{name}@{revision}",
            site=config.site,
            layers=layers,
            mask_mode=config.mask_mode,
            max_tokens=config.max_tokens,
            dtype=config.dtype,
            compute_dtype=config.model_dtype,
        )
        split = f"-{config.split}" if config.split else ""
        store_name = f"{_slug(Path(path).stem)}{split}-{config.site}-{key}"
        url = f"{config.out.rstrip('/')}/{_slug(name)}/{store_name}"
        attrs = {
            "model": resolved.spec,
            "model_revision": revision,
            "dataset": str(Path(path).resolve()),
            "dataset_sha256": dataset.sha256,
            "split": config.split,
            "limit": config.limit,
            "site": config.site,
            "mask_mode": config.mask_mode,
            "tokenizer": getattr(tokenizer, "name_or_path", "") or resolved.name,
            "max_tokens": config.max_tokens,
            "n_truncated": encoded.n_truncated,
            "key": key,
            # Not in the key (float32 rounding only), but a resumed run must reuse them: they
            # fix every batch's padded shape, so the resumed rows match the uninterrupted run.
            "model_dtype": config.model_dtype,
            "batch_tokens": config.batch_tokens,
        }
        jobs.append(
            Job(
                dataset=dataset,
                encoded=encoded,
                mask=mask,
                url=url,
                attrs=attrs,
                state=_store_state(url, config),
            )
        )
    return jobs


def _store_state(url: str, config: ExtractConfig) -> str:
    """What to do with the store at `url`; every refusal is one line, before any model loads."""
    found = store.inspect(url)
    if found.kind == "foreign":
        raise store.StoreError(
            f"{url} {found.detail}; mup deletes only its own stores, even with --overwrite: "
            "remove it or choose another --out"
        )
    if found.kind == "empty":
        return "new"
    if config.overwrite:
        return "overwrite"
    if found.kind == "unfinished":
        if found.recreatable:
            return "recreate"  # an interrupted creation: nothing of value to keep
        raise store.StoreError(f"{url}: {found.detail}; use --overwrite")
    existing = store.open(url, require_complete=False)
    if existing.complete:
        return "complete"
    if not config.resume:
        raise store.StoreError(
            f"an incomplete store exists at {url} (an interrupted run?); pass --resume to "
            "continue it or --overwrite to start again"
        )
    settings = {"batch_tokens": config.batch_tokens, "model_dtype": config.model_dtype}
    changed = [
        f"{name} {existing.attrs[name]!r} -> {value!r}"
        for name, value in settings.items()
        if name in existing.attrs and existing.attrs[name] != value
    ]
    if changed:
        raise store.StoreError(
            f"cannot resume {url}: it was started with different settings ({'; '.join(changed)}); "
            "resume with the original ones, or pass --overwrite to start again"
        )
    return "resume"


def describe_plan(jobs: list[Job], config: ExtractConfig, d_model: int, out=None) -> None:
    itemsize = np.dtype("float32" if config.dtype == "float32" else "float16").itemsize
    n_layers = len(config.layers)
    print(
        f"mup.extract: model {config.model}, layers {list(config.layers)} ({config.site}), "
        f"storage {config.dtype}, mask {config.mask_mode}, max tokens {config.max_tokens}",
        file=out,
    )
    for job in jobs:
        tokens = int(job.encoded.offsets[-1])
        size = tokens * d_model * itemsize * n_layers
        print(
            f"  {job.dataset.path.name}: {len(job.dataset)} records, {tokens} tokens, "
            f"~{size / 2**20:.1f} MiB uncompressed -> {job.url} [{job.state}]",
            file=out,
        )


def _row_bucket(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k and 3 * 2^(k-1)) that is >= n."""
    power = 1
    while power * 2 < n:
        power *= 2
    # n lies in (power, 2 * power]; at most a third of the rounded batch is padding rows.
    if n <= power:
        return power
    return power * 3 // 2 if power >= 2 and n <= power * 3 // 2 else power * 2


class _Batcher:
    """Padded batches from ragged token ids: B rows x P tokens from two small sets of sizes.

    P comes from geometric length buckets; B is the batch's row count rounded up to the next
    of m * (1, 2, 3, 4, 6, 8, 12, ...) (m = the mesh's data-parallel width), capped at the
    full batch `rows_for(P)`. Rounding a part-filled batch up to the full one instead computed
    up to 8192 padded tokens for a handful of rows (4x the real tokens on the mini set).
    """

    def __init__(self, batch_tokens: int, max_len: int, row_multiple: int):
        self.buckets = native.length_buckets(
            max(max_len, 1), min_len=MIN_BUCKET, growth=BUCKET_GROWTH
        )
        self.batch_tokens = batch_tokens
        self.row_multiple = row_multiple

    def rows_for(self, padded_len: int) -> int:
        """Rows of a full batch of padded length P (a multiple of the data-parallel width)."""
        rows = max(1, self.batch_tokens // padded_len)
        return -(-rows // self.row_multiple) * self.row_multiple

    def padded_rows(self, n_rows: int, padded_len: int) -> int:
        """B for a batch of `n_rows` real rows: the next row bucket, at most the full batch."""
        full = self.rows_for(padded_len)
        units = -(-n_rows // self.row_multiple)  # rows in units of the data-parallel width
        return min(_row_bucket(units) * self.row_multiple, full)

    def plan(self, lengths: np.ndarray) -> list[native.Batch]:
        return native.plan_batches(lengths, token_budget=self.batch_tokens, buckets=self.buckets)


class _Capture:
    """The jitted capture program: tokens [B, P] -> {layer: [B, P, D]} in the storage dtype."""

    def __init__(
        self, model_config, params, layers: tuple[int, ...], site: str, storage_dtype: str, mesh
    ):
        import jax
        import jax.numpy as jnp

        from mup.models import batch_sharding, forward

        dtype = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}[
            storage_dtype
        ]
        config = model_config

        def capture(params, tokens, valid):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            out = forward(
                params,
                tokens,
                positions,
                config=config,
                valid=valid,
                capture=layers,
                site=site,
                logits=False,
            )
            # Cast on the device: half the bytes to move for float16 storage.
            return {layer: out.hidden[layer].astype(dtype) for layer in layers}

        self._fn = jax.jit(capture)
        self._params = params
        self._sharding = None if mesh is None else batch_sharding(mesh)
        self._jax = jax

    def __call__(self, tokens: np.ndarray, valid: np.ndarray):
        if self._sharding is not None:
            tokens = self._jax.device_put(tokens, self._sharding)
            valid = self._jax.device_put(valid, self._sharding)
        return self._fn(self._params, tokens, valid)  # dispatched asynchronously


def _windows(rows: np.ndarray, lengths: np.ndarray, window_tokens: int) -> list[np.ndarray]:
    """Cut `rows` (in order) into consecutive groups of about `window_tokens` tokens."""
    if not rows.size:
        return []
    cumulative = np.cumsum(lengths[rows])  # [R]
    cuts = np.searchsorted(cumulative, np.arange(window_tokens, cumulative[-1], window_tokens))
    return [part for part in np.split(rows, np.unique(cuts)) if part.size]


def run_job(
    job: Job, writer, capture: _Capture, config: ExtractConfig, row_multiple: int, progress
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
    batcher = _Batcher(config.batch_tokens, int(lengths.max()), row_multiple)
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
            for batch in batcher.plan(lengths[pool]):
                if (
                    last
                    or batch.rows.size >= batcher.rows_for(batch.padded_len)
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
        n_rows = batcher.padded_rows(rows.size, padded_len)
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

    from mup.models import ModelConfig, load_params

    identity = model_identity(resolved)
    model_config = ModelConfig.from_hf_config(read_model_config(resolved, identity[1]))
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
    capture = _Capture(
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
