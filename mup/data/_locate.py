"""Find a named data set on this machine, on the Hugging Face hub, or in the package.

Sources, first match wins, each lookup logs the one it used:
  1. ``explicit``: a file (used as is) or a data root directory;
  2. the data root in ``$MUP_DATA``;
  3. ``../shared/data`` relative to the current directory, then to the repository checkout;
  4. the published sets on the hub (dataset repo ``Arrrlex/models-under-pressure``);
  5. for stakes sets only, the small set bundled in the package (``stakes_mini.jsonl``), with a
     warning, so that the demo runs on a machine that has nothing else.

A data root is laid out like ``shared/data``: ``mup/training/...``, ``mup/evals/dev/...``,
``benchmarks/...``. A root that is the ``mup`` folder itself is accepted for stakes sets.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_REPO = "Arrrlex/models-under-pressure"
BUNDLED = "stakes_mini.jsonl"

# name -> path under a data root
_RELATIVE: dict[str, str] = {
    "training": "mup/training/synthetic_2025-03-25.jsonl",
    "dev/anthropic": "mup/evals/dev/anthropic_balanced.jsonl",
    "dev/mt": "mup/evals/dev/mt_balanced.jsonl",
    "dev/mts": "mup/evals/dev/mts_balanced.jsonl",
    "dev/toolace": "mup/evals/dev/toolace_balanced.jsonl",
    "benchmarks/gsm8k": "benchmarks/gsm8k_test.jsonl",
    "benchmarks/xstest": "benchmarks/xstest_prompts.csv",
}
# name -> glob over lower-cased file paths of the hub repo. The hub holds later versions of
# the same sets under names we cannot list from here, hence patterns rather than paths.
_HUB_GLOBS: dict[str, tuple[str, ...]] = {
    "training": ("*train*.jsonl", "*train*.csv"),
    "dev/anthropic": ("*anthropic*dev*.jsonl", "*dev*anthropic*.jsonl"),
    "dev/mt": ("*dev*/mt_*.jsonl", "*mt_*dev*.jsonl"),
    "dev/mts": ("*dev*/mts_*.jsonl", "*mts_*dev*.jsonl"),
    "dev/toolace": ("*toolace*dev*.jsonl", "*dev*toolace*.jsonl"),
}
_STAKES = frozenset(_HUB_GLOBS)
# The source checkout this module sits in (site-packages' parent when installed from a wheel,
# where ../shared/data simply does not exist).
_CHECKOUT = Path(__file__).resolve().parents[2]


def dataset_names() -> tuple[str, ...]:
    """Every name `find_dataset` accepts."""
    return (*_RELATIVE, "mini")


def bundled_path() -> Path:
    """The small stakes set shipped inside the package (80 records, balanced)."""
    resource = resources.files("mup.data") / "bundled" / BUNDLED
    with resources.as_file(resource) as path:  # a real file for wheels installed unzipped
        return Path(path)


def find_dataset(
    name: str, explicit: str | os.PathLike | None = None, *, allow_hub: bool = True
) -> Path:
    """The local path of data set `name` (see `dataset_names`), searched as the module says."""
    if name not in _RELATIVE and name != "mini":
        raise ValueError(f"unknown data set {name!r}; known names: {', '.join(dataset_names())}")
    tried: list[str] = []

    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file():
            logger.info("data set %r: using the explicit file %s", name, path)
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"data set {name!r}: the explicit path {path} does not exist")
        found = _in_root(name, path)
        if found is None:
            raise FileNotFoundError(
                f"data set {name!r}: the explicit data root {path} has no {_RELATIVE.get(name)}"
            )
        logger.info("data set %r: using %s (explicit data root)", name, found)
        return found

    if name == "mini":
        logger.info("data set 'mini': using the bundled %s", BUNDLED)
        return bundled_path()

    roots: list[tuple[str, Path]] = []
    if os.environ.get("MUP_DATA"):
        roots.append(("$MUP_DATA", Path(os.environ["MUP_DATA"]).expanduser()))
    roots.append(("../shared/data from the current directory", Path.cwd() / "../shared/data"))
    roots.append(("../shared/data from the repository checkout", _CHECKOUT / "../shared/data"))
    for label, root in roots:
        found = _in_root(name, root)
        if found is not None:
            logger.info("data set %r: using %s (%s)", name, found.resolve(), label)
            return found
        tried.append(f"{root / _RELATIVE[name]} ({label})")

    if allow_hub and name in _HUB_GLOBS:
        try:
            found = _from_hub(name)
        except (OSError, LookupError) as error:
            tried.append(f"hub dataset {HUB_REPO} ({error})")
        else:
            logger.info("data set %r: using %s (downloaded from hub %s)", name, found, HUB_REPO)
            return found

    if name in _STAKES:
        logger.warning(
            "data set %r was not found (%s); using the small bundled set %s instead",
            name,
            "; ".join(tried),
            BUNDLED,
        )
        return bundled_path()
    raise FileNotFoundError(
        f"data set {name!r} not found; tried: {'; '.join(tried)}. Set $MUP_DATA to a directory "
        "laid out like shared/data, or pass the file explicitly."
    )


def _in_root(name: str, root: Path) -> Path | None:
    if name == "mini":
        return None
    relative = _RELATIVE[name]
    candidates = [root / relative]
    if relative.startswith("mup/"):
        candidates.append(root / relative.removeprefix("mup/"))
    return next((path for path in candidates if path.is_file()), None)


def _from_hub(name: str) -> Path:
    """Download the one file of the hub repo that matches `name`'s patterns."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = HfApi().list_repo_files(HUB_REPO, repo_type="dataset")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise OSError(f"cannot list the hub repo: {error}") from error
    matches = sorted(
        {f for f in files for pattern in _HUB_GLOBS[name] if fnmatch.fnmatch(f.lower(), pattern)}
    )
    if len(matches) != 1:
        raise LookupError(
            f"{len(matches)} files of the hub repo match {_HUB_GLOBS[name]} "
            f"({matches or files[:20]}); download one and pass it explicitly"
        )
    try:
        return Path(hf_hub_download(HUB_REPO, matches[0], repo_type="dataset"))
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise OSError(f"cannot download {matches[0]}: {error}") from error
