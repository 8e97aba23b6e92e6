"""Prompted LLM monitors: log-likelihoods equal transformers', the server path equals the
in-process one, the generative label parser, and `mup baselines prompted` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support.checkpoints import save_tiny_llama

from mup import monitors
from mup.data import bundled_path, load_records
from mup.monitors import _prompted as prompted
from mup.monitors._likelihood import pair_logprobs, pair_rows
from mup.monitors._prompts import LIKELIHOOD_TEMPLATES, parse_generated_label

torch = pytest.importorskip("torch", reason="transformers/torch are the numerical reference")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """Weights drawn large (std 0.2): the two completions' log-likelihoods are far apart."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), std=0.2)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from mup.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def records():
    return list(load_records(bundled_path(), binary=True))[:6]


def _reference(hf, prompt, high, low) -> tuple[float, float]:
    """Both completions' log-likelihoods from transformers' full-sequence logits."""
    d = next(i for i in range(min(len(high), len(low))) if high[i] != low[i])
    out = []
    for tail in (high, low):
        seq = torch.tensor([[*prompt, *tail]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits[0].double(), -1)
        start = len(prompt) + d
        out.append(sum(float(logp[j - 1, seq[0, j]]) for j in range(start, seq.shape[1])))
    return out[0], out[1]


def test_pair_rows_share_one_row_when_the_completions_differ_in_one_last_token():
    assert len(pair_rows([1, 2, 3], [7], [8])) == 1
    (row,) = pair_rows([1, 2], [5, 7], [5, 8])  # shared prefix 5, then one token each
    assert row.tokens.tolist() == [1, 2, 5] and row.first == 2
    two = pair_rows([1, 2], [5, 7, 9], [6])
    assert [r.tokens.tolist() for r in two] == [[1, 2, 5, 7], [1, 2]]
    with pytest.raises(ValueError, match="prefix"):
        pair_rows([1], [5, 6], [5])
    with pytest.raises(ValueError, match="at least one token"):
        pair_rows([], [5], [6])


@pytest.fixture(scope="module")
def hf(tiny_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


# default: two rows per record (multi-token completions); single_word: one shared row
@pytest.mark.parametrize("template", ["default", "single_word"])
def test_log_likelihoods_equal_transformers(hf, model, records, template):
    prompts, high, low = prompted.template_prompts(
        model.tokenizer, records, LIKELIHOOD_TEMPLATES[template], max_conversation_tokens=96
    )
    ll = pair_logprobs(
        model.params, model.config, prompts, [high] * len(prompts), [low] * len(prompts)
    )
    want = np.array([_reference(hf, p, high, low) for p in prompts])
    np.testing.assert_allclose(ll.high, want[:, 0], atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(ll.low, want[:, 1], atol=2e-4, rtol=1e-5)
    assert np.all((ll.p_high > 0) & (ll.p_high < 1))
    # batching must not change a record's numbers: one record alone gives the same
    alone = pair_logprobs(model.params, model.config, prompts[:1], [high], [low])
    np.testing.assert_allclose(alone.high, ll.high[:1], atol=1e-5)


def test_every_template_renders_a_prompt_that_ends_on_the_assistant_turn(model, records):
    for template in LIKELIHOOD_TEMPLATES.values():
        prompts, high, low = prompted.template_prompts(model.tokenizer, records[:1], template)
        text = model.tokenizer.decode(prompts[0])
        assert text.rstrip().endswith("assistant"), text[-80:]
        assert records[0].messages[-1].content[:20] in text
        assert high != low


def test_conversations_past_the_limit_keep_their_end(model, records):
    long = max(records, key=lambda r: len(r.text))
    full, _, _ = prompted.template_prompts(model.tokenizer, [long], LIKELIHOOD_TEMPLATES["default"])
    cut, _, _ = prompted.template_prompts(
        model.tokenizer, [long], LIKELIHOOD_TEMPLATES["default"], max_conversation_tokens=16
    )
    assert len(cut[0]) < len(full[0])
    text = model.tokenizer.decode(cut[0])
    assert "[...]" in text and long.messages[-1].content[-10:] in text


@pytest.mark.parametrize(
    ("text", "label", "score"),
    [
        ("High-stakes.", "high-stakes", 1.0),
        ("This is low stakes", "low-stakes", 0.0),
        ("I'd say ambiguous, maybe high-stakes", "ambiguous", 0.5),
        ("The answer: LOW-STAKES", "low-stakes", 0.0),
        ("I cannot tell", None, 0.5),
        ("highstakes", "high-stakes", 1.0),
        ("the highlands", None, 0.5),
    ],
)
def test_generated_labels_are_parsed(text, label, score):
    assert parse_generated_label(text) == (label, score)


def test_score_rows_carry_labels_costs_and_both_log_likelihoods(model, records):
    rows = prompted.likelihood_rows(
        records,
        "mini",
        template="single_word",
        tokenizer=model.tokenizer,
        config=model.config,
        model_name="tiny",
        params=model.params,
        max_conversation_tokens=64,
    )
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["label"] for r in rows] == [r.label for r in records]
    for r in rows:
        assert r["monitor"] == "prompted:tiny/single_word"
        assert r["score"] == pytest.approx(1 / (1 + np.exp(r["loglik_low"] - r["loglik_high"])))
        # one row (single-token completions), the head at one position
        assert r["flops"] == monitors.llm_flops(model.config, r["n_tokens"], logit_positions=1)


def test_generative_rows_count_unparseable_answers(model, records):
    rows = prompted.generative_rows(
        records[:3],
        "mini",
        model=model,
        model_name="tiny",
        tokenizer=model.tokenizer,
        config=model.config,
        max_conversation_tokens=32,
    )
    assert len(rows) == 3  # never dropped
    for r in rows:
        label, score = parse_generated_label(r["text"])
        assert r["valid"] == (label is not None) and r["score"] == score
        assert r["n_tokens"] > 0


def test_cli_writes_score_files_that_read_back(tiny_dir, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mup.cli", "baselines", "prompted",
            "--model", str(tiny_dir), "--prompt", "single_word,single_letter",
            "--eval", "mini", "--limit", "8", "--max-conversation-tokens", "48",
            "--out", str(out), "--no-progress",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = monitors.read_scores(out)
    assert set(scores.monitors) == {
        f"prompted:{tiny_dir.name}/single_word",
        f"prompted:{tiny_dir.name}/single_letter",
    }
    assert len(scores) == 16 and scores.datasets == ("mini",)
    assert "AUROC" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "nonsense"], "unknown prompt template"),
        (["--eval", "no/such-set"], "unknown evaluation set"),
        (["--no-likelihood"], "needs --generative"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading_a_model(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "mup.cli", "baselines", "prompted", "--model", "no-such-model"]
        + args,
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_score_files_round_trip_and_bad_lines_name_file_and_field(tmp_path):
    rows = [
        monitors.score_row(
            id=str(i), dataset="d", label=i % 2, score=0.1 * i, monitor="m:x", flops=1, n_tokens=3
        )
        for i in range(4)
    ]
    path = monitors.write_scores(tmp_path / "s.jsonl", rows)
    back = monitors.read_scores(path)
    assert back.ids == ("0", "1", "2", "3") and back.monitor == "m:x"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["score"] = 1.5
    lines[2] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(monitors.ScoreFileError, match=r"s\.jsonl:3: field 'score'"):
        monitors.read_scores(path)
    lines[2] = lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(monitors.ScoreFileError, match=r"s\.jsonl:3: duplicate record '1'"):
        monitors.read_scores(path)
