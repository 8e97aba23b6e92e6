"""JSON-constrained decoding: `mup.engine` rows with a grammar, and `response_format`
json_schema / json_object through a real `mup serve` and the official openai client.

Engine level (in process, the tiny random llama, decode_steps=2 so that constrained calls drop
to one step): every token of a constrained row is one its grammar allowed after the tokens
before it (replayed through a fresh matcher), its logprobs are transformers' log-softmax over
the allowed tokens only, and rows without a grammar decode exactly as they do alone.

Server level: answers parse and validate against their schemas (jsonschema, and pydantic through
the client's own `parse`), greedy and sampled, streamed and not, chat and completions; a
constrained and a free request in one batch leave the free one's text unchanged; bad schemas
are 400s naming the field before any model work.

Schemas bound their strings, numbers and arrays, so that even a random model's answer is
complete within max_tokens: what is checked is the constraint, not the model.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from typing import Literal

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

torch = pytest.importorskip("torch", reason="torch is the parity reference")
openai = pytest.importorskip("openai")

NAME = "tiny-guided"
SCHEMAS = {
    "pet": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "kind": {"enum": ["cat", "dog", "bird"]},
        },
        "required": ["name", "age", "kind"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    "tags": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
            "note": {"type": "string", "maxLength": 6},
        },
        "required": ["tags", "ok", "note"],
        "additionalProperties": False,
    },
}
CHATS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "hi"}],
]
LOGPROB_ATOL = 1e-4  # float32, XLA vs torch summation order


def _fmt(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


# -- engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_dir):
    from mup.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def engine(model):
    from mup.engine import Engine, EngineConfig

    eng = Engine(
        model,
        config=EngineConfig(
            max_slots=4, max_len=160, prefill_chunk=32, prefill_rows=(1, 4), decode_steps=2
        ),
    ).start()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(model):
    from mup.text import encode_prompts

    return [tuple(x) for x in encode_prompts(model.tokenizer, CHATS)]


@pytest.fixture(scope="module")
def grammars():
    from mup.engine import json_object_grammar, json_schema_grammar

    return {
        **{k: json_schema_grammar(v) for k, v in SCHEMAS.items()},
        "object": json_object_grammar(),
    }


def _req(ids, **kw):
    from mup.engine import Request

    return Request(prompt_ids=tuple(ids), **kw)


def _replay(engine, grammar, token_ids) -> tuple[list[np.ndarray], object]:
    """The allowed ids before each token (asserting each token is one of them), and the
    matcher after the last: a fresh matcher fed the row's tokens one by one."""
    from mup.engine._grammar import allowed_ids, mask_words

    constraints = engine.constraints()
    matcher = constraints.matcher(grammar)
    V = engine.model.config.vocab_size
    mask = np.zeros((1, mask_words(V)), np.int32)
    allowed = []
    for k, t in enumerate(token_ids):
        constraints.fill([(matcher, 0)], mask)
        ids = allowed_ids(mask[0], V)
        assert t in ids, f"token {k} ({t}) is not allowed by the grammar there"
        assert matcher.consume_token(t)
        allowed.append(ids)
    return allowed, matcher


@pytest.mark.parametrize("name", [*SCHEMAS, "object"])
def test_every_constrained_token_is_allowed_and_answers_validate(engine, prompts, grammars, name):
    """Greedy and sampled rows of each grammar: each token is allowed by the grammar after the
    ones before it; the row stops when the grammar is complete and its text validates. The
    model's own greedy first token is not allowed, so these rows pass only with the mask."""
    specs = [
        dict(temperature=0.0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.8, top_p=0.9, seed=2),
    ]
    rows = [(p, s) for p in (prompts if name != "object" else prompts[1:]) for s in specs]
    results = engine.generate(
        [_req(p, max_tokens=64, grammar=grammars[name], **s) for p, s in rows]
    )
    free = engine.generate([_req(p, max_tokens=1) for p in prompts])
    for (p, _), r in zip(rows, results, strict=True):
        allowed, matcher = _replay(engine, grammars[name], r.token_ids)
        assert r.finish_reason == "stop" and matcher.is_stopped(), r.text
        value = json.loads(r.text)
        if name == "object":
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, SCHEMAS[name])
        assert free[prompts.index(p)].token_ids[0] not in allowed[0]  # the mask changed it


