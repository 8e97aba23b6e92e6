"""The steered server as a real process, driven by the official `openai` client.

References: transformers (torch) greedy generation with a forward hook that adds
multiplier * vector to block L's output, and the probe applied to transformers' hidden states.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch", reason="torch is the parity reference")

NAME = "tiny-steer"
API_KEY_SENTINEL = object()

CHATS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is it blue?"}],
    [{"role": "user", "content": "Count to five, slowly and carefully please."}],
    [{"role": "user", "content": "hi"}],
]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """transformers model + tokenizer of the tiny checkpoint, and the server's stop ids."""
    import transformers as tf

    from mup.models import default_stop_tokens
    from mup.text import load_tokenizer

    model = tf.LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    tok = load_tokenizer(str(tiny_dir))
    return model, tok, default_stop_tokens(tok)


def _prompt_ids(tok, messages):
    from mup.text import encode_prompts

    return encode_prompts(tok, [messages])[0]


def _hf_steered(model, layer, vector, multiplier):
    """Forward hook adding multiplier * vector to block `layer`'s output at every position."""
    add = torch.as_tensor(vector, dtype=torch.float32) * multiplier

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + add, *output[1:])
        return output + add

    return model.model.layers[layer].register_forward_hook(hook)


def _hf_greedy(reference, server, messages, multiplier, max_tokens):
    model, tok, stops = reference
    ids = _prompt_ids(tok, messages)
    handle = _hf_steered(model, server.steer_layer, server.vector, multiplier)
    try:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
    finally:
        handle.remove()
    new = out[0, len(ids) :].tolist()
    end = next((i for i, t in enumerate(new) if t in stops), None)
    new = new if end is None else new[: end + 1]
    return tok.decode(new, skip_special_tokens=True), ("stop" if end is not None else "length")


def _chat(client, messages, multiplier=None, max_tokens=12, **kw):
    extra = {} if multiplier is None else {"steer_multiplier": multiplier}
    return client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra, **kw
    )


def test_health_and_models(server, client):
    with urllib.request.urlopen(server.url + "/health") as r:
        health = json.loads(r.read())
    assert health == {
        "status": "ok",
        "model": NAME,
        "steer_block": 0,
        "steer_layer": 0,  # the deprecated duplicate
        "probe": True,
        "vectors": {"vector": 0},
    }
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_echoes_default_multiplier_and_scores(client):
    r = _chat(client, CHATS[0])
    extra = r.model_extra
    assert extra["steer_multiplier"] == 0.5  # --default-multiplier
    assert r.system_fingerprint == "mup-steer-l0-m+0.5"
    assert 0.0 < extra["probe_score"] < 1.0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.model == NAME


@pytest.mark.parametrize("multiplier", [0.0, 2.5, -3.0])
def test_chat_equals_transformers_with_steering_hook(client, server, reference, multiplier):
    text, finish = _hf_greedy(reference, server, CHATS[1], multiplier, 16)
    r = _chat(client, CHATS[1], multiplier, max_tokens=16)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.model_extra["steer_multiplier"] == multiplier


def test_steering_changes_output(client):
    texts = {m: _chat(client, CHATS[0], m, 16).choices[0].message.content for m in (-3.0, 3.0)}
    assert texts[-3.0] != texts[3.0]


def test_multiplier_via_custom_field(client):
    a = _chat(client, CHATS[2], 1.5)
    b = client.chat.completions.create(
        model=NAME,
        messages=CHATS[2],
        max_tokens=12,
        temperature=0,
        extra_body={"custom": {"steer_multiplier": 1.5}},
    )
    assert b.model_extra["steer_multiplier"] == 1.5
    assert b.choices[0].message.content == a.choices[0].message.content


def test_stream_equals_non_stream(client):
    full = _chat(client, CHATS[0], 1.0, 16)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=CHATS[0],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"steer_multiplier": 1.0},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.model_extra["steer_multiplier"] == 1.0 for c in chunks)


