"""The engine behind a real `mup serve` process, through the official `openai` client and raw
HTTP: streaming that arrives as tokens decode, logprobs, echo with max_tokens 0, named and
request-supplied vectors, continuous batching seen in responses and /metrics, a client
disconnect freeing its slot, the plain (vector-free) server, and files checked before the model
loads.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch", reason="torch is the logprob reference")

NAME = "tiny-multi"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "The sea is blue and"


@pytest.fixture(scope="module")
def vector_b(tmp_path_factory, vector_file):
    v = np.load(vector_file)
    path = tmp_path_factory.mktemp("vec_b") / "b.npy"
    np.save(path, -0.5 * v[::-1].copy())
    return path


@pytest.fixture(scope="module")
def embed_probe(tmp_path_factory):
    """A second probe, reading the token embeddings (layer 0)."""
    from mup import probes

    rng = np.random.default_rng(7)
    acts = rng.normal(size=(60, 64)).astype(np.float32)
    data = probes.Activations(
        acts=acts, offsets=np.arange(0, 61, 5), labels=(np.arange(12) % 2).astype(np.int8),
        layers=(0,),
    )  # fmt: skip
    return probes.fit("dom", data, layer=0).save(
        tmp_path_factory.mktemp("p0") / "embed.safetensors"
    )


@pytest.fixture(scope="module")
def multi(
    module_server, tiny_dir, vector_file, vector_b, probe_file, embed_probe, tmp_path_factory
):
    """Two named vectors at block 0 (request vectors steer block 0 too), two probes, 4 slots."""
    srv = module_server(
        [
            "--model", str(tiny_dir),
            "--vector", f"a={vector_file}",
            "--vector", f"b={vector_b}",
            "--probe", str(probe_file),
            "--probe", str(embed_probe),
            "--layer", "0",  # the old name of --block: still accepted
            "--served-name", NAME,
            "--max-tokens-per-request", "400",
            "--max-batch", "4",
            "--no-warmup",  # the main test server covers the warm-up; compile what is used
        ],
        tmp_path_factory.mktemp("serve_multi"),
    )  # fmt: skip
    with srv.healthy():
        yield srv


@pytest.fixture(scope="module")
def client(multi):
    return openai.OpenAI(base_url=multi.url + "/v1", api_key="-", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    import transformers as tf

    from mup.text import load_tokenizer

    model = tf.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(str(tiny_dir))


def _post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(srv) -> dict[str, float]:
    with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_stream_arrives_as_tokens_decode(client):
    """64 tokens: the first content chunk arrives long before the last one."""
    # untimed: this server compiles on first use (--no-warmup)
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=64, temperature=0)
    t0 = time.perf_counter()
    stream = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=64, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    arrivals, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter() - t0)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage.completion_tokens == 64
    assert len(arrivals) >= 32
    assert arrivals[0] < 0.3 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_n_choices_stream_interleaved(client):
    stream = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=24, temperature=0.8, seed=3, n=2, stream=True,
        extra_body={"steer_vector": "a", "steer_multiplier": 1.0},
    )  # fmt: skip
    order = [c.choices[0].index for c in stream if c.choices and c.choices[0].delta.content]
    full = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=24, temperature=0.8, seed=3, n=2,
        extra_body={"steer_vector": "a", "steer_multiplier": 1.0},
    )  # fmt: skip
    assert len(full.choices) == 2
    # both choices decode together: choice 1 starts before choice 0 is done
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


def test_chat_logprobs_through_the_client(client, multi, hf):
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"steer_vector": "a", "steer_multiplier": 0.0},
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the top token
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
    # Values: transformers on the prompt + completion (multiplier 0: the unsteered model).
    model, tok = hf
    from mup.text import encode_prompts

    ids = encode_prompts(tok, [CHAT])[0]
    want = []
    with torch.no_grad():  # transformers' greedy continuation and its logprobs
        for _ in content:
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            ids = [*ids, int(lp.argmax())]
            want.append(float(lp.max()))
    np.testing.assert_allclose([t.logprob for t in content], want, atol=1e-4)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_echo_with_max_tokens_zero_scores_the_prompt(multi, hf):
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    code, body = _post(
        multi.url + "/v1/completions",
        {"model": NAME, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
         "temperature": 0, "steer_multiplier": 0.0},
    )  # fmt: skip
    assert code == 200, body
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    want = [ref[c - 1, ids[c]] for c in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-4)
    for c in range(1, len(ids)):  # the top-1 plus the prompt's own token
        assert max(lp["top_logprobs"][c].values()) == pytest.approx(ref[c - 1].max(), abs=1e-4)
    # token-id prompts, max_tokens 1 (lm-evaluation-harness): the prompt then one new token
    code, body = _post(
        multi.url + "/v1/completions",
        {"model": NAME, "prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1,
         "temperature": 0, "steer_multiplier": 0.0},
    )  # fmt: skip
    lp1 = body["choices"][0]["logprobs"]
    assert len(lp1["token_logprobs"]) == len(ids) + 1
    np.testing.assert_allclose(lp1["token_logprobs"][1 : len(ids)], want, atol=1e-4)
    code, body = _post(
        multi.url + "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}
    )
    assert code == 400 and body["error"]["param"] == "max_tokens"
    code, body = _post(
        multi.url + "/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 21}
    )
    assert code == 400 and body["error"]["param"] == "logprobs"


def test_named_vectors_and_request_vectors(client, vector_b):
    def run(**extra):
        return client.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=12, temperature=0, extra_body=extra
        )

    b = np.load(vector_b)
    by_name = run(steer_vector="b", steer_multiplier=2.0)
    by_floats = run(steer_vector=[float(x) for x in b], steer_multiplier=2.0)
    custom_form = run(custom={"steer_vector": "b", "steer_multiplier": 2.0})
    default = run(steer_multiplier=2.0)  # the first vector, "a"
    a = run(steer_vector="a", steer_multiplier=2.0)
    assert by_name.choices[0].message.content == by_floats.choices[0].message.content
    assert custom_form.choices[0].message.content == by_name.choices[0].message.content
    assert default.choices[0].message.content == a.choices[0].message.content
    assert a.choices[0].message.content != by_name.choices[0].message.content
    assert (
        by_name.model_extra["steer_vector"] == "b"
        and by_floats.model_extra["steer_vector"] == "custom"
    )
    assert by_name.model_extra["steer_layer"] == 0
    assert by_name.model_extra["steer_block"] == 0
    models = client.models.list().data
    assert [v["name"] for v in models[0].model_extra["vectors"]] == ["a", "b"]
    # "layer" and custom_vector_layer: the deprecated duplicates of "block", custom_vector_block
    assert [(v["block"], v["layer"]) for v in models[0].model_extra["vectors"]] == [(0, 0)] * 2
    assert models[0].model_extra["custom_vector_block"] == 0
    assert models[0].model_extra["custom_vector_layer"] == 0
    with pytest.raises(openai.BadRequestError, match="norm"):
        run(steer_vector=[1e4] * len(b))


def test_several_probes(client):
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2, temperature=0)
    scores = r.model_extra["probe_scores_by_probe"]
    assert list(scores) == ["probe", "embed"]
    assert scores["probe"] == r.model_extra["probe_score"]
    assert all(0.0 < x < 1.0 for x in scores.values()) and scores["probe"] != scores["embed"]


def test_late_request_joins_running_batch(client, multi):
    """A short request sent while a long stream decodes joins its batch, finishes first, and
    equals the same request sent alone; /metrics counts both."""
    before = _metrics(multi)
    alone = client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=0)
    first_chunk = threading.Event()
    long_done = {}

    def long_stream():
        stream = client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=300, temperature=0, stream=True
        )
        for _chunk in stream:
            first_chunk.set()
        long_done["t"] = time.perf_counter()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert first_chunk.wait(60)
    short = client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=0)
    t_short = time.perf_counter()
    thread.join(120)
    assert t_short < long_done["t"]
    assert short.choices[0].text == alone.choices[0].text
    assert short.model_extra["batch_rows"] == 2
    after = _metrics(multi)
    assert after["mup_requests_total"] - before["mup_requests_total"] == 3
    assert after["mup_time_to_first_token_seconds_count"] > before.get(
        "mup_time_to_first_token_seconds_count", 0
    )
    assert after["mup_running_rows"] == 0


CANCELLED = 'mup_requests_finished_total{reason="cancelled"}'


def _cancelled_after(server, before: float, timeout: float = 30.0) -> float:
    """The server's count of cancelled rows, once it has passed `before` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while (n := _metrics(server).get(CANCELLED, 0)) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_disconnect_mid_stream_frees_the_slot(client, multi):
    before = _metrics(multi).get(CANCELLED, 0)
    other = {}

    def other_stream():
        stream = client.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=40, temperature=0, stream=True
        )
        other["text"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    conn = http.client.HTTPConnection("127.0.0.1", multi.port, timeout=60)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    thread = threading.Thread(target=other_stream)
    thread.start()
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    assert _cancelled_after(multi, before) == before + 1
    thread.join(120)
    alone = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=40, temperature=0)
    assert other["text"] == alone.choices[0].message.content
    assert _metrics(multi)["mup_running_rows"] == 0


