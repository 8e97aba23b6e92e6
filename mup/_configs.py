"""Locate and read the YAML configs under configs/ (models, probes, benchmark suites).

In a checkout they live at the repository's top level; in an installed wheel CMake copies
them to mup/configs. Both layouts are looked up, the installed one first.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

_PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def config_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no configs directory found next to {_PACKAGE_DIR}; the installation is incomplete"
    )


def config_path(*parts: str) -> Path:
    """Path of a config file, e.g. ``config_path("probes", "attention.yaml")``."""
    path = config_dir().joinpath(*parts)
    if not path.is_file():
        available = (
            sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        )
        raise FileNotFoundError(
            f"config {'/'.join(parts)} not found in {config_dir()}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return path


def load_config(*parts: str) -> dict[str, Any]:
    """Read one YAML config as a dict; a file whose top level is not a mapping is an error."""
    path = config_path(*parts)
    with path.open() as file:
        data = yaml.safe_load(file)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def list_configs(group: str) -> list[str]:
    """Names (without .yaml) of the configs in one group, e.g. ``list_configs("models")``."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