def test_completions_stream_and_not(client, reference):
    _, tok, _ = reference
    r = client.completions.create(
        model=NAME, prompt="The sea is", max_tokens=10, temperature=0,
        extra_body={"steer_multiplier": -1.0},
    )  # fmt: skip
    assert r.model_extra["steer_multiplier"] == -1.0
    assert r.usage.prompt_tokens == len(tok("The sea is")["input_ids"])
    stream = client.completions.create(
        model=NAME, prompt="The sea is", max_tokens=10, temperature=0, stream=True,
        extra_body={"steer_multiplier": -1.0},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_concurrent_requests_equal_sequential(client):
    """Greedy and seeded-sampling requests with different multipliers and max_tokens give the
    same outputs batched together as one by one."""
    specs = [
        dict(messages=CHATS[0], multiplier=-2.0, max_tokens=8, temperature=0),
        dict(messages=CHATS[1], multiplier=0.0, max_tokens=16, temperature=0),
        dict(messages=CHATS[2], multiplier=1.0, max_tokens=12, temperature=0),
        dict(messages=CHATS[3], multiplier=3.0, max_tokens=16, temperature=0),
        dict(messages=CHATS[0], multiplier=2.0, max_tokens=16, temperature=0.9, seed=11),
        dict(messages=CHATS[1], multiplier=-1.0, max_tokens=16, temperature=0.9, seed=12),
    ]

    def call(spec):
        spec = dict(spec)
        m = spec.pop("multiplier")
        return client.chat.completions.create(
            model=NAME, extra_body={"steer_multiplier": m}, **spec
        )

    one_by_one = [call(s) for s in specs]
    assert all(r.model_extra["batch_rows"] == 1 for r in one_by_one)
    together: list = [None] * len(specs)
    barrier = threading.Barrier(len(specs))

    def worker(i):
        barrier.wait()
        together[i] = call(specs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b, spec in zip(one_by_one, together, specs, strict=True):
        assert b.choices[0].message.content == a.choices[0].message.content, spec
        assert b.usage == a.usage
        assert b.model_extra["steer_multiplier"] == spec["multiplier"]
        assert b.model_extra["probe_score"] == pytest.approx(a.model_extra["probe_score"], abs=1e-5)
    # Greedy rows share one generate call, the sampled rows (one sampler) another.
    assert max(r.model_extra["batch_rows"] for r in together) >= 3


def test_probe_score_matches_transformers_hidden_states(client, server, reference, probe_file):
    from mup import probes

    model, tok, _ = reference
    probe = probes.load(probe_file)
    ids = _prompt_ids(tok, CHATS[2])
    captured, scores = {}, []

    def grab(module, args):
        captured["x"] = args[0][0].numpy()  # [T, D], the residual stream entering the block

    # hidden_states[L] read as the input of block L: transformers may record hidden_states
    # before other forward hooks (the steering one) have modified a block's output.
    assert server.probe_layer < model.config.num_hidden_layers
    grab_handle = model.model.layers[server.probe_layer].register_forward_pre_hook(grab)
    for m in (0.0, 2.0):
        handle = _hf_steered(model, server.steer_layer, server.vector, m)
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            handle.remove()
        acts = captured["x"]  # [T, D]
        # --probe-mask all reads the conversation, not the assistant-turn opener the generation
        # prompt appends.
        from mup.text import encode_chats

        n_conv = len(encode_chats(tok, [CHATS[2]]).input_ids)
        expect = probe.predict(
            probes.Activations(
                acts=acts,
                offsets=np.array([0, len(ids)]),
                mask=np.arange(len(ids)) < n_conv,
            )
        )[0]
        r = _chat(client, CHATS[2], m, 4)
        assert r.model_extra["probe_score"] == pytest.approx(float(expect), abs=1e-4), m
        scores.append(r.model_extra["probe_score"])
    grab_handle.remove()
    assert abs(scores[0] - scores[1]) > 1e-3  # steering below the probe's layer moves its score


def _raw(server, path, body, key=API_KEY_SENTINEL):
    headers = {"Content-Type": "application/json"}
    if key is API_KEY_SENTINEL:
        headers["Authorization"] = f"Bearer {server.api_key}"
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


GOOD = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

ERRORS = [
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]", "role must be"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]", "content must be"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0]", "content must be"),
    ({"steer_multiplier": "strong"}, 400, "steer_multiplier", "must be a number"),
    ({"steer_multiplier": 4.5}, 400, "steer_multiplier", "out of range"),
    ({"custom": {"steer_multiplier": -9}}, 400, "custom.steer_multiplier", "out of range"),
    (
        {"steer_multiplier": 1, "custom": {"steer_multiplier": 2}},
        400,
        "steer_multiplier",
        "disagree",
    ),
    ({"max_tokens": 65}, 400, "max_tokens", "exceeds this server's limit"),
    ({"max_tokens": 0}, 400, "max_tokens", "positive integer"),
    ({"temperature": 3}, 400, "temperature", "must be in"),
    ({"logprobs": 2}, 400, "logprobs", "true or false"),
    ({"top_logprobs": 3}, 400, "top_logprobs", "needs 'logprobs'"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "0..20"),
    ({"echo": True}, 400, "echo", "/v1/completions field"),
    ({"steer_vector": "nope"}, 400, "steer_vector", "unknown steering vector"),
    ({"steer_vector": [1.0, 2.0]}, 400, "steer_vector", "d_model is 64"),
    ({"custom": {"steer_vector": "x"}}, 400, "custom.steer_vector", "unknown steering vector"),
    ({"probe_token_scores": "yes"}, 400, "probe_token_scores", "true or false"),
    # JSON modes constrain decoding; malformed ones are refused naming the field
    ({"response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", "object"),
    ({"response_format": "json"}, 400, "response_format", "must be an object"),
    ({"continue_final_message": True}, 400, "continue_final_message", "assistant's"),
    ({"continue_final_message": "yes"}, 400, "continue_final_message", "true or false"),
    (
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "o"}],
            "continue_final_message": True,
            "add_generation_prompt": True,
        },
        400,
        "continue_final_message",
        "cannot both be true",
    ),
    (
        {"messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "messages",
        "maximum context length is 512",
    ),
]


