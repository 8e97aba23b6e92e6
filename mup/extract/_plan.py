"""Planning an extraction: tokenize every data set and decide, per store, what is left to do.

Axis letters: N records, T tokens, D model width.

Every data set is tokenized before any model weight is read, so the ragged layout, the content
key (`mup.store.store_key`) and the state of each store are known, and every refusal (a foreign
directory, an incomplete store without --resume, changed settings) is one line up front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np

from mup import store
from mup._configs import list_configs, load_config
from mup._resolve import ResolvedSpec
from mup.data import Dataset, load_records
from mup.extract._config import ExtractConfig
from mup.extract._identity import slug
from mup.text import Encoded, encode_chats, token_mask

log = logging.getLogger("mup.extract")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One store to produce: a data set, its tokens, and where it goes."""

    dataset: Dataset
    encoded: Encoded
    mask: np.ndarray  # bool [T]
    url: str
    attrs: dict
    state: str  # "complete" | "new" | "resume" | "overwrite" | "recreate" (creation interrupted)


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
        store_name = f"{slug(Path(path).stem)}{split}-{config.site}-{key}"
        url = f"{config.out.rstrip('/')}/{slug(name)}/{store_name}"
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
