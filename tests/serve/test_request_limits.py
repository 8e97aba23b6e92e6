"""The server's request limits, in process: generated bodies against the request parser
(whatever the body, a 2xx or an OpenAI-style 4xx, never a 500), the rows-per-request bound
and the waiting-queue bound (429 with Retry-After).

The app is the real one (`create_app` over a real engine on the tiny checkpoint), driven
through Starlette's in-process client; bodies that happen to be valid really generate (a
handful of tokens: the server caps max_tokens at 2).
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("torch", reason="transformers/torch build the tiny checkpoint")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAME = "tiny-fuzz"

# Values that broke parsers before: huge and non-finite numbers, lone surrogates, wrong types.
numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 20, 21, 0.5, 1e308, -1e308, 2**31, 2**63]),
)
texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\ud800", "a\udfffb", "", "hi", "\x00", "x" * 200]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
messages = st.one_of(
    values,
    st.lists(
        st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), values)},
            optional={"content": st.one_of(texts, values)},
        ),
        max_size=3,
    ),
)
FIELDS = (
    "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "logprobs",
    "top_logprobs", "echo", "steer_multiplier", "steer_vector", "custom",
    "probe_token_scores", "stream_options", "presence_penalty", "best_of",
)  # fmt: skip
bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just(NAME), texts)},
    optional={
        "messages": messages,
        "prompt": st.one_of(values, st.lists(numbers, min_size=1, max_size=3), texts),
        **{name: values for name in FIELDS},
    },
)


@pytest.fixture(scope="module")
def app_client(tiny_dir):
    from starlette.testclient import TestClient

    from mup.serve._cli import parse_args
    from mup.serve._load import build_engine
    from mup.serve._routes import create_app

    config = parse_args(
        ["--model", str(tiny_dir), "--served-name", NAME, "--layer", "0", "--no-warmup",
         "--max-tokens-per-request", "2", "--default-max-tokens", "2", "--max-batch", "4",
         "--max-context", "64", "--max-rows-per-request", "16", "--max-waiting-rows", "24"]
    )  # fmt: skip
    engine = build_engine(config)
    with TestClient(create_app(engine, config, NAME), raise_server_exceptions=False) as client:
        client.engine = engine
        yield client


def _check(response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and len(err["message"]) < 400, err


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_generated_bodies_never_500(app_client, body, route):
    try:
        raw = json.dumps(body).encode()
    except ValueError:  # an int past Python's digit limit cannot even be written
        return
    _check(app_client.post(route, content=raw, headers={"Content-Type": "application/json"}))


@settings(max_examples=40, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_generated_bytes_never_500(app_client, raw):
    _check(app_client.post("/v1/chat/completions", content=raw))


def test_rows_per_request_bound(app_client):
    r = app_client.post(
        "/v1/completions", json={"model": NAME, "prompt": ["hi"] * 17, "max_tokens": 1}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_rows" and "--max-rows-per-request" in err["message"]
    ok = app_client.post(
        "/v1/completions", json={"model": NAME, "prompt": ["hi"] * 4, "n": 4, "max_tokens": 1}
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 16


def test_full_queue_is_429_with_retry_after(app_client):
    from mup.engine import Request

    engine = app_client.engine
    ids = (1, 2, 3)
    # 4 slots busy for 40 tokens each, 24 rows waiting behind them: the queue is full
    handles = [
        engine.submit(Request(prompt_ids=ids, max_tokens=40, stop_ids=())) for _ in range(28)
    ]
    try:
        r = app_client.post("/v1/completions", json={"model": NAME, "prompt": "hi"})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        for h in handles:
            h.cancel()
        for h in handles:
            h.result(120)
    assert (
        app_client.post("/v1/completions", json={"model": NAME, "prompt": "hi"}).status_code == 200
    )