@pytest.mark.parametrize(
    ("change", "status", "param", "message"), ERRORS, ids=lambda x: str(x)[:40]
)
def test_bad_requests_get_openai_errors(server, change, status, param, message):
    code, body = _raw(server, "/v1/chat/completions", {**GOOD, **change})
    assert code == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and message in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_errors_through_the_client_and_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError, match="out of range"):
        _chat(client, CHATS[0], 100.0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=CHATS[0])
    code, body = _raw(server, "/v1/completions", {"model": NAME, "prompt": [], "max_tokens": 2})
    assert code == 400 and body["error"]["param"] == "prompt"
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {server.api_key}"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert (
        e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    )
    assert _chat(client, CHATS[3], 0.0, 4).choices[0].message.content is not None


def test_response_format_constrains_steered_rows(client):
    """The JSON modes constrain decoding (they were refused before the engine had grammars),
    steered rows included: json_schema and json_object answers parse; text is free text."""
    schema = {
        "type": "object",
        "properties": {
            "mood": {"enum": ["calm", "tense"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["mood", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for m in (-2.0, 2.0):
        r = _chat(client, CHATS[0], m, 32, response_format=fmt)
        assert r.choices[0].finish_reason == "stop" and r.model_extra["steer_multiplier"] == m
        value = json.loads(r.choices[0].message.content)
        assert value["mood"] in ("calm", "tense") and 0 <= value["n"] <= 9 and len(value) == 2
    obj = _chat(client, CHATS[3], 0.0, 32, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    text = _chat(client, CHATS[0], 0.0, 4, response_format={"type": "text"})
    assert text.choices[0].message.content is not None


def test_continue_final_message_continues_the_assistant_turn(client, reference):
    """The continuation equals greedy completion of the template rendered up to the open
    assistant message (no end-of-turn after it), sent as token ids to /v1/completions."""
    _, tok, _ = reference
    messages = [*CHATS[0], {"role": "assistant", "content": '{"prompt": "'}]
    r = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "steer_multiplier": 0.0},
    )  # fmt: skip
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith('{"prompt": "')
    ids = tok(text, add_special_tokens=False)["input_ids"]
    c = client.completions.create(
        model=NAME, prompt=ids, max_tokens=8, temperature=0, extra_body={"steer_multiplier": 0.0}
    )
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == c.choices[0].text


def _good_with(field: str, raw_value: str, route: str = "chat") -> bytes:
    """GOOD (or a completions body) with one field's JSON text replaced verbatim."""
    head = json.dumps(GOOD if route == "chat" else {"model": NAME, "prompt": "hi", "max_tokens": 4})
    return (head[:-1] + f', "{field}": {raw_value}}}').encode()


HUGE = "1" + "0" * 400  # parses as a Python int; float() of it overflows
PAST_DIGIT_LIMIT = "9" * 5000  # over Python's 4300-digit int parsing limit
PATHOLOGICAL = [
    ("chat", _good_with("steer_multiplier", HUGE), "steer_multiplier"),
    ("chat", _good_with("steer_multiplier", "-" + HUGE), "steer_multiplier"),
    ("chat", _good_with("temperature", HUGE), "temperature"),
    ("chat", _good_with("top_p", "1e999"), "top_p"),
    ("chat", _good_with("max_tokens", HUGE), "max_tokens"),
    ("chat", _good_with("seed", PAST_DIGIT_LIMIT), None),
    ("chat", _good_with("steer_vector", "[" + ", ".join([HUGE] * 64) + "]"), "steer_vector"),
    ("chat", b"[" * 100_000 + b"]" * 100_000, None),
    (
        "chat",
        b'{"model": "' + NAME.encode() + b'", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
    ),
    (
        "chat",
        json.dumps({**GOOD, "messages": [{"role": "user", "content": "a\ud800b"}]}).encode(),
        None,
    ),
    ("completions", _good_with("prompt", '"lone \\udfff surrogate"', "completions"), None),
    ("completions", _good_with("prompt", "[" + HUGE + "]", "completions"), "prompt"),
    ("chat", b"\xff\xfe not utf-8", None),
]


@pytest.mark.parametrize(("route", "raw", "param"), PATHOLOGICAL, ids=lambda x: repr(x)[:30])
def test_pathological_bodies_get_4xx_never_500(server, route, raw, param):
    req = urllib.request.Request(
        f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
        data=raw,
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400, e.value.read()[:300]
    err = json.loads(e.value.read())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert len(err["message"]) < 300, err  # the message names the problem, not the whole value


def test_oversized_body_is_413_and_the_server_keeps_serving(server, client):
    """A body declared larger than the bound is refused from its headers, before any of it is
    read (a raw socket: an HTTP client would still be sending when the answer comes)."""
    import socket
    import urllib.parse

    from mup.serve._protocol import MAX_BODY_BYTES

    url = urllib.parse.urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert _chat(client, CHATS[3], 0.0, 4).choices[0].message.content is not None


def test_api_key_required(server):
    code, body = _raw(server, "/v1/chat/completions", GOOD, key=None)
    assert code == 401 and body["error"]["code"] == "invalid_api_key"
    assert "missing API key" in body["error"]["message"]
    code, body = _raw(server, "/v1/chat/completions", GOOD, key="wrong")
    assert code == 401 and "incorrect API key" in body["error"]["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert _raw(server, "/v1/chat/completions", GOOD)[0] == 200