def test_constrained_logprobs_are_transformers_over_the_allowed_tokens(
    engine, prompts, grammars, tiny_dir
):
    """A greedy constrained row: at every step (the first, from the prefill, included) the token
    is the argmax of transformers' logits over the allowed tokens, and its logprob and top-5
    are the log-softmax of those logits with every other token removed."""
    import transformers as tf

    hf = tf.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = prompts[0]
    r = engine.generate(
        [_req(ids, max_tokens=64, grammar=grammars["pet"], logprobs=True, top_logprobs=5)]
    )[0]
    allowed, _ = _replay(engine, grammars["pet"], r.token_ids)
    with torch.no_grad():
        logits = hf(torch.tensor([list(ids) + r.token_ids])).logits[0].double().numpy()
    n = len(ids)
    for k, (t, ok) in enumerate(zip(r.logprobs, allowed, strict=True)):
        row = np.full(logits.shape[-1], -np.inf)
        row[ok] = logits[n - 1 + k, ok]
        lp = row - np.logaddexp.reduce(row[ok])
        assert t.token_id == int(np.argmax(row)), k
        assert t.logprob == pytest.approx(lp[t.token_id], abs=LOGPROB_ATOL)
        want = np.argsort(-lp, kind="stable")[: min(5, len(ok))]
        assert [i for i, _ in t.top] == want.tolist(), k  # only allowed tokens, never -inf
        np.testing.assert_allclose([v for _, v in t.top], lp[want], atol=LOGPROB_ATOL)


