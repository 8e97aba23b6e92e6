"""Find a named data set on this machine, on the Hugging Face hub, or in the package.

Sources, first match wins, each lookup logs the one it used:
  1. ``explicit``: a file (used as is) or a data root directory;
  2. the data root in ``$MUP_DATA``;
  3. ``../shared/data`` relative to the current directory, then to the repository checkout;
  4. the published sets on the hub (dataset repo ``Arrrlex/models-under-pressure``), downloaded
     by their real paths into the ``huggingface_hub`` cache (``$HF_HOME``; ``HF_HUB_OFFLINE``
     and ``HF_TOKEN`` are honoured). Any failure to reach the hub is one logged line;
  5. for stakes sets only, the small set bundled in the package (``stakes_mini.jsonl``), with a
     warning, so that the demo runs on a machine that has nothing else.

A data root is laid out like ``shared/data``: ``mup/training/...``, ``mup/evals/dev/...``,
``benchmarks/...``. A root that is the ``mup`` folder itself is accepted for stakes sets.
`download` fills such a root from the hub (``mup data download``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_REPO = "Arrrlex/models-under-pressure"
BUNDLED = "stakes_mini.jsonl"
# Seconds to wait for the hub's first answer: an unreachable hub must cost a user seconds,
# not the minutes of huggingface_hub's defaults with retries.
HUB_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one named data set lives.

    local: paths under a data root, first existing wins; the last is where `download` writes.
    hub: files of the hub repo that make the set. Two files (a train and a test split) are
      joined into one file whose records carry a ``split`` field, as the local training set does.
    """

    local: tuple[str, ...]
    hub: tuple[str, ...] = ()

    @property
    def stakes(self) -> bool:
        return self.local[0].startswith("mup/")


def _eval(split: str, hub_name: str, *local_names: str) -> Source:
    folder = "validation" if split == "dev" else "test"
    names = (*local_names, f"{hub_name}.jsonl")
    return Source(
        local=tuple(f"mup/evals/{split}/{name}" for name in names),
        hub=(f"{hub_name}/{folder}.jsonl",),
    )


# The hub paths are the published repository's own (its README and the upstream code's
# hub-to-local table); the local names of the dev sets are those of shared/data.
SOURCES: dict[str, Source] = {
    "training": Source(
        local=("mup/training/synthetic_2025-03-25.jsonl", "mup/training/prompts_4x.jsonl"),
        hub=("training/train.jsonl", "training/test.jsonl"),
    ),
    "dev/anthropic": _eval("dev", "anthropic_hh_balanced", "anthropic_balanced.jsonl"),
    "dev/mt": _eval("dev", "mt_balanced", "mt_balanced.jsonl"),
    "dev/mts": _eval("dev", "mts_balanced", "mts_balanced.jsonl"),
    "dev/toolace": _eval("dev", "toolace_balanced", "toolace_balanced.jsonl"),
    "dev/anthropic_raw": _eval("dev", "anthropic_hh_raw"),
    "dev/mt_raw": _eval("dev", "mt_raw"),
    "dev/mts_raw": _eval("dev", "mts_raw"),
    "dev/toolace_raw": _eval("dev", "toolace_raw"),
    "test/anthropic": _eval("test", "anthropic_hh_balanced"),
    "test/mt": _eval("test", "mt_balanced"),
    "test/mts": _eval("test", "mts_balanced"),
    "test/toolace": _eval("test", "toolace_balanced"),
    "test/mental_health": _eval("test", "mental_health_balanced"),
    "test/aya_redteaming": _eval("test", "aya_redteaming_balanced"),
    "test/anthropic_raw": _eval("test", "anthropic_hh_raw"),
    "test/mt_raw": _eval("test", "mt_raw"),
    "test/mts_raw": _eval("test", "mts_raw"),
    "test/toolace_raw": _eval("test", "toolace_raw"),
    "test/mental_health_raw": _eval("test", "mental_health_raw"),
    "test/aya_redteaming_raw": _eval("test", "aya_redteaming_raw"),
    "benchmarks/gsm8k": Source(local=("benchmarks/gsm8k_test.jsonl",)),
    "benchmarks/xstest": Source(local=("benchmarks/xstest_prompts.csv",)),
    "benchmarks/humaneval": Source(local=("benchmarks/humaneval.jsonl",)),
}
# What `mup data download` fetches when no --sets are named: the training set and the
# balanced dev and test evaluation sets.
DEFAULT_DOWNLOADS = tuple(
    name for name, source in SOURCES.items() if source.hub and not name.endswith("_raw")
)
# The source checkout this module sits in (site-packages' parent when installed from a wheel,
# where ../shared/data simply does not exist).
_CHECKOUT = Path(__file__).resolve().parents[2]