def test_disconnect_while_waiting_cancels_quietly(client, multi):
    """A non-streamed request whose client leaves: its row is cancelled and the server logs one
    line, not the traceback of an escaping CancelledError."""
    before = _metrics(multi).get(CANCELLED, 0)
    conn = http.client.HTTPConnection("127.0.0.1", multi.port, timeout=60)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while _metrics(multi)["mup_running_rows"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.sock.shutdown(2)  # the client goes away before its answer
    conn.close()
    assert _cancelled_after(multi, before) == before + 1
    r = client.completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None  # the server still answers
    log = multi.log()
    assert "client closed the request; 1 row(s) cancelled" in log
    assert "Traceback" not in log and "never retrieved" not in log


@pytest.mark.slow
def test_plain_server_and_files_checked_first(start_server, tiny_dir, client, tmp_path):
    plain = start_server(["--model", str(tiny_dir), "--served-name", NAME, "--no-warmup"], tmp_path)
    health = plain.wait_healthy()
    assert health["vectors"] == {} and health["steer_layer"] is None
    assert health["steer_block"] is None
    c = openai.OpenAI(base_url=plain.url + "/v1", api_key="-", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10, temperature=0)
    assert r.system_fingerprint == "mup-plain" and r.model_extra["steer_vector"] is None
    steered0 = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=10, temperature=0,
        extra_body={"steer_multiplier": 0.0},
    )  # fmt: skip
    assert r.choices[0].message.content == steered0.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no steering vector"):
        c.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=2, extra_body={"steer_multiplier": 1.0}
        )
    with pytest.raises(openai.BadRequestError, match="--block"):
        c.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=2, extra_body={"steer_vector": [0.0] * 64}
        )

    garbage = tmp_path / "probe.safetensors"
    garbage.write_bytes(b"not a probe")
    for args, says in [
        (["--vector", "x=/nonexistent/v.npy"], "--vector x=/nonexistent/v.npy: file not found"),
        (["--probe", str(garbage)], f"--probe {garbage}:"),
    ]:
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mup.serve", "--model", "no-such-model", *args],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        # one line naming the file, before the (here impossible) model load is tried
        assert says in done.stderr and "no-such-model" not in done.stderr, done.stderr
        assert time.perf_counter() - t0 < 60
    usage = subprocess.run(
        [sys.executable, "-m", "mup.serve", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert re.match(r"usage: mup serve ", usage)
