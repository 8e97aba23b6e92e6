"""JSON-lines files of objects (score files, deployments, benchmark sets): one JSON object per
non-blank line, every problem named by its file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator


def jsonl_objects(
    path: str | os.PathLike, error: type[Exception] = ValueError
) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for each non-blank line of a jsonl file; `error` (ValueError by
    default) names the first line that is not valid JSON or not an object."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as problem:
                raise error(f"{where}: not valid JSON ({problem.msg})") from None
            if not isinstance(item, dict):
                raise error(f"{where}: expected a JSON object, got {type(item).__name__}")
            yield where, item
