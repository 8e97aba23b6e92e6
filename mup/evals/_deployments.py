"""The OpenAI route: steered deployments (one per multiplier) as inspect `openai/...` models.

deployments.jsonl has one JSON object a line, as in the reference harness:

    {"multiplier": -1.0, "url": "http://host:8000/v1", "api_key": "KEY", "model": "smollm2"}

The steering study's format is accepted too: `key` for `api_key`, the multiplier as a string
("-1.5"), and no `model` - the served model's name is then asked from the server
(GET /v1/models) when the run starts:

    {"multiplier": "-1.5", "url": "http://host:8000/v1", "key": "KEY"}

Each line becomes an inspect model over the OpenAI protocol with that base URL and key, and the
multiplier is sent in every request body as `steer_multiplier` (GenerateConfig.extra_body),
which `python -m mup.serve` honours per request - so all lines may name the same server.

The provider is inspect's `openai-api/mup/<model>` (generic OpenAI-compatible servers), not
`openai/<model>`: inspect's `openai` provider takes an unknown model name for a new OpenAI
reasoning model and then drops `temperature` from requests (a steered server would sample at
its default temperature 1 where the task asked for greedy decoding).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from mup.data import jsonl_objects

_REQUIRED = {"multiplier", "url"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deployment:
    multiplier: float
    url: str
    api_key: str
    model: str | None = None  # None: ask the server (`resolved`)

    def resolved(self) -> Deployment:
        """This deployment with its model name, asked from the server when the line had none."""
        if self.model is not None:
            return self
        from openai import OpenAI

        try:
            models = OpenAI(base_url=self.url, api_key=self.api_key, max_retries=1).models.list()
            names = [m.id for m in models.data]
        except Exception as error:
            raise ValueError(
                f"deployment {self.url} (multiplier {self.multiplier}) names no model and "
                f"GET {self.url}/models failed: {type(error).__name__}: {error}"
            ) from None
        if len(names) != 1:
            raise ValueError(
                f"deployment {self.url} names no model and the server serves {names}; "
                'add "model" to its line'
            )
        return dataclasses.replace(self, model=names[0])

    def model_string(self) -> str:
        if self.model is None:
            raise ValueError(f"deployment {self.url}: model unknown; call resolved() first")
        return f"openai-api/mup/{self.model}"

    def model_args(self) -> dict[str, Any]:
        """Arguments of `inspect_ai.model.get_model` for this deployment."""
        from inspect_ai.model import GenerateConfig

        return dict(
            base_url=self.url,
            api_key=self.api_key,
            config=GenerateConfig(extra_body={"steer_multiplier": self.multiplier}),
        )

    def inspect_model(self):
        from inspect_ai.model import get_model

        return get_model(self.model_string(), memoize=False, **self.model_args())


def read_deployments(path: str | Path) -> list[Deployment]:
    """Parse deployments.jsonl; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"deployments file {path} does not exist")
    out: list[Deployment] = []
    for where, item in jsonl_objects(path):
        if "key" in item:  # the steering study's name for the API key
            if "api_key" in item:
                raise ValueError(f"{where}: give 'api_key' or 'key', not both")
            item = {**item, "api_key": item.pop("key")}
        if missing := sorted((_REQUIRED | {"api_key"}) - set(item)):
            raise ValueError(
                f"{where}: missing fields {missing} (need multiplier, url, api_key or key)"
            )
        m = item["multiplier"]
        if isinstance(m, str):
            try:
                m = float(m.strip())
            except ValueError:
                raise ValueError(
                    f"{where}: 'multiplier' must be a finite number, got {item['multiplier']!r}"
                ) from None
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
            raise ValueError(f"{where}: 'multiplier' must be a finite number, got {m!r}")
        for field in ("url", "api_key", "model"):
            if field == "model" and item.get("model") is None:
                continue
            if not isinstance(item[field], str) or not item[field]:
                raise ValueError(f"{where}: '{field}' must be a non-empty string")
        if not item["url"].startswith(("http://", "https://")):
            raise ValueError(f"{where}: 'url' must start with http:// or https://")
        out.append(
            Deployment(
                multiplier=float(m),
                url=item["url"],
                api_key=item["api_key"],
                model=item.get("model"),
            )
        )
    if not out:
        raise ValueError(f"{path}: no deployments")
    seen: dict[float, int] = {}
    for d in out:
        seen[d.multiplier] = seen.get(d.multiplier, 0) + 1
    if dup := sorted(m for m, n in seen.items() if n > 1):
        raise ValueError(f"{path}: multipliers {dup} appear on more than one line")
    return out
