"""The OpenAI route: deployments.jsonl -> inspect `openai-api/mup/...` models, steer_multiplier."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mup.evals import RunConfig, read_deployments
from mup.evals._runner import _targets

LINES = [
    {"multiplier": -1.0, "url": "http://127.0.0.1:8001/v1", "api_key": "k1", "model": "smol"},
    {"multiplier": 0, "url": "http://127.0.0.1:8001/v1", "api_key": "k1", "model": "smol"},
    {"multiplier": 1.5, "url": "https://steer.example/v1", "api_key": "k2", "model": "smol-b"},
]


def _file(tmp_path, lines, extra=""):
    path = tmp_path / "deployments.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + extra)
    return path


def test_deployments_become_openai_models_with_extra_body(tmp_path):
    deployments = read_deployments(_file(tmp_path, LINES))
    assert [d.multiplier for d in deployments] == [-1.0, 0.0, 1.5]
    for d, line in zip(deployments, LINES, strict=True):
        args = d.model_args()
        assert d.model_string() == f"openai-api/mup/{line['model']}"
        assert args["base_url"] == line["url"] and args["api_key"] == line["api_key"]
        assert args["config"].extra_body == {"steer_multiplier": float(line["multiplier"])}
        model = d.inspect_model()  # a real inspect Model over the OpenAI-compatible provider
        assert str(model) == f"openai-api/mup/{line['model']}"
        assert model.api.base_url == line["url"] and model.api.api_key == line["api_key"]
        assert model.config.extra_body == {"steer_multiplier": float(line["multiplier"])}


def test_run_config_filters_deployments_by_multiplier(tmp_path):
    path = _file(tmp_path, LINES)
    targets = _targets(RunConfig(suite="offline", deployments=str(path), multipliers=(1.5, -1)))
    assert sorted(t.multiplier for t in targets) == [-1.0, 1.5]
    with pytest.raises(ValueError, match=r"no deployment for multipliers \[2.0\]"):
        _targets(RunConfig(suite="offline", deployments=str(path), multipliers=(2.0,)))


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (LINES[:1], "{not json}\n", r":2: not valid JSON"),
        ([{"multiplier": 1, "url": "http://x/v1", "model": "m"}], "", r":1: missing.*api_key"),
        ([{**LINES[0], "multiplier": "big"}], "", r":1: 'multiplier' must be a finite number"),
        ([{**LINES[0], "url": "localhost:8000"}], "", r":1: 'url' must start with http"),
        ([LINES[0], LINES[0]], "", r"multipliers \[-1.0\] appear on more than one line"),
    ],
)
def test_bad_deployment_files(tmp_path, lines, extra, message):
    with pytest.raises(ValueError, match=message):
        read_deployments(_file(tmp_path, lines, extra))


def test_study_format_key_string_multiplier_and_no_model(tmp_path):
    lines = [
        {"multiplier": "-1.5", "url": "http://127.0.0.1:8001/v1", "key": "k1"},
        {"multiplier": " 2 ", "url": "http://127.0.0.1:8001/v1", "key": "k1", "port": 8001},
    ]
    deployments = read_deployments(_file(tmp_path, lines))
    assert [(d.multiplier, d.api_key, d.model) for d in deployments] == [
        (-1.5, "k1", None),
        (2.0, "k1", None),
    ]
    with pytest.raises(ValueError, match="call resolved"):
        deployments[0].model_string()
    # a named model needs no server
    named = dataclasses.replace(deployments[0], model="smol")
    assert named.resolved() is named and named.model_string() == "openai-api/mup/smol"
    # nothing listens on port 9 of loopback: the error names the deployment
    dead = dataclasses.replace(deployments[0], url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match=r"127.0.0.1:9/v1 \(multiplier -1.5\) names no model"):
        dead.resolved()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"multiplier": "strong", "url": "http://x/v1", "key": "k"}, r"finite number.*'strong'"),
        ({"multiplier": "nan", "url": "http://x/v1", "key": "k"}, "finite number"),
        ({"multiplier": 1, "url": "http://x/v1", "key": "k", "api_key": "k"}, "not both"),
        ({"multiplier": 1, "url": "http://x/v1"}, r"missing fields \['api_key'\]"),
        ({"multiplier": 1, "url": "http://x/v1", "key": ""}, "'api_key' must be a non-empty"),
    ],
)
def test_bad_study_format_lines(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        read_deployments(_file(tmp_path, [line]))