def test_free_rows_decode_as_alone_beside_constrained_rows(engine, prompts, grammars):
    """Free greedy, sampled and nucleus rows equal themselves run alone when constrained rows
    share their steps (which then run one decode step per call instead of two)."""
    free = [
        _req(prompts[0], max_tokens=20),
        _req(prompts[1], max_tokens=17, temperature=0.9, seed=4),
        _req(prompts[0], max_tokens=15, temperature=0.7, top_p=0.8, seed=5),
    ]
    alone = engine.generate(free)
    before = dict(engine.stats)
    constrained = [
        _req(prompts[1], max_tokens=64, grammar=grammars["pet"], temperature=1.0, seed=9),
        _req(prompts[0], max_tokens=64, grammar=grammars["tags"]),
    ]
    together = engine.generate([free[0], constrained[0], free[1], constrained[1], free[2]])
    shared = [together[i] for i in (0, 2, 4)]
    for a, b in zip(alone, shared, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.finish_reason == b.finish_reason == "length"
    assert max(r.batch_rows for r in together) > 1
    assert engine.stats["constrained_steps"] > before["constrained_steps"]
    for r, name in zip((together[1], together[3]), ("pet", "tags"), strict=True):
        jsonschema.validate(json.loads(r.text), SCHEMAS[name])


def test_masks_of_many_rows_in_parallel_equal_one_by_one(model, grammars):
    """llguidance's thread pool (batches of PARALLEL_ROWS rows and more) writes each row's mask
    where the one-row fill does, rows at different states of different grammars."""
    from mup.engine._grammar import PARALLEL_ROWS, Constraints, allowed_ids, mask_words

    V = model.config.vocab_size
    pool = Constraints(model.tokenizer, V, [model.tokenizer.eos_token_id], threads=2)
    rng = np.random.default_rng(0)
    names = list(grammars)
    matchers = [pool.matcher(grammars[names[i % len(names)]]) for i in range(PARALLEL_ROWS + 8)]
    one = np.zeros((1, mask_words(V)), np.int32)
    for k, m in enumerate(matchers):  # advance row k by k % 5 allowed tokens
        for _ in range(k % 5):
            pool.fill([(m, 0)], one)
            assert m.consume_token(int(rng.choice(allowed_ids(one[0], V))))
    rows = [(m, k) for k, m in enumerate(matchers)]
    together = np.zeros((len(rows), mask_words(V)), np.int32)
    pool.fill(rows, together)
    for m, k in rows:
        pool.fill([(m, 0)], one)
        np.testing.assert_array_equal(together[k], one[0])
    assert len({together[k].tobytes() for k in range(len(rows))}) > len(names)


def test_max_tokens_first_is_length_and_bad_grammars_are_refused(engine, prompts):
    from mup.engine import GrammarError, json_schema_grammar

    g = json_schema_grammar({"type": "object", "properties": {"s": {"type": "string"}}})
    r = engine.generate([_req(prompts[0], max_tokens=3, grammar=g)])[0]
    _, matcher = _replay(engine, g, r.token_ids)
    assert r.finish_reason == "length" and len(r.token_ids) == 3 and not matcher.is_stopped()
    bad = [
        ({"type": "strin"}, "strin"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ]
    for schema, word in bad:
        with pytest.raises(GrammarError, match=word):
            json_schema_grammar(schema)
    with pytest.raises(GrammarError, match="mup.engine.Grammar"):
        engine.submit(_req(prompts[0], max_tokens=3, grammar='{"type": "object"}'))


# -- server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_dir, module_server, tmp_path_factory):
    srv = module_server(
        [
            "--model", str(tiny_dir),
            "--served-name", NAME,
            "--max-batch", "8",
            "--max-tokens-per-request", "64",
            "--default-max-tokens", "16",
            "--batch-window-ms", "300",  # concurrent requests share a prefill and steps
            "--no-warmup",
        ],
        tmp_path_factory.mktemp("serve-guided"),
    )  # fmt: skip
    srv.wait_healthy()
    return srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)


def _chat(client, chat, **kw):
    return client.chat.completions.create(model=NAME, messages=chat, max_tokens=64, **kw)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate_greedy_sampled_streamed(client, name):
    for chat in CHATS:
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=3)):
            r = _chat(client, chat, response_format=_fmt(name), **kw)
            choice = r.choices[0]
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
            chunks = list(_chat(client, chat, response_format=_fmt(name), stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == choice.message.content
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


class Pet(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    kind: Literal["cat", "dog", "bird"]
    tags: list[Literal["a", "b"]] = Field(max_length=3)


def test_client_parse_with_a_pydantic_model_and_n_choices(client):
    """The official client's structured-output helper (strict json_schema from a pydantic
    model), three sampled choices, each parsed into the model."""
    r = client.chat.completions.parse(
        model=NAME, messages=CHATS[0], response_format=Pet, max_tokens=64, n=3, temperature=2.0,
        seed=7,
    )  # fmt: skip
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)
    assert len({c.message.content for c in r.choices}) > 1


def test_json_object_and_completions(client):
    r = _chat(client, CHATS[1], response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(
        model=NAME, prompt="A pet:", max_tokens=64, temperature=0,
        extra_body={"response_format": _fmt("pet")},
    )  # fmt: skip
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMAS["pet"])
    free = client.completions.create(model=NAME, prompt="A pet:", max_tokens=8, temperature=0)
    assert not free.choices[0].text.startswith("{")  # the constraint is what made it JSON


def test_free_request_unchanged_by_a_constrained_one_in_its_batch(client):
    free = dict(messages=CHATS[0], max_tokens=40, temperature=0)
    alone = client.chat.completions.create(model=NAME, **free)
    metrics = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [
            pool.submit(_chat, client, CHATS[i % 2], response_format=_fmt(n), temperature=0)
            for i, n in enumerate(["pet", "tags", "numbers"])
        ]
        # The free row joins once a constrained one decodes (a lone free row is fast enough
        # to finish before a grammar is built, so arrival order alone proves nothing).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _running_rows(metrics):
            time.sleep(0.01)
        jobs.insert(0, pool.submit(client.chat.completions.create, model=NAME, **free))
        shared, *constrained = [j.result() for j in jobs]
    assert shared.choices[0].message.content == alone.choices[0].message.content
    assert shared.model_extra["batch_rows"] > 1  # it did share steps with the others
    for r, n in zip(constrained, ["pet", "tags", "numbers"], strict=True):
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[n])


def _running_rows(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mup_running_rows "):
                return float(line.split()[1])
    return 0.0


def _raw(server, body):
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


SCHEMA_PARAM = "response_format.json_schema.schema"
BAD = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     SCHEMA_PARAM, "Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}},
     SCHEMA_PARAM, "gone"),
    ({"type": "json_schema",
      "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}},
     SCHEMA_PARAM, "Unsatisfiable"),
    ({"type": "json_schema",
      "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}},
     SCHEMA_PARAM, "look-around"),
    ({"type": "json_schema",
      "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     SCHEMA_PARAM, "Unimplemented keys"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, SCHEMA_PARAM, "must be a JSON Schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name",
     "non-empty string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict", "true, false or null"),
    ({"type": "json_schema"}, "response_format.json_schema", "must be an object"),
    ({"type": "xml"}, "response_format", "'type' is one of"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "param", "message"), BAD, ids=lambda x: str(x)[:50])
def test_bad_response_formats_are_400s_naming_the_field(server, fmt, param, message):
    body = {"model": NAME, "messages": CHATS[1], "max_tokens": 4, "response_format": fmt}
    code, out = _raw(server, body)
    assert code == 400, out
    assert out["error"]["param"] == param and message in out["error"]["message"], out


def test_bad_schema_through_the_client_and_vllm_fields_refused(server, client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, CHATS[1], response_format=bad)
    assert e.value.body["param"] == SCHEMA_PARAM
    code, out = _raw(server, {"model": NAME, "messages": CHATS[1], "guided_json": {}})
    assert code == 400 and out["error"]["param"] == "guided_json"
    assert "response_format" in out["error"]["message"]
    listed = client.models.list().data[0].model_extra["response_formats"]
    assert listed == ["text", "json_object", "json_schema"]
