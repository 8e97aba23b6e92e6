"""The field's standard clients, unchanged, against a steered `mup serve`:

* lm-evaluation-harness `local-completions` (echo + logprobs log-likelihoods) on a multiple
  choice task of our own over a local jsonl: its accuracy equals mup's in-process
  log-likelihood scoring of the same items with the same steering (jit_forward, no server);
* inspect-ai's `openai-api` provider with logprobs on.

No hub access anywhere (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

STEER_LAYER = 0  # the tiny checkpoint's, as in conftest

pytestmark = pytest.mark.slow

NAME = "tiny-lm"
MULTIPLIER = 1.5  # the server's default: lm-eval sends no steering fields

ITEMS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Newtons"], 0),
    ("A week has seven", ["days", "hours", "planets", "songs"], 0),
    ("The opposite of hot is", ["warm", "cold", "blue"], 1),
    ("Two plus two equals", ["three", "five", "four"], 2),
    ("Cats like to chase", ["mice", "stars", "taxes"], 0),
    ("The sky at noon is usually", ["green", "blue", "loud"], 1),
    ("Bees make", ["honey", "steel", "glass", "rain"], 0),
]

TASK_YAML = """\
task: mup_mc_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def steered(module_server, tiny_dir, vector_file, tmp_path_factory):
    srv = module_server(
        [
            "--model", str(tiny_dir), "--vector", f"v={vector_file}",
            "--layer", str(STEER_LAYER), "--served-name", NAME,
            "--default-multiplier", str(MULTIPLIER), "--default-max-tokens", "16",
            "--no-warmup",
        ],
        tmp_path_factory.mktemp("serve_clients"),
    )  # fmt: skip
    with srv.healthy():
        yield srv


def _in_process_scores(tiny_dir, vector_file) -> list[list[float]]:
    """mup's own log-likelihood scoring: sum of the continuation tokens' float32 log-softmax
    under the steered model, contexts and continuations split as lm-eval's `_encode_pair`."""
    import jax
    import jax.numpy as jnp

    from mup.models import ForwardSteering, jit_forward, load_model

    model = load_model(str(tiny_dir))
    tok = model.tokenizer
    v = np.load(vector_file)
    picks = []
    for question, choices, _ in ITEMS:
        context = f"Question: {question}\nAnswer:"
        scores = []
        for choice in choices:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            spec = ForwardSteering(
                blocks=(STEER_LAYER,),
                vectors=jnp.asarray(v[None]),
                multipliers=jnp.asarray([[MULTIPLIER]], jnp.float32),
            )
            out = jit_forward(
                model.params,
                jnp.asarray([whole], jnp.int32),
                jnp.arange(len(whole), dtype=jnp.int32)[None],
                config=model.config,
                steering=spec,
            )
            lp = np.asarray(jax.nn.log_softmax(out.logits[0], axis=-1))
            scores.append(sum(lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))
        picks.append([float(x) for x in scores])
    return picks


def test_lm_eval_local_completions_equals_in_process_scoring(
    steered, tiny_dir, vector_file, tmp_path
):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test-only dependency")
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mup_mc_tiny.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
    }
    args = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "local-completions",
        "--model_args",
        f"base_url={steered.url}/v1/completions,model={NAME},tokenizer_backend=huggingface,"
        f"tokenizer={tiny_dir},num_concurrent=4,max_retries=1",
        "--tasks", "mup_mc_tiny", "--include_path", str(tasks),
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (results_file,) = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]["mup_mc_tiny"]
    scores = _in_process_scores(tiny_dir, vector_file)
    picks = [int(np.argmax(x)) for x in scores]
    accuracy = float(np.mean([p == item[2] for p, item in zip(picks, ITEMS, strict=True)]))
    assert results["acc,none"] == pytest.approx(accuracy)
    (samples_file,) = list(out.rglob("samples_mup_mc_tiny_*.jsonl"))
    served = [json.loads(line) for line in samples_file.read_text().splitlines()]
    served.sort(key=lambda s: s["doc_id"])
    # item by item: the served log-likelihoods equal the in-process ones
    got = [[float(r[0]) for r in s["filtered_resps"]] for s in served]
    for g, want in zip(got, scores, strict=True):
        np.testing.assert_allclose(g, want, atol=1e-3)


def test_inspect_openai_api_with_logprobs(steered):
    import asyncio

    from inspect_ai.model import ChatMessageUser, GenerateConfig, get_model

    model = get_model(
        f"openai-api/mup/{NAME}",
        base_url=steered.url + "/v1",
        api_key="-",
        memoize=False,
        config=GenerateConfig(extra_body={"steer_multiplier": -1.0}),
    )
    config = GenerateConfig(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=4)
    out = asyncio.run(
        model.generate([ChatMessageUser(content="Tell me about the sea.")], config=config)
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.output_tokens
    assert "".join(t.token for t in content) == out.completion
    for t in content:
        assert len(t.top_logprobs) == 4 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
