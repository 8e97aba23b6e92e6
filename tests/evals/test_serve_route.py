"""The deployments route against a real `python -m mup.serve` process on loopback.

Two deployment lines point at ONE server with different multipliers; inspect's openai-api provider
sends `steer_multiplier` in each request body. The completions must equal the in-process
`mup/...` provider's for the same prompts and multipliers (both are greedy `generate` rows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support.servers import Server
from inspect_ai.log import read_eval_log

from mup.evals import RunConfig, run_suite

API_KEY = "evals-key"
MULTIPLIERS = (-1.0, 1.0)
LIMIT = 2


@pytest.fixture(scope="module")
def server_url(tiny_dir, vector_file, tmp_path_factory):
    pytest.importorskip("mup.serve", reason="mup.serve is not installed")
    srv = Server(
        [
            "--model", str(tiny_dir),
            "--vector", str(vector_file),
            "--layer", "1",
            "--api-key", API_KEY,
            "--served-name", "tiny",
            "--no-warmup",
        ],
        tmp_path_factory.mktemp("serve"),
    )  # fmt: skip
    try:
        srv.wait_healthy(timeout=300)
        yield srv.url + "/v1"
    finally:
        srv.stop()


def _served_and_local(deployments, tiny_dir, vector_file, tmp_path, **common):
    """The suite's reports through the deployments file and in process at the same multipliers."""
    served = run_suite(
        RunConfig(deployments=str(deployments), log_dir=tmp_path / "served", **common)
    )
    local = run_suite(
        RunConfig(
            model=f"mup/{tiny_dir}",
            vector=str(vector_file),
            block=1,
            multipliers=MULTIPLIERS,
            log_dir=tmp_path / "local",
            **common,
        )
    )
    return served, local


def _completions(report) -> dict[tuple[float, str], str]:
    out = {}
    for rec in report:
        log = read_eval_log(rec["log"])
        assert log.status == "success", log.error
        for s in log.samples:
            out[(rec["multiplier"], str(s.id))] = s.output.completion
    return out


@pytest.mark.slow
def test_deployments_route_matches_in_process_provider(
    server_url, tiny_dir, vector_file, small_config, tmp_path
):
    deployments = tmp_path / "deployments.jsonl"
    deployments.write_text(
        "".join(
            json.dumps({"multiplier": m, "url": server_url, "api_key": API_KEY, "model": "tiny"})
            + "\n"
            for m in MULTIPLIERS
        )
    )
    common = dict(suite="mc_general", limit=LIMIT, config=small_config)
    served, local = _served_and_local(deployments, tiny_dir, vector_file, tmp_path, **common)
    assert sorted(r["multiplier"] for r in served) == list(MULTIPLIERS)
    for rec in served:
        log = read_eval_log(rec["log"], header_only=True)
        assert log.eval.model == "openai-api/mup/tiny"
        assert log.eval.model_generate_config.extra_body == {"steer_multiplier": rec["multiplier"]}
        assert f"multiplier_{rec['multiplier']}" in rec["log"]
    got, want = _completions(served), _completions(local)
    assert len(got) == len(MULTIPLIERS) * LIMIT and got == want


LL_CONFIG = """\
benchmarks:
  mc_easy_ll:
    task: mup/mc_easy_ll
    category: knowledge_ll
suites:
  ll: [mc_easy_ll]
"""


def _logliks(report) -> dict[tuple[float, str], list[float]]:
    out = {}
    for rec in report:
        log = read_eval_log(rec["log"])
        assert log.status == "success", log.error
        for s in log.samples:
            out[(rec["multiplier"], str(s.id))] = s.scores["loglik_choice"].metadata["loglik"]
    return out


@pytest.mark.slow
def test_loglik_mc_echo_route_matches_in_process_with_a_study_format_file(
    server_url, tiny_dir, vector_file, tmp_path
):
    # The steering study's deployments format: "key", the multiplier as a string, no "model"
    # (asked from the server's /v1/models).
    deployments = tmp_path / "deployments.jsonl"
    deployments.write_text(
        "".join(
            json.dumps({"multiplier": str(m), "url": server_url, "key": API_KEY}) + "\n"
            for m in MULTIPLIERS
        )
    )
    config = tmp_path / "benchmarks.yaml"
    config.write_text(LL_CONFIG)
    common = dict(suite="ll", limit=LIMIT + 1, config=config)
    served, local = _served_and_local(deployments, tiny_dir, vector_file, tmp_path, **common)
    for rec in served:
        assert read_eval_log(rec["log"], header_only=True).eval.model == "openai-api/mup/tiny"
    got, want = _logliks(served), _logliks(local)
    assert len(got) == len(MULTIPLIERS) * (LIMIT + 1) and got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-4)
    # steering reaches the server: the two multipliers' log-likelihoods differ
    assert got[(MULTIPLIERS[0], "easy001")] != got[(MULTIPLIERS[1], "easy001")]
