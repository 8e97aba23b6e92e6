"""A prompted monitor scored through `mup serve` (echo logprobs, the official openai client)
equals the same monitor in process, and `mup baselines prompted --base-url` writes the same
score files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mup import monitors
from mup.data import bundled_path, load_records
from mup.monitors import _prompted as prompted

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def plain_server(tiny_dir, module_server, tmp_path_factory):
    srv = module_server(
        ["--model", str(tiny_dir), "--served-name", "plain", "--max-batch", "4"],
        tmp_path_factory.mktemp("plain"),
    )
    srv.wait_healthy()
    return srv


@pytest.mark.slow  # a server process and the in-process reference model
def test_echo_logprobs_through_the_server_equal_in_process(tiny_dir, plain_server, tmp_path):
    from mup.models import load_model

    model = load_model(str(tiny_dir))
    records = list(load_records(bundled_path(), binary=True))[:5]
    client = openai.OpenAI(base_url=plain_server.url + "/v1", api_key="none")
    kw = dict(tokenizer=model.tokenizer, config=model.config, model_name="tiny")
    kw["max_conversation_tokens"] = 48
    for template in ("default", "single_letter"):  # multi-token and single-token completions
        local = prompted.likelihood_rows(
            records, "mini", template=template, params=model.params, **kw
        )
        remote = prompted.likelihood_rows(
            records,
            "mini",
            template=template,
            scorer=prompted.EchoScorer(client, "plain", prompts_per_request=3),
            **kw,
        )
        for a, b in zip(local, remote, strict=True):
            assert a["id"] == b["id"] and a["n_tokens"] == b["n_tokens"]
            assert a["flops"] == b["flops"]
            np.testing.assert_allclose(
                [a["loglik_high"], a["loglik_low"]],
                [b["loglik_high"], b["loglik_low"]],
                atol=2e-3,
            )

    out = tmp_path / "remote"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mup.cli", "baselines", "prompted",
            "--model", str(tiny_dir), "--base-url", plain_server.url + "/v1",
            "--prompt", "single_word", "--generative", "--eval", "mini", "--limit", "4",
            "--max-conversation-tokens", "32", "--out", str(out), "--no-progress",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = monitors.read_scores(out)
    assert len(scores) == 8
    generated = scores.select(monitor=f"prompted:{tiny_dir.name}/generative")
    assert len(generated) == 4 and all("text" in r for r in generated.rows)


def test_an_unreachable_server_is_one_clear_line(tmp_path, tiny_dir):
    proc = subprocess.run(
        [
            sys.executable, "-m", "mup.cli", "baselines", "prompted",
            "--model", str(tiny_dir), "--base-url", "http://127.0.0.1:9/v1",
            "--eval", "mini", "--limit", "2", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot reach http://127.0.0.1:9/v1" in proc.stderr