class HubUnavailable(OSError):
    """The hub could not be reached or did not have the file; the message says which."""


def dataset_names() -> tuple[str, ...]:
    """Every name `find_dataset` accepts."""
    return (*SOURCES, "mini")


def evaluation_sets(spec: str) -> tuple[str, ...]:
    """The data sets an ``--eval`` argument names: ``dev`` (the four balanced dev sets),
    ``test`` (the six balanced test sets), or comma-separated names and file paths, mixed."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in ("dev", "test"):
            out += [n for n in SOURCES if n.startswith(f"{part}/") and not n.endswith("_raw")]
        elif part in SOURCES or part == "mini" or Path(part).expanduser().is_file():
            out.append(part)
        else:
            raise ValueError(
                f"unknown evaluation set {part!r}: expected dev, test, a data set name "
                f"({', '.join(dataset_names())}) or a .jsonl/.csv file"
            )
    if not out:
        raise ValueError(f"no evaluation set named in {spec!r}")
    return tuple(dict.fromkeys(out))


def bundled_path() -> Path:
    """The small stakes set shipped inside the package (80 records, balanced)."""
    resource = resources.files("mup.data") / "bundled" / BUNDLED
    with resources.as_file(resource) as path:  # a real file for wheels installed unzipped
        return Path(path)


def is_bundled(path: str | os.PathLike) -> bool:
    """Whether `path` is the small bundled set (the fallback when nothing else was found)."""
    return Path(path).resolve() == bundled_path().resolve()


def find_dataset(
    name: str, explicit: str | os.PathLike | None = None, *, allow_hub: bool = True
) -> Path:
    """The local path of data set `name` (see `dataset_names`), searched as the module says."""
    source = _source(name)
    tried: list[str] = []

    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            logger.info("data set %r: using the explicit file %s", name, path)
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"data set {name!r}: the explicit path {path} does not exist")
        found = _in_root(source, path) if source else None
        if found is None:
            wanted = " or ".join(source.local) if source else "a file"
            raise FileNotFoundError(
                f"data set {name!r}: the explicit data root {path} has no {wanted}"
            )
        logger.info("data set %r: using %s (explicit data root)", name, found)
        return found

    if source is None:  # "mini"
        logger.info("data set 'mini': using the bundled %s", BUNDLED)
        return bundled_path()

    for label, root in data_roots():
        found = _in_root(source, root)
        if found is not None:
            logger.info("data set %r: using %s (%s)", name, found.resolve(), label)
            return found
        tried.append(f"{root / source.local[0]} ({label})")

    hub_note = ""
    if allow_hub and source.hub:
        try:
            found = _from_hub(source)
        except HubUnavailable as error:
            tried.append(f"hub dataset {HUB_REPO}: {error}")
            hub_note = f" or on the hub ({error})"
        else:
            logger.info("data set %r: using %s (hub dataset %s)", name, found, HUB_REPO)
            return found

    if source.stakes:
        logger.info("data set %r: tried %s", name, "; ".join(tried))
        logger.warning(
            "data set %r not found locally%s; using the small bundled set %s "
            "(set $MUP_DATA or run `mup data download` for the real one)",
            name,
            hub_note,
            BUNDLED,
        )
        return bundled_path()
    raise FileNotFoundError(
        f"data set {name!r} not found; tried: {'; '.join(tried)}. Set $MUP_DATA to a directory "
        "laid out like shared/data, or pass the file explicitly."
    )


def download(dest: str | os.PathLike, names: tuple[str, ...] = DEFAULT_DOWNLOADS) -> list[Path]:
    """Fetch published sets from the hub into data root `dest` (laid out like shared/data).

    Files already in `dest` are kept. Returns the paths written or found, in `names` order.
    Raises HubUnavailable (with what was tried) when the hub cannot be reached.
    """
    root = Path(dest).expanduser()
    unknown = [n for n in names if n not in SOURCES or not SOURCES[n].hub]
    if unknown:
        published = ", ".join(n for n, s in SOURCES.items() if s.hub)
        raise ValueError(f"not a published set: {', '.join(unknown)}; published: {published}")
    paths = []
    for name in names:
        source = SOURCES[name]
        target = root / source.local[-1]
        if not target.is_file():
            _write_joined([_hub_file(f) for f in source.hub], target)
            logger.info("data set %r: downloaded to %s", name, target)
        paths.append(target)
    return paths


def _source(name: str) -> Source | None:
    if name == "mini":
        return None
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; known names: {', '.join(dataset_names())}")
    return SOURCES[name]


def data_roots() -> Iterator[tuple[str, Path]]:
    """The data roots searched in order, each with how it was found (for messages)."""
    if os.environ.get("MUP_DATA"):
        yield "$MUP_DATA", Path(os.environ["MUP_DATA"]).expanduser()
    yield "../shared/data from the current directory", Path.cwd() / "../shared/data"
    yield "../shared/data from the repository checkout", _CHECKOUT / "../shared/data"


def _in_root(source: Source, root: Path) -> Path | None:
    candidates = [root / relative for relative in source.local]
    if source.stakes:  # a root that is the mup folder itself
        candidates += [root / relative.removeprefix("mup/") for relative in source.local]
    return next((path for path in candidates if path.is_file()), None)


def _from_hub(source: Source) -> Path:
    files = [_hub_file(f) for f in source.hub]
    if len(files) == 1:
        return files[0]
    # A split set: join it once per hub revision (the snapshot folder's name) into the
    # cache, beside nothing the hub owns.
    revision = files[0].parents[len(Path(source.hub[0]).parts) - 1].name
    target = _cache_dir() / "hub" / revision / Path(source.local[-1]).name
    if not target.is_file():
        _write_joined(files, target)
    return target


def _hub_file(filename: str) -> Path:
    """One file of the hub repo, from huggingface_hub's cache or downloaded into it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    # Any exception: the client's HTTP library has changed between hub versions (requests,
    # httpx, httpx2), none of their errors derive from one base we could name, and every
    # failure here means the same thing to the caller: this source is unavailable.
    errors = Exception
    with _quiet_hub():
        if not constants.HF_HUB_OFFLINE:
            # One HEAD without retries first: hf_hub_download retries an unreachable hub for
            # most of a minute before it gives up (or falls back to its cache).
            url = hf_hub_url(HUB_REPO, filename, repo_type="dataset")
            try:
                get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
            except errors as error:
                try:  # an earlier download still serves
                    return Path(
                        hf_hub_download(
                            HUB_REPO, filename, repo_type="dataset", local_files_only=True
                        )
                    )
                except errors:
                    raise HubUnavailable(_reason(filename, error)) from None
        try:
            return Path(
                hf_hub_download(HUB_REPO, filename, repo_type="dataset", etag_timeout=HUB_TIMEOUT_S)
            )
        except errors as error:
            raise HubUnavailable(_reason(filename, error)) from None


def _reason(filename: str, error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{filename}: {type(error).__name__}" + (f": {text[:80]}" if text else "")


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's own retry warnings: the caller logs one line for the attempt."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _write_joined(files: list[Path], target: Path) -> None:
    """Copy `files` into `target`, atomically; a train/test pair gets a `split` field."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=target.parent, prefix=f".{target.name}.", delete=False, encoding="utf-8"
    ) as out:
        for path in files:
            split = path.stem if len(files) > 1 else None
            with open(path, encoding="utf-8") as lines:
                for line in lines:
                    if split is None:
                        out.write(line if line.endswith("\n") else line + "\n")
                    elif line.strip():
                        out.write(json.dumps({**json.loads(line), "split": split}) + "\n")
    os.replace(out.name, target)


def _cache_dir() -> Path:
    return Path(os.environ.get("MUP_CACHE_DIR") or Path.home() / ".cache" / "mup") / "data"
