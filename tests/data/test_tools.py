"""The data set tools: write_records, balance, split, overlap, stats, and `mup data` end to end.

Exactness claims are checked against brute force over every subset of a few groups, so a
search that returns a good-looking but not the best (or not an exact) answer fails.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from mup.data import DataError, Message, Record, load_records
from mup.data._overlap import normalise, overlap, rendered
from mup.data._records import write_records
from mup.data._stats import MAX_LEVELS, dataset_stats, format_stats
from mup.data._transform import SampleError, balance, group_key, split_by_pair
from mup.datagen._cli import main

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mup"
LABEL = {1: "high-stakes", 0: "low-stakes", 2: "ambiguous"}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _paired_rows(compositions: list[tuple[int, int, int]], singles: tuple[int, int] = (0, 0)):
    """Rows of groups with (high, low, ambiguous) records each, then ungrouped high/low rows."""
    rows = []
    for g, (high, low, amb) in enumerate(compositions):
        labels = [1] * high + [0] * low + [2] * amb
        for k, label in enumerate(labels):
            rows.append(
                {
                    "inputs": f"group {g} prompt {k}",
                    "ids": f"g{g}-{k}",
                    "labels": LABEL[label],
                    "pair_id": f"p{g}",
                    "tone": ["casual", "angry"][k % 2],
                }
            )
    for k in range(singles[0] + singles[1]):
        label = 1 if k < singles[0] else 0
        rows.append({"inputs": f"single {k}", "ids": f"s{k}", "labels": LABEL[label]})
    return rows


# Unequal groups: only some sizes are reachable, and the largest sample needs unbalanced groups
# that cancel ((2, 1) with (1, 2); (3, 0) with (0, 1) * 3 is impossible: one (0, 1) only).
COMPOSITIONS = [(2, 1, 0), (1, 2, 1), (3, 3, 0), (3, 0, 0), (0, 1, 0), (4, 2, 0), (1, 1, 2)]


def _brute_force_sizes(compositions) -> set[int]:
    """Every balanced sample size that whole groups (ambiguous records dropped) can make."""
    sizes = set()
    for chosen in itertools.product((0, 1), repeat=len(compositions)):
        high = sum(c[0] for c, take in zip(compositions, chosen, strict=True) if take)
        low = sum(c[1] for c, take in zip(compositions, chosen, strict=True) if take)
        if high == low and high:
            sizes.add(2 * high)
    return sizes


# --- write_records ------------------------------------------------------------------------------


def _record(id_, messages, label=1, scale=None, **fields) -> Record:
    return Record(
        id=id_,
        messages=tuple(Message(role=r, content=c) for r, c in messages),
        label=label,
        scale_label=scale,
        fields=MappingProxyType(fields),
        source="test",
    )


def test_write_records_round_trips(tmp_path):
    records = [
        _record("plain", [("user", "hello there")], 1, 8.0, pair_id="p1", nested={"a": [1, 2]}),
        _record("chat", [("system", "s"), ("user", "u"), ("assistant", "a")], 0, 3.5),
        # plain text that looks like a list must not come back as an encoded conversation
        _record("bracket", [("user", '[{"role": "user", "content": "x"}]')], 2),
        _record("assistant-only", [("assistant", "just one turn")], 0, split="test"),
        _record("unicode", [("user", "line\u2028sep ünï 漢字")], 1),
    ]
    path = write_records(tmp_path / "out.jsonl", records)
    back = load_records(path)
    assert back.ids == tuple(r.id for r in records)
    for original, copy in zip(records, back, strict=True):
        assert copy.messages == original.messages
        assert copy.label == original.label
        assert copy.scale_label == original.scale_label
        assert dict(copy.fields) == dict(original.fields)
    lines = path.read_text(encoding="utf-8").splitlines()  # splits at U+2028 too
    assert len(lines) == len(records)
    rows = [json.loads(line) for line in lines]
    assert rows[0]["inputs"] == "hello there" and rows[0]["scale_labels"] == 8
    assert rows[1]["labels"] == "low-stakes" and rows[1]["scale_labels"] == 3.5
    assert isinstance(rows[2]["inputs"], str) and rows[2]["inputs"].startswith('[{"role": "user"')
    assert list(rows[0])[:4] == ["inputs", "ids", "labels", "scale_labels"]


@pytest.mark.parametrize(
    "relative", ["training/synthetic_2025-03-25.jsonl", "evals/dev/toolace_balanced.jsonl"]
)
def test_write_records_round_trips_shared_files(tmp_path, relative):
    if not (SHARED / relative).is_file():
        pytest.skip("../shared is absent")
    original = load_records(SHARED / relative)
    copy = load_records(write_records(tmp_path / "copy.jsonl", original))
    assert copy.ids == original.ids
    np.testing.assert_array_equal(copy.labels, original.labels)
    for a, b in zip(original, copy, strict=True):
        assert (a.messages, a.scale_label, dict(a.fields)) == (
            b.messages,
            b.scale_label,
            dict(b.fields),
        )


def test_write_records_is_atomic(tmp_path):
    path = _write(tmp_path / "out.jsonl", [{"inputs": "old", "ids": "1"}])
    before = path.read_bytes()
    bad = [_record("a", [("user", "x")]), _record("b", [("user", "y")], unserialisable=object())]
    with pytest.raises(TypeError):
        write_records(path, bad)
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary left
    with pytest.raises(ValueError, match="written as .jsonl"):
        write_records(tmp_path / "out.csv", bad[:1])


# --- balance ------------------------------------------------------------------------------------


def test_balance_largest_is_exact_and_keeps_pairs_whole(tmp_path):
    dataset = load_records(_write(tmp_path / "d.jsonl", _paired_rows(COMPOSITIONS)))
    best = max(_brute_force_sizes(COMPOSITIONS))
    for seed in range(5):
        result = balance(dataset, seed=seed)
        assert len(result.records) == result.largest == best
        assert result.n_high == result.n_low == best // 2
        assert sum(r.label == 1 for r in result.records) == result.n_high
        assert result.n_ambiguous_dropped == 3
        assert all(r.label != 2 for r in result.records)
        kept = Counter(group_key(r) for r in result.records)
        for key, members in Counter(group_key(r) for r in dataset if r.label != 2).items():
            assert kept.get(key, 0) in (0, members)  # a pair is kept or dropped whole
        assert [r.id for r in result.records] == [r.id for r in dataset if r in result.records]


def test_balance_every_n_matches_brute_force(tmp_path):
    """Each even n is produced exactly when some set of whole groups balances to it;
    otherwise the error names the nearest sizes that are possible."""
    dataset = load_records(_write(tmp_path / "d.jsonl", _paired_rows(COMPOSITIONS)))
    possible = _brute_force_sizes(COMPOSITIONS)
    for n in range(2, 24, 2):
        if n in possible:
            result = balance(dataset, n=n, seed=n)
            assert len(result.records) == n and result.n_high == result.n_low == n // 2
        else:
            with pytest.raises(SampleError) as error:
                balance(dataset, n=n)
            if n < max(possible):
                below = max(s for s in possible if s < n)
                above = min(s for s in possible if s > n)
                assert f"the nearest sizes that do are {below} or {above}" in str(error.value)
            else:
                assert "more than possible" in str(error.value)


def test_balance_is_reproducible_by_seed(tmp_path):
    rows = _paired_rows([(1, 1, 0)] * 20, singles=(15, 5))
    dataset = load_records(_write(tmp_path / "d.jsonl", rows))
    picks = {seed: [r.id for r in balance(dataset, n=16, seed=seed).records] for seed in range(6)}
    assert picks[3] == [r.id for r in balance(dataset, n=16, seed=3).records]
    assert len({tuple(p) for p in picks.values()}) > 1  # the seed matters


def test_balance_without_pairs_samples_each_label(tmp_path):
    rows = [{"inputs": f"t{i}", "ids": str(i), "labels": LABEL[int(i < 7)]} for i in range(12)]
    dataset = load_records(_write(tmp_path / "d.jsonl", rows))
    result = balance(dataset, seed=1)
    assert (result.n_high, result.n_low, result.n_groups) == (5, 5, 10)
    assert {r.id for r in result.records} >= {str(i) for i in range(7, 12)}  # every low one


def test_balance_refuses_what_cannot_be_balanced(tmp_path):
    one_label = [{"inputs": f"t{i}", "ids": str(i), "labels": "high-stakes"} for i in range(3)]
    with pytest.raises(SampleError, match="3 high-stakes and 0 low-stakes"):
        balance(load_records(_write(tmp_path / "a.jsonl", one_label)))
    unlabelled = [{"inputs": "t", "ids": "1"}]
    with pytest.raises(SampleError, match="no labels"):
        balance(load_records(_write(tmp_path / "b.jsonl", unlabelled)))
    pairs_only = _paired_rows([(2, 1, 0), (2, 1, 0)])  # never as many low as high
    with pytest.raises(SampleError, match="no set of whole pairs"):
        balance(load_records(_write(tmp_path / "c.jsonl", pairs_only)))
    for n in (0, 3, -2):
        with pytest.raises(SampleError, match="even number"):
            balance(load_records(_write(tmp_path / "d.jsonl", pairs_only)), n=n)


# --- split --------------------------------------------------------------------------------------


def test_split_never_separates_a_pair_and_hits_the_fraction(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 7, size=30)]
    rows = _paired_rows([(s - s // 2, s // 2, 0) for s in sizes], singles=(6, 4))
    dataset = load_records(_write(tmp_path / "d.jsonl", rows))
    for fraction, seed in itertools.product((0.05, 0.2, 0.5, 0.9), range(3)):
        result = split_by_pair(dataset, test_fraction=fraction, seed=seed)
        train_keys = {group_key(r) for r in result.train}
        test_keys = {group_key(r) for r in result.test}
        assert not train_keys & test_keys
        assert sorted(r.id for r in (*result.train, *result.test)) == sorted(dataset.ids)
        assert abs(len(result.test) - fraction * len(dataset)) <= max(sizes)
        assert {r.fields["split"] for r in result.train} == {"train"}
        assert {r.fields["split"] for r in result.test} == {"test"}
        assert result.n_groups_train + result.n_groups_test == len(sizes) + 10
    same = split_by_pair(dataset, test_fraction=0.2, seed=7)
    again = split_by_pair(dataset, test_fraction=0.2, seed=7)
    assert [r.id for r in same.test] == [r.id for r in again.test]


def test_group_keys_keep_pair_id_types_apart():
    values = [1, "1", [1], True, None, ""]
    records = [_record(f"r{i}", [("user", "x")], pair_id=v) for i, v in enumerate(values)]
    keys = [group_key(r) for r in records]
    assert len(set(keys)) == len(values)  # None and "" are each the record's own group
    assert (
        keys[4] == ("id", "r4")
        and group_key(_record("other", [("user", "y")], pair_id=1)) == keys[0]
    )


def test_split_is_as_close_as_whole_groups_allow(tmp_path):
    sizes = [5, 5, 7, 3, 9, 4]  # N = 33
    rows = _paired_rows([(s, 0, 0) for s in sizes])
    dataset = load_records(_write(tmp_path / "d.jsonl", rows))
    sums = {
        sum(s for s, take in zip(sizes, chosen, strict=True) if take)
        for chosen in itertools.product((0, 1), repeat=len(sizes))
    } - {0, 33}
    for fraction in (0.1, 0.2, 0.3, 0.45, 0.7, 0.95):
        best = min(abs(s - fraction * 33) for s in sums)
        result = split_by_pair(dataset, test_fraction=fraction, seed=1)
        assert abs(len(result.test) - fraction * 33) == pytest.approx(best)
        assert 0 < len(result.test) < 33


def test_split_refuses_bad_fractions_and_single_groups(tmp_path):
    dataset = load_records(_write(tmp_path / "d.jsonl", _paired_rows([(2, 2, 0), (1, 1, 0)])))
    for fraction in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(SampleError, match="strictly between 0 and 1"):
            split_by_pair(dataset, test_fraction=fraction)
    single = load_records(_write(tmp_path / "e.jsonl", _paired_rows([(2, 2, 0)])))
    with pytest.raises(SampleError, match="all 4 records share one pair_id"):
        split_by_pair(single)


# --- overlap ------------------------------------------------------------------------------------


def test_normalise_folds_case_whitespace_and_punctuation_only():
    assert normalise("  Hello,   WORLD!\n\tHow's it — going?") == "hello world hows it going"
    assert normalise("Ｆｕｌｌ width") == "full width"  # NFKC
    assert normalise("hello world") != normalise("hello word")
    assert normalise("a + b = c") == "a + b = c"  # symbols are content, not punctuation


def test_overlap_finds_planted_duplicates_and_not_near_misses(tmp_path):
    chat = json.dumps(
        [{"role": "user", "content": "Help me."}, {"role": "assistant", "content": "Sure."}]
    )
    a_rows = [
        {"inputs": "The bridge is collapsing, what do I do?", "ids": "a1", "labels": "high-stakes"},
        {"inputs": "Which colour for the kitchen walls?", "ids": "a2", "labels": "low-stakes"},
        {"inputs": chat, "ids": "a3", "labels": "low-stakes"},
        {
            "inputs": "My account was hacked and my savings are gone",
            "ids": "a4",
            "labels": "high-stakes",
        },
        {"inputs": "Say it as the assistant", "ids": "a5", "labels": "low-stakes"},
        {"inputs": "Only in A", "ids": "a6", "labels": "low-stakes"},
    ]
    b_rows = [
        # exact copy of a1 (plain text == one user message)
        {
            "inputs": [{"role": "user", "content": "The bridge is collapsing, what do I do?"}],
            "ids": "b1",
            "labels": "high-stakes",
        },
        # a2 re-cased, re-spaced, re-punctuated, with the other label
        {"inputs": "which  colour for the KITCHEN walls", "ids": "b2", "labels": "high-stakes"},
        # a3 exactly, as a list
        {"inputs": json.loads(chat), "ids": "b3", "labels": "low-stakes"},
        # near miss of a4: one word changed
        {
            "inputs": "My account was hacked and my pension are gone",
            "ids": "b4",
            "labels": "high-stakes",
        },
        # a5's text, but said by the assistant
        {
            "inputs": [{"role": "assistant", "content": "Say it as the assistant"}],
            "ids": "b5",
            "labels": "low-stakes",
        },
        {"inputs": "the bridge is collapsing what do i do", "ids": "b6", "labels": "high-stakes"},
    ]
    a = load_records(_write(tmp_path / "a.jsonl", a_rows))
    b = load_records(_write(tmp_path / "b.jsonl", b_rows))
    assert rendered(a[2]) == "user: Help me.\n\nassistant: Sure."
    result = overlap(a, b)
    assert (result.exact.n_a, result.exact.n_b, result.exact.n_pairs) == (2, 2, 2)
    assert result.exact.examples == (("a1", "b1"), ("a3", "b3"))
    assert (result.normalised.n_a, result.normalised.n_b, result.normalised.n_pairs) == (3, 4, 4)
    assert result.normalised.n_texts == 3
    assert result.normalised_only.examples == (("a1", "b6"), ("a2", "b2"))
    assert result.normalised.n_label_mismatch == 1 and result.exact.n_label_mismatch == 0
    assert result.any
    clean = overlap(a[5:], b)
    assert not clean.any and clean.normalised.n_pairs == 0


# --- stats --------------------------------------------------------------------------------------


def _stats_rows():
    rows = []
    for i in range(23):
        text = "word " * (i * 7 % 11 + 1) + "?" * (i % 3)
        inputs = (
            text
            if i % 4
            else json.dumps(
                [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
            )
        )
        rows.append(
            {
                "inputs": inputs,
                "ids": f"r{i}",
                "labels": ["high-stakes", "low-stakes", "ambiguous"][i % 3 if i < 20 else 1],
                "tone": ["casual", "angry", "vulnerable"][i % 3],
                "language": "English" if i < 15 else "German",
                "topic": f"topic {i % 13}",  # 13 values: reported, as a named field
                "flavour": f"f{i % (MAX_LEVELS + 1)}",  # 13 values: too many for an unnamed field
                "batch": i % 2 == 0,  # bools: a 2-valued field
                "model": "gpt-4o",  # one value: not a variation
                **({"prompt_style": "Question"} if i < 5 else {}),
            }
        )
    return rows


def _summary(values):
    values = sorted(values)
    p95 = np.interp(0.95 * (len(values) - 1), np.arange(len(values)), values)  # linear
    return {"min": values[0], "median": statistics.median(values), "p95": p95, "max": values[-1]}


def test_stats_equal_a_direct_computation(tmp_path):
    rows = _stats_rows()
    dataset = load_records(_write(tmp_path / "s.jsonl", rows))
    tokens = [3 * i + 1 for i in range(len(rows))]
    stats = dataset_stats(dataset, token_lengths=tokens, token_model="fake")
    assert stats["records"] == 23
    assert stats["labels"] == {**Counter(r["labels"] for r in rows), "unlabelled": 0}

    def text(row):
        if row["inputs"].startswith("["):
            return "\n\n".join(m["content"] for m in json.loads(row["inputs"]))
        return row["inputs"]

    for label in ("all", "high-stakes", "low-stakes"):
        chosen = [r for r in rows if label in ("all", r["labels"])]
        for got, want in (
            (stats["lengths"]["characters"][label], _summary([len(text(r)) for r in chosen])),
            (stats["lengths"]["tokens"][label], _summary([tokens[rows.index(r)] for r in chosen])),
        ):
            assert got == pytest.approx(want)
    assert list(stats["fields"]) == ["prompt_style", "tone", "language", "topic", "batch"]
    tone = stats["fields"]["tone"]
    for value in ("casual", "angry", "vulnerable"):
        members = [r for r in rows if r["tone"] == value]
        assert tone[value]["n"] == len(members)
        for label in ("high-stakes", "low-stakes", "ambiguous"):
            assert tone[value][label] == sum(r["labels"] == label for r in members)
    assert stats["fields"]["prompt_style"]["(missing)"]["n"] == 18
    assert set(stats["fields"]["batch"]) == {"true", "false"}
    assert json.loads(json.dumps(stats)) == stats  # JSON-ready as it is
    text_report = format_stats(stats)
    assert "tokens (fake, chat template)" in text_report and "casual" in text_report


# --- the CLI ------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(tmp_path, capsys):
    rows = _paired_rows([(2, 2, 0), (1, 1, 1), (3, 1, 0), (1, 3, 0), (2, 2, 0)], singles=(3, 1))
    data = _write(tmp_path / "data.jsonl", rows)

    code, out, err = _run(capsys, "stats", str(data), "--no-tokens", "--json")
    assert code == 0 and err == ""
    stats = json.loads(out)
    assert stats["labels"]["high-stakes"] == 12 and stats["tokens_model"] is None

    out_file = tmp_path / "derived" / "balanced.jsonl"
    code, out, _ = _run(capsys, "balance", str(data), "--out", str(out_file), "--seed", "3")
    assert code == 0 and "dropped 1 ambiguous" in out
    balanced = load_records(out_file)
    assert (balanced.labels == 1).sum() == (balanced.labels == 0).sum() == 10
    assert {r.id for r in balanced} <= set(load_records(data).ids)

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    code, out, _ = _run(
        capsys,
        "split",
        str(data),
        "--out-train",
        str(train),
        "--out-test",
        str(test),
        "--test-fraction",
        "0.25",
        "--seed",
        "1",
    )
    assert code == 0 and "test fraction" in out
    train_set, test_set = load_records(train), load_records(test)
    assert train_set.splits() == ("train",) and test_set.splits() == ("test",)
    assert len(train_set) + len(test_set) == len(rows)
    assert not {r.fields.get("pair_id") for r in train_set} & {
        r.fields["pair_id"] for r in test_set if "pair_id" in r.fields
    }

    code, out, _ = _run(capsys, "overlap", str(train), str(test))
    assert code == 0 and "exact text:" in out and " 0 pairs" in out
    code, out, _ = _run(capsys, "overlap", str(data), str(test), "--fail-on-overlap")
    assert code == 1 and f"{len(test_set)} pairs" in out
    code, out, _ = _run(capsys, "overlap", str(data), str(out_file), "--json")
    assert code == 0 and json.loads(out)["exact"]["n_b"] == len(balanced)


def test_cli_through_the_mup_command(tmp_path, capsys):
    from mup.cli import main as mup_main

    data = _write(tmp_path / "d.jsonl", _paired_rows([(1, 1, 0)]))
    assert mup_main(["data", "stats", str(data), "--no-tokens"]) == 0
    assert "2 records" in capsys.readouterr().out


def test_cli_stats_counts_tokens_with_the_chat_template(tmp_path, capsys):
    """Token lengths of --model: a word-level tokenizer whose ChatML-like template adds three
    tokens per message (<|im_start|>, the role, <|im_end|>), so the counts are known by hand."""
    from _support.checkpoints import word_tokenizer

    model = tmp_path / "word-model"
    word_tokenizer(["word", "ok"]).save_pretrained(model)
    (model / "config.json").write_text('{"model_type": "llama"}')  # what marks a checkpoint dir
    rows = _stats_rows()
    data = _write(tmp_path / "s.jsonl", rows)
    code, out, _ = _run(capsys, "stats", str(data), "--model", str(model), "--json")
    assert code == 0
    stats = json.loads(out)
    lengths = [sum(3 + len(m.content.split()) for m in r.messages) for r in load_records(data)]
    assert stats["tokens_model"] == str(model)
    assert stats["lengths"]["tokens"]["all"] == pytest.approx(_summary(lengths))


def _refused(capsys, argv, *expected):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mup data {argv[0]}: ")
    for text in expected:
        assert text in err, err


def test_cli_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _paired_rows([(2, 2, 0), (1, 1, 0)]))
    out = tmp_path / "o.jsonl"
    missing = str(tmp_path / "nope.jsonl")
    for command in (["stats", missing], ["balance", missing, "--out", str(out)]):
        _refused(capsys, command, missing, "no such file")
    _refused(capsys, ["overlap", str(data), missing], missing)
    _refused(
        capsys, ["balance", str(data), "--out", str(out), "--n", "10"], "n=10 is more than possible"
    )
    _refused(capsys, ["balance", str(data), "--out", str(out), "--n", "5"], "--n 5", "even")
    _refused(capsys, ["balance", str(data), "--out", str(data)], "is the input file")
    _refused(capsys, ["balance", str(data), "--out", str(tmp_path / "o.csv")], "written as .jsonl")
    split = ["split", str(data), "--out-train", str(tmp_path / "a.jsonl"), "--out-test"]
    for fraction in ("0", "1", "1.5", "-0.2", "nan"):
        _refused(capsys, [*split, str(tmp_path / "b.jsonl"), "--test-fraction", fraction], "(0, 1)")
    _refused(capsys, [*split, str(tmp_path / "a.jsonl")], "name the same file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"inputs": "x", "ids": "1", "labels": "high-stakes"}\n{"inputs": "y"}\n')
    _refused(capsys, ["stats", str(bad), "--no-tokens"], f"{bad}:2: field 'ids'")
    _refused(
        capsys,
        ["split", str(bad), "--out-train", str(out), "--out-test", str(tmp_path / "t.jsonl")],
        f"{bad}:2",
    )
    _refused(capsys, ["stats", str(data), "--model", str(tmp_path / "no.gguf")], "--model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "d.jsonl"]  # nothing written
    with pytest.raises(DataError):  # the library raises; only the CLI turns it into a line
        load_records(bad)
