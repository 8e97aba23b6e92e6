"""`mup steering sweep` on tiny random models: perplexity and propensity against a hand
computation (one unpadded float64 forward per sequence), resume, summaries, PNGs, CLI errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mup.steering import SteeringVector, save_vector
from mup.steering._sweep import (
    SweepVector,
    best_vectors,
    parse_multipliers,
    prompts_from_pairs,
    run_sweep,
    summarise,
)

GRID = (-3.0, 3.0)  # 0 is added by the sweep
LAYER = 1


def _logp_rows(model, ids, vector=None, multiplier=0.0):
    """float64 log-softmax of one unpadded sequence [T-1, V], steered by hand when asked."""
    from mup.models import ForwardSteering, jit_forward

    tokens = jnp.asarray([ids], jnp.int32)
    pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
    spec = None
    if vector is not None:
        spec = ForwardSteering(
            blocks=(LAYER,),
            vectors=jnp.asarray(vector, jnp.float32)[None],
            multipliers=jnp.full((1, 1), multiplier, jnp.float32),
        )
    logits = np.asarray(
        jit_forward(model.params, tokens, pos, config=model.config, steering=spec).logits[0],
        np.float64,
    )
    logits -= logits.max(-1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[:-1]


def _answer_logp(model, prefix, answer, **steer):
    logp = _logp_rows(model, list(prefix) + list(answer), **steer)
    nxt = np.asarray(list(prefix) + list(answer))[1:]
    picked = logp[np.arange(len(nxt)), nxt]
    return float(picked[len(prefix) - 1 :].sum())


@pytest.fixture(scope="module")
def sweep_setup(tiny_model, tiny_pairs, tmp_path_factory):
    rng = np.random.default_rng(3)
    v = rng.standard_normal(tiny_model.config.d_model).astype(np.float32)
    sv = SteeringVector(vector=v / np.linalg.norm(v), block=LAYER, model="tiny", method="test")
    prompts = prompts_from_pairs(tiny_pairs[1][:4])
    out = tmp_path_factory.mktemp("sweep")
    vectors = [SweepVector(name="v.safetensors", vector=sv)]
    rows = run_sweep(
        tiny_model, vectors, prompts, GRID, out, max_new_tokens=6, batch_size=2, progress=False
    )
    return sv, vectors, prompts, out, rows


def test_rows_cover_the_grid_with_zero(sweep_setup):
    _, _, prompts, out, rows = sweep_setup
    assert len(rows) == 3 * len(prompts)
    assert sorted({r["multiplier"] for r in rows}) == [-3.0, 0.0, 3.0]
    file_rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(file_rows) == len(rows)
    for r in rows:
        assert set(r) >= {"vector", "block", "epoch", "multiplier", "prompt_id", "prompt"}
        assert r["unit"] == "raw" and r["block"] == LAYER
        assert isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "user"
        assert r["hit_limit"] == (r["n_tokens"] == 6)


def test_perplexity_matches_hand_computation(sweep_setup, tiny_model):
    from mup.models import Steering, generate

    sv, _, prompts, _, rows = sweep_setup
    for r in rows:
        p = next(p for p in prompts if p.id == r["prompt_id"])
        # The same answer alone (a batch of one): greedy rows do not depend on their batch.
        g = generate(
            tiny_model,
            [list(p.messages)],
            max_new_tokens=6,
            steering=Steering(LAYER, sv.vector),
            multipliers=[r["multiplier"]],
        )
        assert g.texts[0] == r["answer"]
        ids = g.token_ids[0][:-1] if g.finished[0] else g.token_ids[0]
        assert r["n_tokens"] == len(ids)
        if not ids:
            assert r["perplexity"] is None
            continue
        nll = -_answer_logp(tiny_model, g.prompt_ids[0], ids) / len(ids)
        assert r["perplexity"] == pytest.approx(np.exp(nll), rel=1e-4)


def test_propensity_matches_hand_computation(sweep_setup, tiny_model):
    from mup.text import ROLE_ASSISTANT, encode_chats

    sv, _, prompts, _, rows = sweep_setup
    for r in rows:
        pair = next(p for p in prompts if p.id == r["prompt_id"]).pair
        margin = {}
        for m in (0.0, r["multiplier"]):
            lp = []
            for resp in (pair.chosen, pair.rejected):
                enc = encode_chats(
                    tiny_model.tokenizer, [[*pair.prompt, {"role": "assistant", "content": resp}]]
                )
                ids, roles = enc.row(0)
                first = int(np.argmax(roles == ROLE_ASSISTANT))
                n = int(np.count_nonzero(roles == ROLE_ASSISTANT))
                lp.append(
                    _answer_logp(
                        tiny_model,
                        list(ids[:first]),
                        list(ids[first : first + n]),
                        vector=sv.vector,
                        multiplier=m,
                    )
                )
            margin[m] = lp[0] - lp[1]
        assert r["propensity"] == pytest.approx(margin[r["multiplier"]], abs=2e-3)
        assert r["propensity_delta"] == pytest.approx(
            margin[r["multiplier"]] - margin[0.0], abs=2e-3
        )
    assert any(abs(r["propensity_delta"]) > 0.05 for r in rows)  # the vector does something


def test_resume_redoes_only_missing_rows(sweep_setup, tiny_model):
    _, vectors, prompts, out, rows = sweep_setup
    path = out / "sweep.jsonl"
    lines = path.read_text().splitlines()
    # Keep 5 rows plus a torn sixth (a killed run), then resume.
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    logs = []
    again = run_sweep(
        tiny_model,
        vectors,
        prompts,
        GRID,
        out,
        max_new_tokens=6,
        batch_size=2,
        progress=False,
        log=logs.append,
    )
    assert any("5 of 12 rows" in x for x in logs)
    key = lambda r: (r["multiplier"], r["prompt_id"])  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "perplexity"}  # noqa: E731
    assert [strip(r) for r in sorted(again, key=key)] == [strip(r) for r in sorted(rows, key=key)]
    assert len(path.read_text().splitlines()) == 12


def test_summary_and_coherent_range(sweep_setup):
    _, _, _, _, rows = sweep_setup
    summary = summarise(rows, coherence_factor=1e6)  # everything coherent
    assert [s["multiplier"] for s in summary] == [-3.0, 0.0, 3.0]
    zero = summary[1]
    assert zero["mean_delta"] == 0.0 and zero["coherent"]
    assert all(s["coherent"] for s in summary)
    best = best_vectors(summary)[0]
    assert best["best_gain"] == max(s["mean_delta"] for s in summary)
    tight = summarise(rows, coherence_factor=1.0000001)
    assert tight[1]["coherent"]  # m = 0 is always inside its own range
    s = summary[2]
    d = np.asarray([r["propensity_delta"] for r in rows if r["multiplier"] == 3.0])
    assert s["mean_delta"] == pytest.approx(d.mean())
    assert s["delta_ci_low"] < s["mean_delta"] < s["delta_ci_high"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("-2,0,2", (-2.0, 0.0, 2.0)), ("-20:20:2", tuple(float(m) for m in range(-20, 21, 2)))],
)
def test_parse_multipliers(text, expected):
    assert parse_multipliers(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,x", "'x' is not a number"),
        ("1:2", "not start:stop:step"),
        ("1:0:1", "stop < start"),
        ("0:1:0", "step > 0"),
        ("1,1", "repeats"),
        ("nan", "not finite"),
        ("", "empty"),
    ],
)
def test_parse_multipliers_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_multipliers(text)


# ---------------------------------------------------------------------------------------------
# CLI, on a tiny checkpoint on disk (SmolLM2's tokenizer, so the bundled pairs encode)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from _support.checkpoints import save_tiny_llama

    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"), max_positions=512, std=0.25, embed_std=1.0
    )


def _cli(*argv):
    from mup.steering._cli import main

    return main(list(argv))


def test_cli_end_to_end_with_vectors_dir(tiny_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    vdir = tmp_path / "vecs"
    for epoch in (1, 2):
        v = rng.standard_normal(32).astype(np.float32)
        save_vector(
            vdir / f"epoch_{epoch:03d}.safetensors",
            SteeringVector(vector=v, block=0, model="tiny", method="bipo", epoch=epoch),
        )
    args = ["sweep", "--model", str(tiny_dir), "--vectors", str(vdir), "--multipliers=-1,1"]
    args += ["--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]
    assert _cli(*args, "--no-progress") == 0
    out = tmp_path / "out"
    for name in ("summary.csv", "summary.json", "epoch_001.png", "epoch_002.png", "best.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2
    assert {r["epoch"] for r in rows} == {1, 2}
    assert all("propensity_delta" in r for r in rows)
    printed = capsys.readouterr().out
    assert "best m" in printed and "epoch_001.safetensors" in printed
    best = json.loads((out / "summary.json").read_text())["best"]
    assert {b["vector"] for b in best} == {"epoch_001.safetensors", "epoch_002.safetensors"}
    # Rerun: nothing left to generate.
    assert _cli(*args, "--no-progress") == 0
    assert "resuming: 12 of 12" in capsys.readouterr().out
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 12
    # A sweep.jsonl from before the rename ("layer" for the block) resumes and summarises too.
    old = [{("layer" if k == "block" else k): v for k, v in r.items()} for r in rows]
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert _cli(*args, "--no-progress") == 0
    assert "resuming: 12 of 12" in capsys.readouterr().out
    assert {s["block"] for s in json.loads((out / "summary.json").read_text())["rows"]} == {0}


def test_cli_errors(tiny_dir, tmp_path, capsys):
    wide = tmp_path / "wide.safetensors"
    save_vector(wide, SteeringVector(vector=np.ones(16, np.float32), block=0, model="x"))
    base = ["sweep", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--vector", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--vector", str(wide), "--multipliers", "1,,2"], "is not a number"),
        (["--vector", str(wide), "--pairs", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--vectors", str(tmp_path / "empty")], "not a directory"),
        (["--vector", str(wide), "--limit", "1"], "width 16"),
    ]
    for extra, message in cases:
        assert _cli(*base, *extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
